"""Real RTSP cameras (GStreamer's RTSP server, deploy/rtsp_camera.py: live videotestsrc, H.264) read by a real
``lineinspect ingest`` process into the shared Redis: live capture, a server restart (reconnect counted), a
stalled stream (no frames, sockets open: reconnect, camera_up 0), camera credentials never printed."""

from __future__ import annotations

import re
import signal
import time
import urllib.request

import pytest
import yaml

from stream import wire
from stream.entries import PAYLOAD_FIELD
from stream.keys import line_keys
from tests.conftest import free_port
from tests.procs import CliProcesses, processes_fixture
from tests.rtspcam import RtspCamera, gstreamer_missing

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

SECRET = "s3cr3t-Pw"


@pytest.fixture(scope="module")
def gstreamer():
    why = gstreamer_missing()
    if why:
        pytest.skip(why)


@pytest.fixture
def camera(gstreamer, tmp_path):
    cams: list[RtspCamera] = []

    def make(**kw) -> RtspCamera:
        cams.append(RtspCamera(tmp_path, **kw))
        return cams[-1]

    yield make
    for c in cams:
        c.stop()


class Procs(CliProcesses):
    def ingest(self, url: str, metrics_port: int, fps: float = 10) -> object:
        cfg = {"redis": {"url": self.redis_url, "key_prefix": self.prefix},
               "queue": {"maxlen": 100000},
               "metrics": {"enabled": True, "host": "127.0.0.1", "port": metrics_port},
               "cameras": [{"id": "rtsp1", "line": "L1", "source": "url", "path": url, "fps": fps,
                            "reconnect_initial_s": 0.2, "reconnect_max_s": 1.0, "down_grace_s": 2}],
               "log_level": "INFO"}
        path = self.tmp / "settings.yaml"
        path.write_text(yaml.safe_dump(cfg))
        return self.spawn(path, "ingest", "--camera", "rtsp1")


procs = processes_fixture(Procs)


def metric(port: int, name: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    m = re.search(rf"^{name}\{{[^}}]*camera=\"rtsp1\"[^}}]*\}} ([0-9.e+-]+)$", text, re.M)
    return float(m.group(1)) if m else float("nan")


def wait(pred, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if pred():
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def test_live_capture_and_credentials_never_printed(camera, procs, redis_client, key_prefix):
    cam = camera(user="operator", password=SECRET)
    port = free_port()
    ing = procs.ingest(cam.url(), port)  # the camera is not up yet: failed opens are logged with the URL
    keys = line_keys(key_prefix, "L1")
    time.sleep(2.0)
    cam.start()
    wait(lambda: redis_client.xlen(keys.frames) >= 20, 60, "20 frames from the RTSP camera")
    assert metric(port, "lineinspect_camera_up") == 1.0
    metrics_text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    ing.send_signal(signal.SIGTERM)
    assert ing.wait(30) == 0
    out = procs.output(ing)
    frames = [wire.decode_frame(f[PAYLOAD_FIELD]) for _, f in redis_client.xrange(keys.frames)]
    assert len(frames) >= 20 and {tuple(f.shape[:2]) for f in frames} == {(360, 640)}
    seqs = [f.seq for f in frames]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    assert (frames[-1].capture_ts - frames[0].capture_ts) > 1.0  # live: paced at camera.fps, not a burst
    assert f"127.0.0.1:{cam.port}" in out  # the URL was logged (failed opens) ...
    assert SECRET not in out and SECRET not in metrics_text  # ... never with its password
    wrong = camera(user="operator", password=SECRET, port=free_port())
    wrong.start()
    bad = procs.ingest(wrong.url(password=SECRET + "x"), free_port())  # 401: the error names the URL
    time.sleep(4)
    bad.send_signal(signal.SIGTERM)
    bad.wait(30)
    assert SECRET not in procs.output(bad) and f"127.0.0.1:{wrong.port}" in procs.output(bad)


def test_server_restart_is_survived_and_the_reconnect_counted(camera, procs, redis_client, key_prefix):
    cam = camera()
    cam.start()
    port = free_port()
    ing = procs.ingest(cam.url(), port)
    keys = line_keys(key_prefix, "L1")
    wait(lambda: redis_client.xlen(keys.frames) >= 10, 60, "frames before the restart")
    cam.stop()
    wait(lambda: metric(port, "lineinspect_camera_up") == 0.0, 30, "camera_up 0 while the server is down")
    time.sleep(1.0)
    cam.start()
    n = redis_client.xlen(keys.frames)
    wait(lambda: redis_client.xlen(keys.frames) >= n + 10, 60, "frames after the restart")
    assert metric(port, "lineinspect_camera_up") == 1.0
    assert metric(port, "lineinspect_camera_reconnects_total") >= 1
    ing.send_signal(signal.SIGTERM)
    assert ing.wait(30) == 0
    final = procs.output(ing).strip().splitlines()[-1]
    assert int(re.search(r"reconnects=(\d+)", final).group(1)) >= 1, final
    sessions = {wire.decode_frame(f[PAYLOAD_FIELD]).session for _, f in redis_client.xrange(keys.frames)}
    assert len(sessions) == 1  # one ingest session across the camera restart


def test_stalled_stream_is_reconnected_and_camera_down(camera, procs, redis_client, key_prefix):
    cam = camera()
    cam.start()
    port = free_port()
    ing = procs.ingest(cam.url(), port)
    keys = line_keys(key_prefix, "L1")
    wait(lambda: redis_client.xlen(keys.frames) >= 10, 60, "frames before the stall")
    cam.stall()  # no more frames, the RTSP and RTP sockets stay open
    t0 = time.monotonic()
    wait(lambda: metric(port, "lineinspect_camera_up") == 0.0, 40, "camera_up 0 on a stalled stream")
    stalled_after = time.monotonic() - t0
    assert metric(port, "lineinspect_camera_reconnects_total") >= 1
    n = redis_client.xlen(keys.frames)
    time.sleep(2.0)
    assert redis_client.xlen(keys.frames) <= n + 1  # nothing new while stalled
    health = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).status
    assert health == 200
    cam.resume()
    wait(lambda: redis_client.xlen(keys.frames) >= n + 10, 60, "frames after the stream resumed")
    wait(lambda: metric(port, "lineinspect_camera_up") == 1.0, 10, "camera_up 1 again")
    ing.send_signal(signal.SIGTERM)
    assert ing.wait(30) == 0, procs.output(ing)
    print(f"stall detected after {stalled_after:.1f}s")
