"""Real OS processes (``python -m stream.cli ingest|worker``) around the real Redis.

Stand-in detectors (``--detector noop|slow:SECONDS``) keep these tests free of the SAM model; what is under
test is the streaming backbone: delivery, reclaim, dead letters, draining, backpressure and reconnects.
"""

from __future__ import annotations

import collections
import re
import signal
import subprocess
import time
import urllib.error
import urllib.request

import cv2
import numpy as np
import pytest
import yaml

from stream import wire
from stream.contracts import Encoding
from stream.entries import PAYLOAD_FIELD
from stream.keys import line_keys
from tests.conftest import free_port
from tests.procs import CliProcesses, processes_fixture

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

FAST_QUEUE = {"block_ms": 100, "claim_interval_s": 0.2, "claim_idle_ms": 1000, "max_deliveries": 3}


def _images(folder, n, size=(24, 32)):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        cv2.imwrite(str(folder / f"{i:04d}.png"), np.full((*size, 3), i % 256, np.uint8))
    return folder


class Procs(CliProcesses):
    """Starts ``lineinspect`` subprocesses with one settings file; kills leftovers at teardown."""

    def config(self, cameras=(), queue=None, metrics_port=None, name="settings.yaml"):
        data = {"redis": {"url": self.redis_url, "key_prefix": self.prefix},
                "queue": {**FAST_QUEUE, **(queue or {})},
                "cameras": list(cameras),
                "metrics": {"enabled": metrics_port is not None, "host": "127.0.0.1", "port": metrics_port or 0},
                "log_level": "INFO"}
        path = self.tmp / name
        path.write_text(yaml.safe_dump(data))
        return path

    def start(self, config, *args) -> subprocess.Popen:
        return self.spawn(config, *args)


procs = processes_fixture(Procs)


def _results(client, keys):
    return [wire.decode_result(fields[PAYLOAD_FIELD]) for _, fields in client.xrange(keys.results)]


def _wait(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def _pending_of(client, keys, consumer, group="workers"):
    try:
        rows = client.xpending_range(keys.frames, group, min="-", max="+", count=100, consumername=consumer)
    except Exception:
        return []
    return rows


def _frame_payload(seq, camera="hand", line="L1"):
    img = np.full((16, 16, 3), 9, np.uint8)
    return wire.encode_frame(wire.image_to_frame(img, line_id=line, camera_id=camera, seq=seq, session="42",
                                                 capture_ts=time.time(), encoding=Encoding.JPEG))


def test_two_cameras_two_workers_each_frame_once(procs, redis_client, key_prefix, tmp_path):
    n = 15
    cams = [{"id": cid, "line": "L1", "source": "folder", "path": str(_images(tmp_path / cid, n))}
            for cid in ("camA", "camB")]
    cfg = procs.config(cams)
    keys = line_keys(key_prefix, "L1")
    workers = [procs.start(cfg, "worker", "--line", "L1", "--id", wid, "--detector", "noop")
               for wid in ("w1", "w2")]
    ingests = [procs.start(cfg, "ingest", "--camera", cid) for cid in ("camA", "camB")]
    for p in ingests:
        assert p.wait(60) == 0, procs.output(p)
    _wait(lambda: redis_client.xlen(keys.results) >= 2 * n, 60, "all results")
    time.sleep(0.5)  # a duplicate, if any, would show up now
    results = _results(redis_client, keys)
    counts = collections.Counter(r.frame_id for r in results)
    assert len(counts) == 2 * n and set(counts.values()) == {1}
    for cid in ("camA", "camB"):
        assert sorted(r.seq for r in results if r.camera_id == cid) == list(range(n))
    assert {r.worker_id for r in results} <= {"w1", "w2"}
    assert all(r.verdict.value == "ok" and r.models.get("detector") == "noop" for r in results)
    assert all({"decode", "noop", "encode"} <= set(r.timings) and r.latency_s >= 0 for r in results)
    for w in workers:
        w.send_signal(signal.SIGTERM)
    for w in workers:
        assert w.wait(30) == 0, procs.output(w)
    assert redis_client.xlen(keys.frames) == 0  # acknowledged entries are deleted
    assert redis_client.xpending(keys.frames, "workers")["pending"] == 0


def test_killed_worker_frames_are_reclaimed_once(procs, redis_client, key_prefix):
    cfg = procs.config(queue={"claim_idle_ms": 800})
    keys = line_keys(key_prefix, "L1")
    victim = procs.start(cfg, "worker", "--line", "L1", "--id", "victim", "--detector", "slow:60")
    for seq in range(3):
        redis_client.xadd(keys.frames, {PAYLOAD_FIELD: _frame_payload(seq)})
    _wait(lambda: len(_pending_of(redis_client, keys, "victim")) >= 1, 30, "the victim to take a frame")
    in_hand = _pending_of(redis_client, keys, "victim")[0]["message_id"].decode()
    victim.send_signal(signal.SIGKILL)  # mid-frame: its detector sleeps 60 s
    victim.wait(10)
    rescuer = procs.start(cfg, "worker", "--line", "L1", "--id", "rescuer", "--detector", "noop")
    _wait(lambda: redis_client.xlen(keys.results) >= 3, 60, "three results")
    time.sleep(0.5)
    results = _results(redis_client, keys)
    assert sorted(r.seq for r in results) == [0, 1, 2]  # one result per frame
    assert {r.worker_id for r in results} == {"rescuer"}
    assert redis_client.xlen(keys.dead_letter) == 0
    assert in_hand not in {m["message_id"].decode() for m in _pending_of(redis_client, keys, "victim")}
    rescuer.send_signal(signal.SIGTERM)
    assert rescuer.wait(30) == 0
    assert "reclaimed" in procs.output(rescuer)


def test_slow_worker_finishing_after_reclaim_publishes_nothing(procs, redis_client, key_prefix):
    """A frame reclaimed from a slow (not dead) worker is finished by both: still exactly one result."""
    cfg = procs.config(queue={"claim_idle_ms": 300})
    keys = line_keys(key_prefix, "L1")
    slow = procs.start(cfg, "worker", "--line", "L1", "--id", "slow", "--detector", "slow:3")
    redis_client.xadd(keys.frames, {PAYLOAD_FIELD: _frame_payload(0)})
    _wait(lambda: len(_pending_of(redis_client, keys, "slow")) == 1, 30, "the slow worker to take the frame")
    fast = procs.start(cfg, "worker", "--line", "L1", "--id", "fast", "--detector", "noop")
    _wait(lambda: "already had a result" in procs.output(slow), 30, "the slow worker's duplicate")
    results = _results(redis_client, keys)
    assert len(results) == 1 and results[0].worker_id == "fast"
    for p in (slow, fast):
        p.send_signal(signal.SIGTERM)
    assert slow.wait(30) == 0 and fast.wait(30) == 0
    assert redis_client.xpending(keys.frames, "workers")["pending"] == 0


def test_corrupt_payload_is_dead_lettered_and_the_worker_goes_on(procs, redis_client, key_prefix):
    port = free_port()
    cfg = procs.config(metrics_port=port)
    keys = line_keys(key_prefix, "L1")
    worker = procs.start(cfg, "worker", "--line", "L1", "--id", "w1", "--detector", "noop")
    bad = redis_client.xadd(keys.frames, {PAYLOAD_FIELD: b"LI\x01Fnot-a-header"}).decode()
    missing = redis_client.xadd(keys.frames, {b"other": b"x"}).decode()
    redis_client.xadd(keys.frames, {PAYLOAD_FIELD: _frame_payload(5)})
    _wait(lambda: redis_client.xlen(keys.results) >= 1, 60, "the good frame's result")
    dead = {f[b"entry_id"].decode(): f for _, f in redis_client.xrange(keys.dead_letter)}
    assert set(dead) == {bad, missing}
    assert dead[bad][b"reason"].startswith(b"payload:") and b"header" in dead[bad][b"reason"]
    assert dead[bad][b"payload"] == b"LI\x01Fnot-a-header" and dead[bad][b"worker"] == b"w1"
    assert b"no 'p' field" in dead[missing][b"reason"]
    assert [r.seq for r in _results(redis_client, keys)] == [5]
    assert worker.poll() is None
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as resp:
        assert resp.status == 200
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    assert re.search(r'lineinspect_frames_dead_lettered_total\{line="L1",reason="payload"\} 2\.0', text)
    assert re.search(r'lineinspect_frames_processed_total\{line="L1"\} 1\.0', text)
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(30) == 0


def test_sigterm_drains_the_frame_in_hand(procs, redis_client, key_prefix):
    cfg = procs.config()
    keys = line_keys(key_prefix, "L1")
    worker = procs.start(cfg, "worker", "--line", "L1", "--id", "w1", "--detector", "slow:2")
    redis_client.xadd(keys.frames, {PAYLOAD_FIELD: _frame_payload(0)})
    _wait(lambda: len(_pending_of(redis_client, keys, "w1")) == 1, 30, "the frame to be in hand")
    assert redis_client.xlen(keys.results) == 0
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(30) == 0, procs.output(worker)
    results = _results(redis_client, keys)
    assert [r.seq for r in results] == [0] and results[0].worker_id == "w1"
    assert results[0].timings["sleep"] >= 1.9
    assert redis_client.xpending(keys.frames, "workers")["pending"] == 0
    assert not redis_client.hexists(keys.heartbeat, "w1")  # heartbeat removed on a clean exit


def test_bounded_stream_without_workers_counts_drops_exactly(procs, redis_client, key_prefix, tmp_path):
    sent = 40
    cam = {"id": "camA", "line": "L1", "source": "folder", "path": str(_images(tmp_path / "imgs", sent)),
           "encoding": "raw"}
    cfg = procs.config([cam], queue={"maxlen": 6, "trim": "exact"})
    ingest = procs.start(cfg, "ingest", "--camera", "camA")
    assert ingest.wait(60) == 0
    out = procs.output(ingest)
    dropped = int(re.search(r"dropped_trimmed=(\d+)", out).group(1))
    xlen = redis_client.xlen(line_keys(key_prefix, "L1").frames)
    assert xlen == 6 and dropped == sent - xlen
    assert f"enqueued={sent}" in out


def _get(url):
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError:
        return None, ""


def test_vanished_camera_is_retried_counted_and_reported(procs, redis_client, key_prefix, tmp_path):
    folder = _images(tmp_path / "imgs", 3)
    port = free_port()
    cam = {"id": "camA", "line": "L1", "source": "folder", "path": str(folder), "loop": True, "fps": 20.0,
           "reconnect_initial_s": 0.05, "reconnect_max_s": 0.2, "down_grace_s": 0.2}
    cfg = procs.config([cam], metrics_port=port)
    keys = line_keys(key_prefix, "L1")
    ingest = procs.start(cfg, "ingest", "--camera", "camA")
    _wait(lambda: redis_client.xlen(keys.frames) >= 3, 30, "frames")
    assert _get(f"http://127.0.0.1:{port}/healthz")[0] == 200
    for p in folder.iterdir():
        p.unlink()

    def reconnects():
        m = re.search(r'lineinspect_camera_reconnects_total\{camera="camA",line="L1"\} (\S+)',
                      _get(f"http://127.0.0.1:{port}/metrics")[1])
        return float(m.group(1)) if m else 0.0

    _wait(lambda: reconnects() >= 3, 30, "reconnect attempts")
    status, body = _get(f"http://127.0.0.1:{port}/healthz")
    assert status == 503 and "camera camA down" in body
    _images(folder, 2)  # the camera comes back
    before = redis_client.xlen(keys.frames)
    _wait(lambda: redis_client.xlen(keys.frames) > before + 2, 30, "frames after the camera came back")
    assert _get(f"http://127.0.0.1:{port}/healthz")[0] == 200
    ingest.send_signal(signal.SIGTERM)
    assert ingest.wait(30) == 0
    assert re.search(r"reconnects=([3-9]|\d\d+)", procs.output(ingest))


def test_job_timeout_leaves_the_frame_pending_and_exits_nonzero(procs, redis_client, key_prefix):
    cfg = procs.config(queue={"job_timeout_s": 0.5})
    keys = line_keys(key_prefix, "L1")
    worker = procs.start(cfg, "worker", "--line", "L1", "--id", "stuck", "--detector", "slow:30")
    entry = redis_client.xadd(keys.frames, {PAYLOAD_FIELD: _frame_payload(0)}).decode()
    assert worker.wait(60) == 3, procs.output(worker)  # exits although its model thread still sleeps
    assert "exceeded job_timeout_s" in procs.output(worker)
    pending = _pending_of(redis_client, keys, "stuck")
    assert [p["message_id"].decode() for p in pending] == [entry]  # left for another worker
    assert redis_client.xlen(keys.results) == 0


def test_unknown_detector_fails_to_load(procs):
    worker = procs.start(procs.config(), "worker", "--line", "L1", "--detector", "nonsense")
    assert worker.wait(60) == 2
    assert "unknown test detector" in procs.output(worker)
