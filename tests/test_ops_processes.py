"""Operations against real processes: /metrics of real ingest, worker and alert processes checked against what
happened, /healthz flipping when Redis stops (and recovering), a real Prometheus server (Debian package)
scraping them and evaluating every dashboard and rule expression, and deploy/scrape_check.sh.

Workers run the stand-in ``noop`` detector: what is under test is the operations surface, not the model.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from stream import wire
from stream.contracts import Defect, Encoding, InspectionResult, Verdict
from stream.keys import line_keys
from tests.conftest import ROOT, free_port
from tests.procs import CliProcesses, processes_fixture

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

DEMO = ROOT / "stream" / "demo_data" / "hazelnut_toy" / "test" / "colour"
FAST_QUEUE = {"block_ms": 100, "claim_interval_s": 0.3, "claim_idle_ms": 2000}


# ----------------------------------------------------------------------------------------- helpers


class Procs(CliProcesses):
    """``python -m stream.cli`` subprocesses, each with its own settings file and metrics port."""

    def start(self, *args: str, cameras=(), alerts=None, queue=None) -> tuple[subprocess.Popen, int]:
        port = free_port()
        cfg = {"redis": {"url": self.redis_url, "key_prefix": self.prefix, "socket_timeout_s": 1.0},
               "queue": {**FAST_QUEUE, **(queue or {})}, "cameras": list(cameras),
               "metrics": {"enabled": True, "host": "127.0.0.1", "port": port}, "log_level": "INFO"}
        if alerts:
            cfg["alerts"] = alerts
        path = self.tmp / f"settings-{len(self.procs)}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        return self.spawn(path, *args), port


procs = processes_fixture(Procs)


def http(url: str, timeout=2.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def scrape(port: int) -> dict[tuple[str, frozenset], float]:
    status, text = http(f"http://127.0.0.1:{port}/metrics")
    assert status == 200
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def total(samples: dict, name: str, **labels) -> float:
    want = set(labels.items())
    return sum(v for (n, lbl), v in samples.items() if n == name and want <= lbl)


def wait_for(pred, timeout: float, what: str, proc_list=()):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if pred():
                return
        except (OSError, AssertionError):
            pass
        for p in proc_list:
            assert p.poll() is None, f"process {p.args} exited with {p.returncode} while waiting for {what}"
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def healthy(port: int) -> bool:
    return http(f"http://127.0.0.1:{port}/healthz")[0] == 200


def camera(path: Path, **kw) -> dict:
    return {"id": "camA", "line": "L1", "source": "folder", "path": str(path), **kw}


# ------------------------------------------------------------------ counters against what happened


def test_ingest_and_worker_metrics_account_for_every_frame(procs, redis_client, key_prefix, tmp_path):
    """frames in (captured + injected) = results out + dropped + dead-lettered, from the processes' /metrics."""
    folder = tmp_path / "cam"
    folder.mkdir()
    good = sorted(DEMO.glob("*.jpg"))[:6]
    for f in good:
        shutil.copy(f, folder / f.name)
    (folder / "zz_broken.png").write_bytes(b"\x89PNG this is not an image")  # unreadable: dropped by ingest
    keys = line_keys(key_prefix, "L1")

    worker, wport = procs.start("worker", "--line", "L1", "--detector", "noop", "--id", "w1")
    wait_for(lambda: healthy(wport), 60, "worker /healthz", [worker])
    injected = 3  # undecodable entries: the worker dead-letters them
    for i in range(injected):
        redis_client.xadd(keys.frames, {"p": b"LI\x01F garbage %d" % i})
    ingest, iport = procs.start("ingest", "--camera", "camA",
                                cameras=[camera(folder, loop=True, fps=20, down_grace_s=1.0)])

    # during the run: both endpoints answer and count
    wait_for(lambda: total(scrape(wport), "lineinspect_frames_processed_total", line="L1") >= 10, 60,
             "results", [worker, ingest])
    mid_i, mid_w = scrape(iport), scrape(wport)
    assert total(mid_i, "lineinspect_frames_captured_total", line="L1", camera="camA") >= 10
    assert total(mid_i, "lineinspect_camera_up", line="L1", camera="camA") == 1
    assert total(mid_i, "lineinspect_frames_dropped_total", reason="unreadable") >= 1
    assert total(mid_w, "lineinspect_frames_dead_lettered_total", line="L1") == injected
    assert total(mid_w, "lineinspect_stage_seconds_count", line="L1", stage="decode") >= 10
    assert healthy(iport) and healthy(wport)

    # the camera goes away: ingest keeps running (reconnecting), nothing new comes in, the worker drains
    shutil.rmtree(folder)
    wait_for(lambda: not healthy(iport), 30, "ingest /healthz to fail with the camera gone", [ingest])
    assert "camera camA down" in http(f"http://127.0.0.1:{iport}/healthz")[1]
    wait_for(lambda: redis_client.xlen(keys.frames) == 0, 30, "the worker to drain the stream", [worker])

    def settled():
        i, w = scrape(iport), scrape(wport)
        return (total(i, "lineinspect_frames_enqueued_total") + injected
                == total(w, "lineinspect_frames_processed_total") + total(w, "lineinspect_frames_dead_lettered_total")
                + total(i, "lineinspect_frames_dropped_total", reason="trimmed_oldest"))

    wait_for(settled, 20, "worker counters to catch up with ingest", [worker, ingest])
    ing, wrk = scrape(iport), scrape(wport)
    captured = total(ing, "lineinspect_frames_captured_total", line="L1", camera="camA")
    enqueued = total(ing, "lineinspect_frames_enqueued_total", line="L1", camera="camA")
    dropped = {reason: total(ing, "lineinspect_frames_dropped_total", reason=reason)
               for reason in ("unreadable", "encode_error", "redis_error", "trimmed_oldest")}
    processed = total(wrk, "lineinspect_frames_processed_total", line="L1")
    dead = total(wrk, "lineinspect_frames_dead_lettered_total", line="L1")
    # frames in = results out + dropped + dead-lettered (unreadable files never became frames)
    assert captured + injected == processed + (sum(dropped.values()) - dropped["unreadable"]) + dead
    assert captured == enqueued + dropped["encode_error"] + dropped["redis_error"]
    assert dropped["unreadable"] >= 1 and dead == injected
    assert processed >= 10 and processed == redis_client.xlen(keys.results)
    assert dead == redis_client.xlen(keys.dead_letter)
    assert total(wrk, "lineinspect_verdicts_total", line="L1", verdict="ok") == processed
    assert total(wrk, "lineinspect_end_to_end_seconds_count", line="L1") == processed
    assert total(ing, "lineinspect_camera_up", line="L1", camera="camA") == 0
    assert total(ing, "lineinspect_camera_reconnects_total", line="L1", camera="camA") >= 1
    assert procs.stop(ingest) == 0 and procs.stop(worker) == 0


# ------------------------------------------------------------------------- health when Redis stops


def test_healthz_fails_when_redis_stops_and_recovers(tmp_path, own_redis):
    p = Procs(tmp_path, own_redis.url, "liops")
    try:
        worker, wport = p.start("worker", "--line", "L1", "--detector", "noop")
        ingest, iport = p.start("ingest", "--camera", "camA", cameras=[camera(DEMO, loop=True, fps=5)])
        alerts, aport = p.start("alerts", "--line", "L1")
        ports = {"worker": wport, "ingest": iport, "alerts": aport}
        everyone = [worker, ingest, alerts]
        for name, port in ports.items():
            wait_for(lambda port=port: healthy(port), 60, f"{name} /healthz ok", everyone)

        own_redis.stop()
        for name, port in ports.items():
            wait_for(lambda port=port: not healthy(port), 30, f"{name} /healthz to fail", everyone)
            status, body = http(f"http://127.0.0.1:{port}/healthz")
            assert status == 503 and ("redis" in body.lower() or "connect" in body.lower()), (name, body)
        # /metrics still answers while Redis is down (Prometheus sees the process up, the rules see the stall)
        assert total(scrape(iport), "lineinspect_frames_dropped_total", reason="redis_error") >= 1

        # Redis back on the same port, empty (no persistence): ingest and alerts reconnect by themselves.
        # (The worker's recovery from a Redis that lost its data is the next test.)
        own_redis.start()
        for name in ("ingest", "alerts"):
            wait_for(lambda port=ports[name]: healthy(port), 60, f"{name} /healthz to recover", [ingest, alerts])
        for proc in (ingest, alerts):
            assert p.stop(proc) == 0, p.output(proc)[-2000:]
    finally:
        p.cleanup()


def test_worker_survives_redis_restart_that_lost_the_group(tmp_path, own_redis):
    p = Procs(tmp_path, own_redis.url, "liops")
    try:
        worker, wport = p.start("worker", "--line", "L1", "--detector", "noop")
        wait_for(lambda: healthy(wport), 60, "worker /healthz ok", [worker])
        own_redis.stop()
        wait_for(lambda: not healthy(wport), 30, "worker /healthz to fail", [worker])
        own_redis.start()
        wait_for(lambda: healthy(wport), 30, "worker /healthz to recover", [worker])
        assert p.stop(worker) == 0
    finally:
        p.cleanup()


# ------------------------------------------------------------------------------- the alert process


class Hook:
    def __init__(self):
        self.bodies: list[dict] = []
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                hook.bodies.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *a):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def test_alert_process_pages_once_with_a_frame_snapshot(procs, redis_client, key_prefix):
    hook = Hook()
    try:
        alerts, aport = procs.start("alerts", "--line", "L1", alerts={
            "debounce_count": 2, "debounce_window_s": 30, "cooldown_s": 600, "webhook_url": hook.url})
        wait_for(lambda: healthy(aport), 60, "alerts /healthz", [alerts])
        keys = line_keys(key_prefix, "L1")
        img = cv2.imread(str(sorted(DEMO.glob("*.jpg"))[0]))
        h, w = img.shape[:2]
        labels = np.zeros((h, w), np.uint8)
        labels[h // 4:h // 2, w // 4:w // 2] = 1
        box = (w // 4, h // 4, w // 2, h // 2)
        for seq in range(4):  # 2 raise the alert, 2 more fall in the cooldown
            frame = wire.image_to_frame(img, line_id="L1", camera_id="camA", seq=seq, session="9",
                                        capture_ts=time.time(), encoding=Encoding.JPEG)
            eid = redis_client.xadd(keys.frames, {"p": wire.encode_frame(frame)})
            time.sleep(0.3)  # the alert service's frame tail reads it ...
            redis_client.xdel(keys.frames, eid)  # ... before the worker deletes it on completion
            result = InspectionResult(
                frame_id=frame.frame_id, line_id="L1", camera_id="camA", seq=seq, capture_ts=frame.capture_ts,
                image_score=3.0, threshold=1.0, verdict=Verdict.DEFECT,
                defects=(Defect(label=1, box=box, area=(h // 4) * (w // 4), score=3.0),),
                mask_png=wire.encode_label_mask(labels), processed_ts=time.time())
            redis_client.xadd(keys.results, {"p": wire.encode_result(result)})
        wait_for(lambda: total(scrape(aport), "lineinspect_alert_results_read_total", line="L1") == 4, 30,
                 "the alert process to read four results", [alerts])
        wait_for(lambda: len(hook.bodies) == 1, 10, "one webhook call", [alerts])
        m = scrape(aport)
        assert total(m, "lineinspect_alerts_raised_total", line="L1") == 1
        assert total(m, "lineinspect_alerts_suppressed_total", line="L1", reason="cooldown") == 2
        assert total(m, "lineinspect_alert_deliveries_total", sink="webhook", outcome="delivered") == 1
        assert total(m, "lineinspect_alert_deliveries_total", sink="redis", outcome="delivered") == 1
        assert procs.stop(alerts) == 0
    finally:
        hook.close()
    body = hook.bodies[0]
    assert body["frame_id"] == "camA:9:1" and body["defects"][0]["box"] == list(box)
    assert body["snapshot"]["source"] == "frame"
    import base64

    snap = cv2.imdecode(np.frombuffer(base64.b64decode(body["snapshot"]["base64"]), np.uint8), cv2.IMREAD_COLOR)
    assert snap.shape == img.shape
    assert redis_client.xlen(line_keys(key_prefix, "L1").alerts) == 1


# ------------------------------------------------------------------------------ a real Prometheus


def _prometheus() -> str:
    path = shutil.which("prometheus")
    if path is None:
        pytest.skip("prometheus not installed (Debian package prometheus; bash deploy/dev.sh test installs it)")
    return path


def _dashboard_queries() -> list[tuple[str, str]]:
    dash = json.loads((ROOT / "deploy/grafana/dashboards/lineinspect.json").read_text())
    out = []
    for p in dash["panels"]:
        for t in p.get("targets", []):
            out.append((p["title"], t["expr"].replace("$__rate_interval", "30s").replace("$line", ".*")))
    return out


def test_real_prometheus_scrapes_processes_and_evaluates_dashboard_and_rules(procs, tmp_path):
    binary = _prometheus()
    worker, wport = procs.start("worker", "--line", "L1", "--detector", "noop")
    ingest, iport = procs.start("ingest", "--camera", "camA", cameras=[camera(DEMO, loop=True, fps=10)])
    pport = free_port()
    cfg = {"global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
           "rule_files": [str(ROOT / "deploy/prometheus/rules.yml")],
           "scrape_configs": [
               {"job_name": "lineinspect-worker", "static_configs": [{"targets": [f"127.0.0.1:{wport}"]}]},
               {"job_name": "lineinspect-ingest", "static_configs": [{"targets": [f"127.0.0.1:{iport}"]}]}]}
    (tmp_path / "prom.yml").write_text(yaml.safe_dump(cfg))
    prom_log = open(tmp_path / "prometheus.log", "wb")  # noqa: SIM115
    prom = subprocess.Popen([binary, f"--config.file={tmp_path / 'prom.yml'}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                             f"--web.listen-address=127.0.0.1:{pport}"], stdout=prom_log, stderr=subprocess.STDOUT)
    api = f"http://127.0.0.1:{pport}/api/v1"

    def query(expr: str) -> dict:
        status, body = http(f"{api}/query?query={urllib.parse.quote(expr)}", timeout=5)
        return json.loads(body) | {"http": status}

    def value(expr: str) -> float:
        res = query(expr)["data"]["result"]
        return sum(float(r["value"][1]) for r in res)

    try:
        wait_for(lambda: healthy(wport) and healthy(iport), 60, "processes healthy", [worker, ingest])
        wait_for(lambda: http(f"http://127.0.0.1:{pport}/-/ready")[0] == 200, 30, "prometheus ready", [prom])
        wait_for(lambda: value('sum(rate(lineinspect_frames_processed_total{line="L1"}[30s]))') > 0, 60,
                 "a non-zero inspected rate in Prometheus", [prom, worker, ingest])
        assert value('up{job="lineinspect-worker"}') == 1 and value('up{job="lineinspect-ingest"}') == 1
        # every dashboard query parses and evaluates on a real Prometheus; the core ones have data
        has_data: dict[str, bool] = {}
        for title, expr in _dashboard_queries():
            res = query(expr)
            assert res["http"] == 200 and res["status"] == "success", (title, expr, res)
            has_data[title] = has_data.get(title, False) or bool(res["data"]["result"])
        for title in ("Inspected frames/s", "Throughput", "End-to-end latency (capture to result)",
                      "Stage latency p95", "Stage latency mean", "Consumer-group lag and pending", "Worker busy",
                      "Process health (scrape up)", "Cameras", "Models", "Workers up"):
            assert has_data[title], f"panel {title!r} shows no data against real processes"
        # every rule expression evaluates too; the rules file was loaded without errors
        rules = yaml.safe_load((ROOT / "deploy/prometheus/rules.yml").read_text())
        for group in rules["groups"]:
            for r in group["rules"]:
                res = query(r["expr"])
                assert res["status"] == "success", (r, res)
        status, body = http(f"{api}/rules")
        loaded = json.loads(body)["data"]["groups"]
        assert {g["name"] for g in loaded} == {g["name"] for g in rules["groups"]}
        assert all(r["health"] in ("ok", "unknown") for g in loaded for r in g["rules"]), loaded
    finally:
        prom.terminate()
        prom.wait(10)
        prom_log.close()


def test_scrape_check_script_against_a_running_worker(procs):
    _prometheus()
    worker, wport = procs.start("worker", "--line", "L1", "--detector", "noop")
    ingest, _ = procs.start("ingest", "--camera", "camA", cameras=[camera(DEMO, loop=True, fps=10)])
    wait_for(lambda: healthy(wport), 60, "worker healthy", [worker, ingest])
    out = subprocess.run(["bash", str(ROOT / "deploy/scrape_check.sh"), f"127.0.0.1:{wport}"], capture_output=True,
                         text=True, timeout=90, env={"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin",
                                                     "PYTHON": sys.executable, "WAIT_S": "40"})
    assert out.returncode == 0, out.stdout + out.stderr
    answer = json.loads(out.stdout.strip().splitlines()[-1])
    (series,) = answer["data"]["result"]
    assert series["metric"]["__name__"] == "lineinspect_frames_processed_total"
    assert series["metric"]["line"] == "L1" and float(series["value"][1]) > 0
    assert re.search(r'"job":"lineinspect-worker".*"value":\[[0-9.]+,"1"\]', out.stdout)  # up == 1
