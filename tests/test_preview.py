"""The WebRTC overlay preview: access control, optional dependency, the line source, and end to end in a real
headless Chromium (real Redis, real ingest process, real WebRTC via aiortc, screenshot checked for the overlay).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from fractions import Fraction
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from config.settings import RedisSettings
from stream.contracts import Defect, Encoding, InspectionResult, Verdict
from stream.entries import PAYLOAD_FIELD
from stream.keys import line_keys, lines_index
from stream.wire import encode_frame, encode_label_mask, encode_result, image_to_frame
from tests.browser import Cdp
from tests.browser import chromium_path as _chromium
from tests.browser import stop_process as _stop
from tests.browser import wait_devtools_port as _wait_devtools_port
from tests.conftest import ROOT, free_port

pytest.importorskip("aiortc", reason="preview tests need lineinspect[preview]")
pytest.importorskip("aiohttp")

from stream.preview.access import presented_token, token_matches  # noqa: E402
from stream.preview.options import PreviewOptions  # noqa: E402
from stream.preview.render import VIDEO_CLOCK  # noqa: E402
from stream.preview.server import PreviewServer  # noqa: E402
from stream.preview.source import LineSource  # noqa: E402

TOKEN = "s3cret-preview-token"
PY = sys.executable


def _magenta_like(img: np.ndarray) -> np.ndarray:
    b, g, r = (img[..., i].astype(int) for i in range(3))
    return (b - g > 30) & (r - g > 30)


def _defect_result(frame_id: str, line: str, camera: str, seq: int, ts: float, shape: tuple[int, int],
                   box: tuple[int, int, int, int]) -> InspectionResult:
    """A defect result whose label mask is the ellipse inscribed in ``box``."""
    labels = np.zeros(shape, np.uint8)
    x0, y0, x1, y1 = box
    cv2.ellipse(labels, ((x0 + x1 - 1) // 2, (y0 + y1 - 1) // 2), ((x1 - x0) // 2, (y1 - y0) // 2), 0, 0, 360,
                1, -1)
    return InspectionResult(
        frame_id=frame_id, line_id=line, camera_id=camera, seq=seq, capture_ts=ts, image_score=0.93,
        threshold=0.5, verdict=Verdict.DEFECT,
        defects=(Defect(label=1, box=box, area=int(labels.sum()), score=0.9),),
        mask_png=encode_label_mask(labels), worker_id="test", processed_ts=time.time())


def _ok_result(frame_id: str, line: str, camera: str, seq: int, ts: float) -> InspectionResult:
    return InspectionResult(frame_id=frame_id, line_id=line, camera_id=camera, seq=seq, capture_ts=ts,
                            image_score=0.1, threshold=0.5, verdict=Verdict.OK, worker_id="test",
                            processed_ts=time.time())


def _options(redis_url: str, prefix: str, **kw) -> PreviewOptions:
    return PreviewOptions(redis=RedisSettings(url=redis_url, key_prefix=prefix), host="127.0.0.1", port=0, token=TOKEN,
                          **kw)


# ------------------------------------------------------------------------------------------ optional dep


def test_importing_stream_modules_pulls_in_no_webrtc_or_torch():
    code = ("import sys, stream.preview.run, stream.overlay, stream.cli; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'aiortc', 'av', 'torch', 'aiohttp'}))")
    out = subprocess.run([PY, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_preview_without_aiortc_says_what_to_install():
    # sys.modules[name] = None makes `import aiortc` fail exactly as if it were not installed
    code = ("import sys; sys.modules['aiortc'] = None; from stream.cli import main; "
            "sys.exit(main(['--set', 'preview.token=abc', 'preview']))")
    out = subprocess.run([PY, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 3, out.stderr
    assert "pip install 'lineinspect[preview]'" in out.stderr


def test_preview_refuses_to_start_without_a_token():
    env = {k: v for k, v in os.environ.items() if not k.startswith("LINEINSPECT__")}
    out = subprocess.run([PY, "-m", "stream.cli", "preview"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120, env=env)
    assert out.returncode == 2
    assert "preview.token" in out.stderr
    with pytest.raises(Exception, match="token"):
        PreviewOptions(redis=RedisSettings(url="redis://x", key_prefix="x"), host="127.0.0.1", port=0, token="")


# ------------------------------------------------------------------------------------------ access


def test_token_is_taken_from_header_bearer_or_query_and_compared_exactly():
    assert presented_token({"X-Preview-Token": "a"}, {"token": "b"}) == "a"
    assert presented_token({"Authorization": "Bearer  xyz "}, {}) == "xyz"
    assert presented_token({}, {"token": "q"}) == "q"
    assert presented_token({"Authorization": "Basic Zm9v"}, {}) is None
    assert token_matches(TOKEN, TOKEN)
    assert not token_matches(TOKEN + "x", TOKEN)
    assert not token_matches(TOKEN[:-1], TOKEN)
    assert not token_matches(None, TOKEN)
    assert not token_matches("", "")  # an empty configured token never opens anything


def test_http_access_control_and_no_open_cors(redis_url, key_prefix, redis_client):
    import aiohttp

    redis_client.sadd(lines_index(key_prefix), "lineB", "lineA")

    async def scenario():
        server = PreviewServer(_options(redis_url, key_prefix))
        port = await server.start()
        base = f"http://127.0.0.1:{port}"
        origin = {"Origin": "http://evil.example"}
        try:
            async with aiohttp.ClientSession() as http:
                async def status(method, path, headers=None, **kw):
                    async with http.request(method, base + path, headers=headers or {}, **kw) as r:
                        assert "Access-Control-Allow-Origin" not in r.headers
                        return r.status, await r.read(), r.headers

                assert (await status("GET", "/", origin))[0] == 401
                assert (await status("GET", "/?token=wrong", origin))[0] == 403
                assert (await status("GET", "/api/lines"))[0] == 401
                assert (await status("POST", "/api/offer", json={"line": "lineA"}))[0] == 401
                assert (await status("POST", "/api/offer", {"X-Preview-Token": "nope"}, json={}))[0] == 403
                assert (await status("OPTIONS", "/api/offer", {**origin,
                                     "Access-Control-Request-Method": "POST"}))[0] in (401, 403, 405)
                assert (await status("GET", "/nonexistent"))[0] == 401

                code, body, headers = await status("GET", f"/?token={TOKEN}", origin)
                assert code == 200 and b"<video" in body
                assert headers["Referrer-Policy"] == "no-referrer"
                code, body, _ = await status("GET", "/api/lines", {"X-Preview-Token": TOKEN})
                assert code == 200 and json.loads(body)["lines"] == ["lineA", "lineB"]
                code, body, _ = await status("GET", "/api/lines", {"Authorization": f"Bearer {TOKEN}"})
                assert code == 200
                # signalling: a line that ingest never registered, and a malformed body
                code, body, _ = await status("POST", "/api/offer", {"X-Preview-Token": TOKEN},
                                             json={"line": "nope", "sdp": "v=0", "type": "offer"})
                assert code == 404
                code, _, _ = await status("POST", "/api/offer", {"X-Preview-Token": TOKEN}, data=b"{not json")
                assert code == 400
                code, _, _ = await status("POST", "/api/offer", {"X-Preview-Token": TOKEN},
                                          json={"line": "lineA", "sdp": "garbage", "type": "offer"})
                assert code == 400 and not server.peers and not server.sources  # nothing leaked
                # the page's script is public (it carries no data) and never contains the token
                code, body, _ = await status("GET", "/static/preview.js")
                assert code == 200 and TOKEN.encode() not in body
        finally:
            await server.stop()

    asyncio.run(scenario())


# ------------------------------------------------------------------------------------------ line source


def test_line_source_draws_matched_results_keeps_capture_timing_and_skips_to_newest(redis_url, key_prefix,
                                                                                      redis_client, demo_data):
    import redis.asyncio as aioredis

    line, cam = "lineS", "cam0"
    keys = line_keys(key_prefix, line)
    img = cv2.imread(str(demo_data / "train" / "good" / "00.jpg"))
    h, w = img.shape[:2]
    box = (300, 320, 420, 440)

    def frame(seq: int, ts: float):
        return image_to_frame(img, line_id=line, camera_id=cam, seq=seq, session="1", capture_ts=ts,
                              encoding=Encoding.JPEG)

    # an old frame already in the stream is never shown: the source reads from "$"
    redis_client.xadd(keys.frames, {PAYLOAD_FIELD: encode_frame(frame(0, 1000.0))})

    async def scenario():
        client = aioredis.Redis.from_url(redis_url)
        src = LineSource(client, keys, _options(redis_url, key_prefix, result_wait_s=2.0, block_ms=200))
        src.start()
        try:
            await asyncio.sleep(0.3)
            assert src.frames_out == 0
            # a frame whose result comes 0.3 s later is held for it and drawn with it (matched by frame id)
            f1 = frame(1, 1000.5)
            await client.xadd(keys.frames, {PAYLOAD_FIELD: encode_frame(f1)})
            await asyncio.sleep(0.3)
            assert src.frames_out == 0
            res = _defect_result(f1.frame_id, line, cam, 1, f1.capture_ts, (h, w), box)
            await client.xadd(keys.results, {PAYLOAD_FIELD: encode_result(res)})
            rendered, seen = await asyncio.wait_for(src.wait_newer(0), 5)
            assert src.matched == 1 and rendered.frame_id == f1.frame_id
            video = rendered.to_video_frame()
            first_pts = video.pts
            assert video.time_base == Fraction(1, VIDEO_CLOCK) and first_pts == 0
            assert rendered.to_video_frame() is not video  # every viewer gets its own frame object
            out = video.to_ndarray(format="bgr24")
            assert out.shape == (h, w, 3)
            mag = _magenta_like(out)
            x0, y0, x1, y1 = box
            assert mag[y0 + 30:y1 - 30, x0 + 30:x1 - 30].mean() > 0.9
            mag[y0 - 20:y1 + 20, x0 - 20:x1 + 20] = False
            assert mag.mean() < 0.001
            # a burst of 10 frames while the source waits: only the newest is rendered, with the latest
            # result of its camera (its own result never comes), and pts follow capture time (2.5 s later)
            pipe = client.pipeline()
            for seq in range(2, 12):
                pipe.xadd(keys.frames, {PAYLOAD_FIELD: encode_frame(frame(seq, 1001.0 + 0.2 * (seq - 2)))})
            await pipe.execute()
            rendered, seen = await asyncio.wait_for(src.wait_newer(seen), 10)
            video = rendered.to_video_frame()
            assert rendered.frame_id.endswith(":11")
            assert video.pts - first_pts == round((1001.0 + 1.8 - 1000.5) * VIDEO_CLOCK)
            assert src.skipped == 9 and src.frames_out == 2 and src.matched == 1
            assert _magenta_like(video.to_ndarray(format="bgr24"))[y0 + 30:y1 - 30, x0 + 30:x1 - 30].mean() > 0.9
        finally:
            await src.stop()
            await client.aclose()
        assert not src.running
        assert await asyncio.wait_for(src.wait_newer(seen), 2) == (None, seen)

    asyncio.run(scenario())


def test_render_frame_scales_big_frames_and_their_overlay_together(demo_data):
    from stream.preview.render import render_frame

    img = cv2.resize(cv2.imread(str(demo_data / "train" / "good" / "03.jpg")), (1919, 1081))
    f = image_to_frame(img, line_id="l", camera_id="c", seq=0, session="1", capture_ts=1.0)
    box = (1200, 500, 1500, 800)
    res = _defect_result(f.frame_id, "l", "c", 0, 1.0, (1081, 1919), box)
    out = render_frame(f, res, 9.5, 960)
    oh, ow = out.shape[:2]
    assert 950 <= ow <= 960 and ow % 2 == 0 and oh % 2 == 0  # longer side <= 960, even sides (yuv420p)
    assert abs(ow / oh - 1919 / 1081) < 0.01
    s = ow / 1919
    x0, y0, x1, y1 = (round(v * s) for v in box)
    mag = _magenta_like(out)
    assert mag[y0 + 12:y1 - 12, x0 + 40:x1 - 40].mean() > 0.9
    mag[y0 - 10:y1 + 10, x0 - 10:x1 + 10] = False
    assert mag.mean() < 0.001
    # the box is drawn at the scaled place (yellow on its left edge)
    assert np.abs(out[(y0 + y1) // 2, x0 - 1:x0 + 2].astype(int) - (0, 255, 255)).sum(axis=1).min() < 60
    assert render_frame(f, res, None, 0).shape == (1080, 1918, 3)  # no scaling, still even


async def _shown_after(client, src, frames_key: str, payload, seen: int, seqs):
    """Add frames ``payload(seq)`` until the source shows one newer than counter ``seen``: it reads from the
    stream's end, so a frame added before its next read is, rightly, not shown (on a busy machine that read can
    be late). The shown frame and its counter, or ``(None, seen)``."""
    for seq in seqs:
        await client.xadd(frames_key, {PAYLOAD_FIELD: payload(seq)})
        try:
            return await asyncio.wait_for(src.wait_newer(seen), 0.5)
        except asyncio.TimeoutError:
            continue
    return None, seen


def test_line_source_survives_a_redis_restart(own_redis, demo_data):
    """Redis goes away while a viewer watches: the source retries, then shows the frames that come after."""
    import redis.asyncio as aioredis

    line, cam = "lineR", "cam0"
    keys = line_keys("lip", line)
    img = cv2.imread(str(demo_data / "train" / "good" / "02.jpg"))

    def payload(seq: int) -> bytes:
        return encode_frame(image_to_frame(img, line_id=line, camera_id=cam, seq=seq, session="7",
                                           capture_ts=2000.0 + seq, encoding=Encoding.JPEG))

    async def scenario():
        client = aioredis.Redis.from_url(own_redis.url, socket_connect_timeout=1)
        src = LineSource(client, keys, _options(own_redis.url, "lip", result_wait_s=0.0, block_ms=200))
        src.start()
        try:
            first, seen = await _shown_after(client, src, keys.frames, payload, 0, range(100, 160))
            assert first is not None and first.frame_id.startswith("cam0:7:1")
            own_redis.stop()
            await asyncio.sleep(1.5)
            assert src.running, "the source must keep retrying, not die"
            own_redis.start()
            got, seen = await _shown_after(client, src, keys.frames, payload, seen, range(200, 260))  # reconnected
            assert got is not None and got.frame_id.startswith("cam0:7:")
            assert got.pts > first.pts
        finally:
            await src.stop()
            await client.aclose()

    asyncio.run(scenario())


def test_line_source_survives_an_unserved_slot_on_a_cluster(redis_cluster, demo_data):
    """On a Redis Cluster, the line's slot without a master (CLUSTER DELSLOTS, then ADDSLOTS) is Redis being
    down for the preview too: the source keeps retrying (it ended on CLUSTERDOWN before, which is not a
    connection error) and shows the frames that come after."""
    import redis

    from stream.keys import key_slot
    from stream.redisclient import make_client

    line, cam = "lineC", "cam0"
    keys = line_keys("lip", line, "line_tag")
    slot = key_slot(keys.frames)
    owner = redis.Redis(port=redis_cluster.port_of_slot(slot), socket_timeout=2)
    img = cv2.imread(str(demo_data / "train" / "good" / "02.jpg"))
    rs = RedisSettings(url=redis_cluster.url, key_prefix="lip", key_layout="line_tag", socket_timeout_s=1.0)

    def payload(seq: int) -> bytes:
        return encode_frame(image_to_frame(img, line_id=line, camera_id=cam, seq=seq, session="7",
                                           capture_ts=2000.0 + seq, encoding=Encoding.JPEG))

    async def scenario():
        client = make_client(rs, asyncio=True)
        src = LineSource(client, keys, PreviewOptions(redis=rs, host="127.0.0.1", port=0, token=TOKEN,
                                                      result_wait_s=0.0, block_ms=200))
        src.start()
        try:
            first, seen = await _shown_after(client, src, keys.frames, payload, 0, range(100, 160))
            assert first is not None
            owner.execute_command("CLUSTER", "DELSLOTS", slot)
            await asyncio.sleep(2.0)
            assert src.running, "the source must keep retrying, not end"
            owner.execute_command("CLUSTER", "ADDSLOTS", slot)
            got, seen = await _shown_after(client, src, keys.frames, payload, seen, range(200, 280))
            assert got is not None and got.pts > first.pts
        finally:
            await src.stop()
            await client.aclose()

    try:
        asyncio.run(scenario())
    finally:
        if slot not in [s for r in owner.execute_command("CLUSTER", "SLOTS") for s in range(r[0], r[1] + 1)]:
            owner.execute_command("CLUSTER", "ADDSLOTS", slot)
        owner.close()


# ------------------------------------------------------------------------------------------ end to end


WAIT_FRAMES_JS = """new Promise((resolve) => {
  const t0 = Date.now();
  const tick = () => {
    const v = document.getElementById('video');
    const q = v && v.getVideoPlaybackQuality ? v.getVideoPlaybackQuality() : null;
    if (q && q.totalVideoFrames > %d && v.currentTime > 0) return resolve(true);
    if (Date.now() - t0 > 90000) return resolve(false);
    setTimeout(tick, 200);
  };
  tick();
})"""

SHOT_GEOMETRY_JS = """(() => {
  const v = document.getElementById('video');
  const vw = v.videoWidth, vh = v.videoHeight;  // read once: a WebRTC video's size can change mid-script
  v.style.maxWidth = 'none';
  v.style.width = vw + 'px'; v.style.height = vh + 'px';
  const r = v.getBoundingClientRect();
  return {x: r.left + window.scrollX, y: r.top + window.scrollY, w: r.width, h: r.height, vw: vw, vh: vh};
})()"""
VIDEO_SIZE_JS = "(() => { const v = document.getElementById('video'); return [v.videoWidth, v.videoHeight]; })()"


async def _screenshot(cdp: Cdp, tries: int = 20) -> tuple[dict, np.ndarray]:
    """The <video> element at its intrinsic size (1 screenshot pixel = 1 frame pixel). One demo frame of 28
    is 522 px high, the others 512: a capture while the stream switches size is taken again."""
    for _ in range(tries):
        geom = await cdp.js(SHOT_GEOMETRY_JS)
        await asyncio.sleep(0.5)
        before = await cdp.js(VIDEO_SIZE_JS)
        cap = await cdp.call("Page.captureScreenshot", {"format": "png", "clip": {
            "x": geom["x"], "y": geom["y"], "width": geom["w"], "height": geom["h"], "scale": 1}})
        after = await cdp.js(VIDEO_SIZE_JS)
        if before == after == [geom["vw"], geom["vh"]]:
            break
    return geom, cv2.imdecode(np.frombuffer(base64.b64decode(cap["data"]), np.uint8), cv2.IMREAD_COLOR)


async def _viewers(http, base: str) -> dict:
    async with http.get(base + "/api/lines", headers={"X-Preview-Token": TOKEN}) as r:
        assert r.status == 200
        return (await r.json())["viewers"]


async def _wait_viewers(http, base: str, expected: dict, timeout: float = 20.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        got = await _viewers(http, base)
        if got == expected or time.monotonic() > deadline:
            return got
        await asyncio.sleep(0.2)


def _last_result(client, prefix: str, line: str) -> InspectionResult | None:
    from stream.wire import decode_result

    entries = client.xrevrange(line_keys(prefix, line).results, count=1)
    return decode_result(entries[0][1][PAYLOAD_FIELD]) if entries else None


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_end_to_end_in_headless_chromium(redis_url, key_prefix, redis_client, demo_data):
    """ingest process -> Redis -> worker process (``--detector box:...``: reports a defect at a known place,
    then a ``--detector noop`` worker that reports OK) -> preview process -> WebRTC -> headless Chromium; the
    screenshot shows the overlay colour exactly where the worker reported the defect, and none once the
    worker reports OK."""
    import aiohttp

    chromium = _chromium()
    line, cam = "line1", "cam0"
    box = (300, 300, 430, 420)  # x0, y0, x1, y1 in the demo frames (512 wide)
    tmp = Path(tempfile.mkdtemp(prefix="li-preview-"))
    cfg = tmp / "settings.yaml"
    port = free_port()
    cfg.write_text(yaml.safe_dump({
        "redis": {"url": redis_url, "key_prefix": key_prefix},
        "metrics": {"port": 0},
        "preview": {"host": "127.0.0.1", "port": port, "token": TOKEN},
        "cameras": [{"id": cam, "line": line, "source": "folder", "loop": True, "fps": 8.0,
                     "path": str(demo_data / "train" / "good")}],
    }))
    env = {k: v for k, v in os.environ.items() if not k.startswith("LINEINSPECT__")}
    env["PYTHONUNBUFFERED"] = "1"
    procs: list[subprocess.Popen] = []
    browser = None
    logs = {name: open(tmp / f"{name}.log", "w+") for name in ("preview", "ingest", "worker", "chromium")}  # noqa: SIM115

    def spawn(name: str, *args: str) -> subprocess.Popen:
        p = subprocess.Popen([PY, "-m", "stream.cli", "--config", str(cfg), *args], cwd=ROOT, env=env,
                             stdout=logs[name], stderr=subprocess.STDOUT)
        procs.append(p)
        return p

    def dump_logs() -> str:
        out = []
        for name, fh in logs.items():
            fh.flush()
            fh.seek(0)
            out.append(f"--- {name}\n{fh.read()[-3000:]}")
        return "\n".join(out)

    try:
        preview = spawn("preview", "preview")
        box_worker = spawn("worker", "worker", "--line", line, "--id", "boxworker", "--detector",
                           "box:" + ",".join(str(v) for v in box))
        spawn("ingest", "ingest", "--camera", cam)
        results_key = line_keys(key_prefix, line).results
        deadline = time.monotonic() + 60
        while not redis_client.sismember(lines_index(key_prefix), line) or redis_client.xlen(results_key) < 3:
            assert time.monotonic() < deadline, "ingest did not register its line / no frames\n" + dump_logs()
            assert preview.poll() is None, dump_logs()
            time.sleep(0.2)

        profile = tmp / "profile"
        browser = subprocess.Popen(
            [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--autoplay-policy=no-user-gesture-required", "--disable-background-timer-throttling",
             "--disable-renderer-backgrounding", "--disable-backgrounding-occluded-windows",
             f"--user-data-dir={profile}",
             "--remote-debugging-port=0", "--window-size=1000,800", "about:blank"],
            stdout=logs["chromium"], stderr=subprocess.STDOUT)
        dev_port = _wait_devtools_port(profile, browser)
        page_url = f"http://127.0.0.1:{port}/?token={TOKEN}&line={line}"
        base = f"http://127.0.0.1:{port}"
        devtools = f"http://127.0.0.1:{dev_port}"

        async def scenario() -> tuple[np.ndarray, np.ndarray]:
            async with aiohttp.ClientSession() as http:
                ready_by = time.monotonic() + 60
                while True:  # the preview process is up once it answers (with 401: no token)
                    try:
                        async with http.get(base + "/api/lines"):
                            break
                    except aiohttp.ClientConnectionError:
                        assert preview.poll() is None, dump_logs()
                        assert time.monotonic() < ready_by, "preview does not answer\n" + dump_logs()
                        await asyncio.sleep(0.2)
                # access control against the running process
                async with http.get(base + "/") as r:
                    assert r.status == 401
                async with http.get(base + "/api/lines", headers={"X-Preview-Token": "x" + TOKEN}) as r:
                    assert r.status == 403
                    assert "Access-Control-Allow-Origin" not in r.headers

                async with http.get(devtools + "/json/list") as r:
                    page = next(t for t in await r.json() if t.get("type") == "page")
                async with http.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=64 << 20) as ws:
                    cdp = Cdp(ws)
                    await cdp.call("Emulation.setDeviceMetricsOverride",
                                   {"width": 1000, "height": 800, "deviceScaleFactor": 1, "mobile": False})
                    await cdp.call("Page.navigate", {"url": page_url})
                    await cdp.wait_loaded(base)
                    ok = await cdp.js(WAIT_FRAMES_JS % 12, timeout=100)
                    state = await cdp.js("JSON.stringify(window.previewState)")
                    assert ok, f"no decoded video frames; page state {state}\n" + dump_logs()
                    geom, defect_shot = await _screenshot(cdp)
                    save = os.environ.get("LINEINSPECT_PREVIEW_SCREENSHOT")
                    if save:  # the whole page, for the README (stream/preview_static/screenshot.png)
                        cap = await cdp.call("Page.captureScreenshot", {"format": "png", "clip": {
                            "x": 0, "y": 0, "width": 1000, "height": geom["y"] + geom["h"] + 40, "scale": 1}})
                        Path(save).write_bytes(base64.b64decode(cap["data"]))
                    # 1 screenshot pixel = 1 frame pixel (the demo frames are 512 wide, 512 or 522 high)
                    assert (geom["vw"], geom["vh"]) == (geom["w"], geom["h"]) == defect_shot.shape[1::-1], geom

                    # a second viewer of the same line shares its source (one reader per line)
                    async with http.get(devtools + "/json/version") as r:
                        browser_ws = (await r.json())["webSocketDebuggerUrl"]
                    async with http.ws_connect(browser_ws, max_msg_size=64 << 20) as bws:
                        bcdp = Cdp(bws)
                        # its own window, so that neither page is a hidden background tab
                        second = (await bcdp.call("Target.createTarget", {"url": page_url, "newWindow": True}))
                        async with http.get(devtools + "/json/list") as r:
                            target = next(t for t in await r.json() if t.get("id") == second["targetId"])
                        async with http.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=64 << 20) as ws2:
                            cdp2 = Cdp(ws2)
                            await cdp2.wait_loaded(base)
                            # decoded by its WebRTC receiver (a window in the background may not paint)
                            stats2: dict = {}
                            for _ in range(300):
                                stats2 = await cdp2.js("window.previewStats()") or {}
                                if stats2.get("framesDecoded", 0) > 3:
                                    break
                                await asyncio.sleep(0.2)
                            state2 = await cdp2.js("JSON.stringify(window.previewState)")
                            assert stats2.get("framesDecoded", 0) > 3, f"second viewer: {state2} {stats2}\n" + dump_logs()
                            assert await _wait_viewers(http, base, {line: 2}) == {line: 2}
                        await bcdp.call("Target.closeTarget", {"targetId": second["targetId"]})
                    assert await _wait_viewers(http, base, {line: 1}) == {line: 1}, "closed tab's peer kept"

                    # a real worker process takes over and finds nothing: the overlay goes away
                    box_worker.terminate()
                    assert await asyncio.get_running_loop().run_in_executor(None, box_worker.wait, 30) == 0
                    worker = spawn("worker", "worker", "--line", line, "--id", "okworker", "--detector", "noop")
                    by = time.monotonic() + 90
                    while True:
                        last = _last_result(redis_client, key_prefix, line)
                        if last is not None and last.worker_id == "okworker":
                            break
                        assert worker.poll() is None and time.monotonic() < by, "no worker result\n" + dump_logs()
                        await asyncio.sleep(0.2)
                    assert last.verdict is Verdict.OK and not last.defects
                    await asyncio.sleep(2.0)
                    _, ok_shot = await _screenshot(cdp)
                    # leaving the page closes the peer; the preview stops reading the line
                    await cdp.call("Page.navigate", {"url": "about:blank"})
                    assert await _wait_viewers(http, base, {}) == {}, "peer not closed after the page left"
                    # back again, then the preview is shut down (SIGTERM) under a connected viewer:
                    # it exits cleanly and the browser sees its peer go away
                    await cdp.call("Page.navigate", {"url": page_url})
                    await cdp.wait_loaded(base)
                    assert await cdp.js(WAIT_FRAMES_JS % 3, timeout=100), dump_logs()
                    assert await _viewers(http, base) == {line: 1}
                    preview.terminate()
                    code = await asyncio.get_running_loop().run_in_executor(None, preview.wait, 30)
                    assert code == 0, dump_logs()
                    conn = None
                    for _ in range(100):
                        conn = await cdp.js("window.previewState.connection")
                        if conn != "connected":
                            break
                        await asyncio.sleep(0.2)
                    assert conn in ("closed", "failed", "disconnected"), conn
                return defect_shot, ok_shot

        defect_shot, ok_shot = asyncio.run(scenario())
        assert defect_shot.shape[1] == ok_shot.shape[1] == 512
        x0, y0, x1, y1 = box
        cx, cy, rx, ry = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, (y1 - y0) / 2
        yy, xx = np.mgrid[0:defect_shot.shape[0], 0:512]
        inside = ((xx - cx) / (rx - 12)) ** 2 + ((yy - cy) / (ry - 12)) ** 2 <= 1  # well inside the mask
        near = np.zeros(defect_shot.shape[:2], bool)
        near[max(0, y0 - 16):y1 + 16, max(0, x0 - 16):x1 + 16] = True
        below_banner = yy > 60
        mag = _magenta_like(defect_shot)
        # the overlay colour is where the worker reported the defect ...
        assert mag[inside].mean() > 0.85, f"magenta inside the defect: {mag[inside].mean():.3f}"
        # ... and nowhere else (the banner at the top is dark, not magenta)
        assert mag[~near & below_banner].mean() < 0.002, f"magenta elsewhere: {mag[~near & below_banner].mean()}"
        # the frame itself is there (the hazelnut photo, not a blank video)
        assert defect_shot[~near & below_banner].std() > 10
        # once the real worker's results say OK, no defect overlay anywhere, but the frames still come
        assert _magenta_like(ok_shot).mean() < 0.002
        assert ok_shot[ok_shot.shape[0] // 8:].std() > 10
    finally:
        _stop(browser)
        for p in procs:
            _stop(p)
        for fh in logs.values():
            fh.close()
        shutil.rmtree(tmp, ignore_errors=True)
