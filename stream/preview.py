"""``lineinspect preview``: live camera frames with the latest defect overlay, over WebRTC.

An aiohttp server (built with aiortc) for operators:

- ``GET /?token=T`` a small page listing the lines (Redis set ``lines_index(prefix)``); opening a line (or
  ``/?token=T&line=L``) starts a WebRTC video track of that line's frames with results drawn on them;
- ``GET /api/lines`` the lines as JSON, ``POST /api/offer`` the signalling (SDP offer in, answer out);
- ``/static/`` the page's script and style (no data in them, served without the token).

Access: every route but ``/static/`` needs ``settings.preview.token``, given as the ``token`` query parameter,
an ``X-Preview-Token`` header or ``Authorization: Bearer``; compared in constant time. No token -> 401,
wrong token -> 403. The server refuses to start with an empty token and sends no CORS headers.

Media: one :class:`LineSource` per (line, camera filter) reads the line's frames stream with a blocking
``XREAD`` from ``$`` (never the workers' consumer group, so it takes no frames from them; workers ``XDEL``
processed entries, which is why it must read them as they arrive) together with the results stream. When
it falls behind it skips to the newest frame. A frame is drawn with the result of the same frame id when
that result arrives within ``result_wait_s``, else with the latest result of its camera. Frames keep their
timing: ``pts`` comes from the capture time (90 kHz clock). The rendered frame is fanned out to every viewer
of the line; a source stops when its last viewer leaves. Peers are closed when their connection fails or
closes and on shutdown.

aiortc and PyAV are optional (``pip install 'lineinspect[preview]'``): they are imported only inside the
functions that need them, so importing this module never pulls them in.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import hmac
import json
import logging
import signal
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from config.settings import Settings
from stream.backoff import Backoff
from stream.contracts import Frame, InspectionResult, LineInspectError, PayloadError, QueueUnavailableError
from stream.keys import LineKeys, line_keys, lines_index
from stream.queue import PAYLOAD_FIELD
from stream.redact import redact_text, redact_url
from stream.redisclient import tls_kwargs
from stream.wire import decode_frame, decode_result, frame_to_image

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'lineinspect[preview]'"
STATIC_DIR = Path(__file__).with_name("preview_static")
TOKEN_HEADER = "X-Preview-Token"
VIDEO_CLOCK = 90000  # RTP video clock rate: pts units per second
PUBLIC_PREFIX = "/static/"
REDIS_RETRY_INITIAL_S = 0.5
REDIS_RETRY_MAX_S = 5.0
SECURITY_HEADERS = {
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",  # the page URL carries the token
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": "default-src 'self'; media-src 'self' blob:; img-src 'self' data:; "
                               "frame-ancestors 'none'",
}


class PreviewUnavailable(LineInspectError):
    """The optional WebRTC dependencies (aiortc, PyAV) are not installed."""


class PreviewConfigError(LineInspectError):
    """The preview cannot start with these settings (e.g. no token)."""


@dataclass(frozen=True)
class PreviewOptions:
    redis_url: str
    key_prefix: str
    host: str
    port: int
    token: str
    max_side: int = 1280  # frames are downscaled so that their longer side is at most this (0 = never)
    result_wait_s: float = 0.25  # hold a frame this long for the result of the same frame id
    block_ms: int = 1000
    max_viewers: int = 32
    socket_timeout_s: float = 5.0
    redis_tls: tuple[tuple[str, str], ...] = ()  # redis-py TLS keyword arguments (stream.redisclient.tls_kwargs)
    key_layout: str = "plain"  # redis.key_layout
    redis: Any = None  # the RedisSettings (cluster, TLS) when built from settings: the client is make_client's

    def __post_init__(self) -> None:
        if not self.token:
            raise PreviewConfigError(
                "preview.token is empty: set one (e.g. LINEINSPECT__PREVIEW__TOKEN=$(openssl rand -hex 16)); "
                "the preview refuses to start without a token")
        if self.max_side < 0 or self.result_wait_s < 0 or self.block_ms <= 0 or self.max_viewers <= 0:
            raise PreviewConfigError(
                f"bad preview options: max_side={self.max_side} result_wait_s={self.result_wait_s} "
                f"block_ms={self.block_ms} max_viewers={self.max_viewers}")

    @classmethod
    def from_settings(cls, settings: Settings, args: argparse.Namespace | None = None) -> PreviewOptions:
        extra: dict[str, Any] = {}
        if args is not None:
            if getattr(args, "max_side", None) is not None:
                extra["max_side"] = int(args.max_side)
            if getattr(args, "result_wait_ms", None) is not None:
                extra["result_wait_s"] = float(args.result_wait_ms) / 1000.0
            if getattr(args, "max_viewers", None) is not None:
                extra["max_viewers"] = int(args.max_viewers)
        return cls(redis_url=settings.redis.url, key_prefix=settings.redis.key_prefix,
                   host=settings.preview.host, port=settings.preview.port, token=settings.preview.token,
                   socket_timeout_s=settings.redis.socket_timeout_s,
                   redis_tls=tuple(tls_kwargs(settings.redis).items()), key_layout=settings.redis.key_layout,
                   redis=settings.redis, **extra)


def require_webrtc() -> None:
    """Raise :class:`PreviewUnavailable` with the install hint when aiortc or PyAV cannot be imported."""
    try:
        import aiohttp  # noqa: F401
        import aiortc  # noqa: F401
        import av  # noqa: F401
    except ImportError as exc:
        raise PreviewUnavailable(
            f"the WebRTC preview needs aiortc, PyAV and aiohttp ({exc}); install them with: {INSTALL_HINT}") \
            from None


# ------------------------------------------------------------------------------------------ access


def presented_token(headers: Any, query: Any) -> str | None:
    """The token a request presents: ``X-Preview-Token``, ``Authorization: Bearer``, or ``?token=``."""
    value = headers.get(TOKEN_HEADER)
    if value:
        return value
    auth = headers.get("Authorization", "")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip()
    value = query.get("token")
    return value or None


def token_matches(given: str | None, expected: str) -> bool:
    """Constant-time comparison; an empty expected token never matches."""
    if not expected or given is None:
        return False
    return hmac.compare_digest(given.encode("utf-8"), expected.encode("utf-8"))


# ------------------------------------------------------------------------------------------ media


def _payload(fields: dict[bytes, bytes] | None) -> bytes | None:
    return (fields or {}).get(PAYLOAD_FIELD)


def _sid(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


async def _last_id(client: Any, stream: str) -> str:
    """The last id ever generated in ``stream`` (so XREAD gets only newer entries); ``0-0`` when absent."""
    import redis

    try:
        info = await client.xinfo_stream(stream)
    except redis.ResponseError:  # no such key yet: everything that comes is new
        return "0-0"
    return _sid(info.get("last-generated-id") or info.get(b"last-generated-id") or "0-0")


class FpsMeter:
    """Frames per second from capture timestamps (exponential moving average of the intervals)."""

    def __init__(self, alpha: float = 0.2):
        self.alpha = alpha
        self._last: float | None = None
        self._dt: float | None = None

    def update(self, ts: float) -> float | None:
        if self._last is not None and ts > self._last:
            dt = ts - self._last
            self._dt = dt if self._dt is None else (1 - self.alpha) * self._dt + self.alpha * dt
        self._last = ts
        return 1.0 / self._dt if self._dt else None


def render_frame(frame: Frame, result: InspectionResult | None, fps: float | None, max_side: int):
    """Decode ``frame``, scale it to even sizes with the longer side <= ``max_side`` (0 = keep), then draw
    ``result`` on it (boxes scaled along; the mask is resized by the overlay). Returns a BGR image."""
    import math

    import cv2

    from stream.overlay import draw_overlay

    img = frame_to_image(frame)
    h, w = img.shape[:2]
    scale = min(1.0, max_side / max(h, w)) if max_side else 1.0
    nw, nh = max(2, int(w * scale) // 2 * 2), max(2, int(h * scale) // 2 * 2)  # yuv420p needs even sizes
    if (nw, nh) != (w, h):
        img = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_AREA)
        if result is not None and result.defects:
            sx, sy = nw / w, nh / h
            result = dataclasses.replace(result, defects=tuple(
                dataclasses.replace(d, box=(int(d.box[0] * sx), int(d.box[1] * sy), math.ceil(d.box[2] * sx),
                                            math.ceil(d.box[3] * sy))) for d in result.defects))
    return draw_overlay(img, result, fps)


@dataclass(frozen=True)
class RenderedFrame:
    """One rendered preview frame, shared by all viewers of a source: planar yuv420p pixels (converted once)
    and its pts in :data:`VIDEO_CLOCK` units. Each viewer wraps it in its own ``av.VideoFrame``
    (:meth:`to_video_frame`): aiortc's encoders, running in threads, modify the frame they are given."""

    yuv: Any = field(repr=False)  # numpy uint8 array (H * 3 / 2, W)
    pts: int
    width: int
    height: int
    frame_id: str = ""

    def to_video_frame(self):
        import fractions

        import av

        video = av.VideoFrame.from_ndarray(self.yuv, format="yuv420p")
        video.pts = self.pts
        video.time_base = fractions.Fraction(1, VIDEO_CLOCK)
        return video


def _to_yuv420p(img_bgr):
    import av

    return av.VideoFrame.from_ndarray(img_bgr, format="bgr24").reformat(format="yuv420p").to_ndarray()


class LineSource:
    """Reads one line's frames and results from Redis and publishes rendered video frames to its viewers.

    ``camera`` (optional) keeps only that camera's frames. Viewers call :meth:`wait_newer`; a viewer that is
    slower than the source simply gets the newest frame (frames in between are skipped for it).
    """

    BATCH = 256
    RESULT_CACHE = 512

    def __init__(self, client: Any, keys: LineKeys, options: PreviewOptions, camera: str = ""):
        self.client = client
        self.keys = keys
        self.options = options
        self.camera = camera
        self.viewers: set[Any] = set()
        self.frames_in = 0  # frames read from Redis
        self.frames_out = 0  # frames rendered and published
        self.matched = 0  # published with the result of their own frame id
        self.skipped = 0  # frames passed over to catch up
        self.errors = 0  # undecodable payloads
        self._results: OrderedDict[str, InspectionResult] = OrderedDict()
        self._latest: dict[str, InspectionResult] = {}  # camera -> newest result
        self._fps = FpsMeter()
        self._t0: float | None = None
        self._last_pts = -1
        self._video: RenderedFrame | None = None  # newest rendered frame
        self._counter = 0
        self._cond: asyncio.Condition | None = None
        self._task: asyncio.Task | None = None
        self._closed = False

    # -------------------------------------------------------------------------------- lifecycle
    def start(self) -> None:
        self._cond = asyncio.Condition()
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"preview:{self.keys.line}")

    async def stop(self) -> None:
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        if self._cond is not None:
            async with self._cond:
                self._cond.notify_all()

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def wait_newer(self, seen: int) -> tuple[RenderedFrame | None, int]:
        """The newest rendered frame after counter ``seen`` (waits for one); ``(None, seen)`` once stopped."""
        assert self._cond is not None, "start() first"
        async with self._cond:
            await self._cond.wait_for(lambda: self._closed or self._counter > seen)
            if self._closed:
                return None, seen
            return self._video, self._counter

    # -------------------------------------------------------------------------------- reading
    async def _run(self) -> None:
        import redis

        backoff = Backoff(REDIS_RETRY_INITIAL_S, REDIS_RETRY_MAX_S)
        ids: dict[str, str] = {}
        try:
            while not self._closed:
                try:
                    await self._read_loop(ids)
                except (redis.ConnectionError, redis.TimeoutError) as exc:
                    # viewers keep their connection (the video pauses); reading resumes at the stream's end
                    delay = backoff.next_delay()
                    log.warning("preview: line %s: Redis unreachable (%s), retrying in %.1fs", self.keys.line,
                                exc, delay)
                    ids.clear()
                    await asyncio.sleep(delay)
                else:
                    backoff.reset()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("preview: reading line %s failed", self.keys.line)
        self._closed = True
        async with self._cond:  # type: ignore[union-attr]
            self._cond.notify_all()  # type: ignore[union-attr]

    async def _read_loop(self, ids: dict[str, str]) -> None:
        """Read until stopped; ``ids`` (stream -> last id read) survives a reconnect."""
        frames_key, results_key = self.keys.frames, self.keys.results
        if not ids:
            ids[frames_key] = await _last_id(self.client, frames_key)
            ids[results_key] = await _last_id(self.client, results_key)
        wait = self.options.result_wait_s
        pending: Frame | None = None
        deadline = 0.0
        while not self._closed:
            block = self.options.block_ms
            if pending is not None:
                block = max(1, min(block, int((deadline - time.monotonic()) * 1000) + 1))
            # one blocking read for both streams; results first so that a frame's result is seen with it
            reply = await self.client.xread({results_key: ids[results_key], frames_key: ids[frames_key]},
                                            count=self.BATCH, block=block)
            newest: Frame | None = None
            for stream, entries in reply or ():
                name = _sid(stream)
                if not entries:
                    continue
                ids[name] = _sid(entries[-1][0])
                if name == results_key:
                    for _eid, fields in entries:
                        self._take_result(_payload(fields))
                else:
                    self.frames_in += len(entries)
                    newest = self._newest_frame(entries)
                    if len(entries) >= self.BATCH:  # far behind: jump to the end of the stream
                        ids[frames_key] = await _last_id(self.client, frames_key)
            if pending is not None and pending.frame_id in self._results:
                await self._publish(pending)
                pending = None
            if newest is not None:
                if pending is not None:  # superseded before its result came: show it with what we have
                    await self._publish(pending)
                    pending = None
                if wait <= 0 or newest.frame_id in self._results:
                    await self._publish(newest)
                else:
                    pending, deadline = newest, time.monotonic() + wait
            if pending is not None and time.monotonic() >= deadline:
                await self._publish(pending)
                pending = None

    def _take_result(self, payload: bytes | None) -> None:
        if payload is None:
            self.errors += 1
            return
        try:
            result = decode_result(payload)
        except PayloadError as exc:
            self.errors += 1
            log.debug("preview: skipping undecodable result: %s", exc.reason)
            return
        self._results[result.frame_id] = result
        self._results.move_to_end(result.frame_id)
        while len(self._results) > self.RESULT_CACHE:
            self._results.popitem(last=False)
        prev = self._latest.get(result.camera_id)
        if prev is None or (result.capture_ts, result.seq) >= (prev.capture_ts, prev.seq):
            self._latest[result.camera_id] = result

    def _newest_frame(self, entries: list) -> Frame | None:
        """The newest decodable frame of a batch (of this source's camera); older ones are skipped."""
        for i, (_eid, fields) in enumerate(reversed(entries)):
            payload = _payload(fields)
            if payload is None:
                self.errors += 1
                continue
            try:
                frame = decode_frame(payload)
            except PayloadError as exc:
                self.errors += 1
                log.debug("preview: skipping undecodable frame: %s", exc.reason)
                continue
            if self.camera and frame.camera_id != self.camera:
                continue
            self.skipped += len(entries) - 1 - i
            return frame
        return None

    # -------------------------------------------------------------------------------- publishing
    def _render_yuv(self, frame: Frame, result: InspectionResult | None, fps: float | None):
        img = render_frame(frame, result, fps, self.options.max_side)
        return _to_yuv420p(img), img.shape[:2]

    def _pts(self, capture_ts: float) -> int:
        if self._t0 is None:
            self._t0 = capture_ts
        pts = int(round((capture_ts - self._t0) * VIDEO_CLOCK))
        if pts <= self._last_pts:  # clocks of several cameras, or a restarted ingest: keep pts increasing
            pts = self._last_pts + 1
        self._last_pts = pts
        return pts

    async def _publish(self, frame: Frame) -> None:
        result = self._results.get(frame.frame_id)
        if result is not None:
            self.matched += 1
        else:
            result = self._latest.get(frame.camera_id)
        fps = self._fps.update(frame.capture_ts)
        loop = asyncio.get_running_loop()
        try:
            yuv, (h, w) = await loop.run_in_executor(None, self._render_yuv, frame, result, fps)
        except PayloadError as exc:
            self.errors += 1
            log.debug("preview: frame %s does not decode: %s", frame.frame_id, exc.reason)
            return
        video = RenderedFrame(yuv=yuv, pts=self._pts(frame.capture_ts), width=w, height=h,
                              frame_id=frame.frame_id)
        assert self._cond is not None
        async with self._cond:
            self._video = video
            self._counter += 1
            self.frames_out += 1
            self._cond.notify_all()


def viewer_track_class() -> type:
    """The aiortc track class handed to each peer (built lazily: importing this module needs no aiortc)."""
    from aiortc import MediaStreamTrack
    from aiortc.mediastreams import MediaStreamError

    class LineViewerTrack(MediaStreamTrack):
        kind = "video"

        def __init__(self, source: LineSource, on_stop: Any):
            super().__init__()
            self.source = source
            self._seen = 0
            self._on_stop = on_stop

        async def recv(self):
            if self.readyState != "live":
                raise MediaStreamError
            rendered, self._seen = await self.source.wait_newer(self._seen)
            if rendered is None:
                self.stop()
                raise MediaStreamError
            return rendered.to_video_frame()  # a frame of its own: encoders modify what they are given

        def stop(self) -> None:
            if self.readyState == "live":
                super().stop()
                self._on_stop(self)

    return LineViewerTrack


# ------------------------------------------------------------------------------------------ server


class PreviewServer:
    """The preview's web server. ``await start()`` binds and returns the port; ``await stop()`` closes all."""

    def __init__(self, options: PreviewOptions):
        self.options = options
        self.client: Any = None
        self.sources: dict[tuple[str, str], LineSource] = {}
        self.peers: dict[Any, Any] = {}  # RTCPeerConnection -> its track
        self._track_cls: type | None = None
        self._runner: Any = None
        self._site: Any = None
        self._port: int | None = None
        self._background: set[asyncio.Task] = set()

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("preview server not started")
        return self._port

    def build_app(self):
        from aiohttp import web

        @web.middleware
        async def guard(request: web.Request, handler):
            if not request.path.startswith(PUBLIC_PREFIX):
                given = presented_token(request.headers, request.query)
                if given is None:
                    return web.json_response({"error": "token required"}, status=401,
                                             headers={"WWW-Authenticate": "Bearer", **SECURITY_HEADERS})
                if not token_matches(given, self.options.token):
                    return web.json_response({"error": "wrong token"}, status=403, headers=SECURITY_HEADERS)
            response = await handler(request)
            response.headers.update(SECURITY_HEADERS)
            return response

        app = web.Application(middlewares=[guard], client_max_size=256 * 1024)
        app.router.add_get("/", self._index)
        app.router.add_get("/api/lines", self._lines)
        app.router.add_post("/api/offer", self._offer)
        app.router.add_static(PUBLIC_PREFIX.rstrip("/"), STATIC_DIR, show_index=False, follow_symlinks=False)
        app.on_shutdown.append(self._on_shutdown)
        return app

    async def start(self) -> int:
        import redis
        import redis.asyncio as aioredis
        from aiohttp import web

        require_webrtc()
        self._track_cls = viewer_track_class()
        if self.options.redis is not None:  # a single node or a cluster (redis.cluster), as every process
            from stream.redisclient import make_client

            o = self.options
            self.client = make_client(o.redis, asyncio=True, socket_timeout=o.socket_timeout_s + o.block_ms / 1000)
        else:
            self.client = aioredis.Redis.from_url(self.options.redis_url,
                                                  socket_connect_timeout=self.options.socket_timeout_s,
                                                  **dict(self.options.redis_tls))
        try:
            await self.client.ping()
        except redis.RedisError as exc:
            await self.client.aclose()
            raise QueueUnavailableError(f"preview: Redis at {redact_url(self.options.redis_url)} does not answer: "
                                        f"{redact_text(exc)}") \
                from None
        self._runner = web.AppRunner(self.build_app(), access_log=None)
        await self._runner.setup()
        self._site = web.TCPSite(self._runner, self.options.host, self.options.port)
        await self._site.start()
        server = getattr(self._site, "_server", None)
        sockets = getattr(server, "sockets", None) or ()
        self._port = int(sockets[0].getsockname()[1]) if sockets else self.options.port
        log.info("preview: serving on http://%s:%d/ (token required)", self.options.host, self._port)
        return self._port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()  # runs _on_shutdown
            self._runner = None
        await self._close_all()
        if self.client is not None:
            await self.client.aclose()
            self.client = None

    async def _on_shutdown(self, app) -> None:
        await self._close_all()

    async def _close_all(self) -> None:
        await asyncio.gather(*(self._close_peer(pc) for pc in list(self.peers)), return_exceptions=True)
        sources, self.sources = list(self.sources.values()), {}
        await asyncio.gather(*(s.stop() for s in sources), *list(self._background), return_exceptions=True)

    # -------------------------------------------------------------------------------- handlers
    async def _index(self, request):
        from aiohttp import web

        return web.FileResponse(STATIC_DIR / "index.html")

    async def _known_lines(self) -> list[str]:
        members = await self.client.smembers(lines_index(self.options.key_prefix))
        return sorted(_sid(m) for m in members)

    async def _lines(self, request):
        from aiohttp import web

        lines = await self._known_lines()
        viewers = {f"{line}/{cam}" if cam else line: len(src.viewers) for (line, cam), src in self.sources.items()}
        return web.json_response({"lines": lines, "viewers": viewers})

    async def _offer(self, request):
        from aiohttp import web
        from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription

        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            return web.json_response({"error": "body is not JSON"}, status=400)
        if not isinstance(body, dict):
            return web.json_response({"error": "body must be a JSON object"}, status=400)
        line, camera = body.get("line"), body.get("camera") or ""
        sdp, kind = body.get("sdp"), body.get("type")
        if not isinstance(line, str) or not isinstance(camera, str) or not isinstance(sdp, str) or kind != "offer":
            return web.json_response({"error": "expected {line, sdp, type: 'offer'[, camera]}"}, status=400)
        if line not in await self._known_lines():
            return web.json_response({"error": f"unknown line {line!r}"}, status=404)
        if len(self.peers) >= self.options.max_viewers:
            return web.json_response({"error": "too many viewers"}, status=503)

        source = self._source(line, camera)
        assert self._track_cls is not None
        track = self._track_cls(source, self._viewer_gone)
        source.viewers.add(track)
        # no ICE servers: the preview serves the plant network (aiortc would otherwise ask a public STUN server)
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.peers[pc] = track

        @pc.on("connectionstatechange")
        async def _state() -> None:
            log.debug("preview: peer %s %s", id(pc), pc.connectionState)
            if pc.connectionState in ("failed", "closed"):
                await self._close_peer(pc)

        try:
            await pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
            pc.addTrack(track)
            await pc.setLocalDescription(await pc.createAnswer())
        except Exception as exc:  # a bad SDP: tell the client, leak nothing
            await self._close_peer(pc)
            return web.json_response({"error": f"offer rejected: {type(exc).__name__}: {exc}"}, status=400)
        log.info("preview: viewer joined line %s%s (%d peers)", line, f"/{camera}" if camera else "",
                 len(self.peers))
        return web.json_response({"sdp": pc.localDescription.sdp, "type": pc.localDescription.type})

    # -------------------------------------------------------------------------------- bookkeeping
    def _source(self, line: str, camera: str) -> LineSource:
        key = (line, camera)
        src = self.sources.get(key)
        if src is None or not src.running:
            src = LineSource(self.client, line_keys(self.options.key_prefix, line, self.options.key_layout),
                             self.options, camera)
            src.start()
            self.sources[key] = src
        return src

    def _viewer_gone(self, track: Any) -> None:
        src: LineSource = track.source
        src.viewers.discard(track)
        key = (src.keys.line, src.camera)
        if not src.viewers and self.sources.get(key) is src:
            del self.sources[key]
            task = asyncio.get_running_loop().create_task(src.stop())
            self._background.add(task)
            task.add_done_callback(self._background.discard)
            log.info("preview: no viewers left on line %s: stopped reading it", src.keys.line)

    async def _close_peer(self, pc: Any) -> None:
        track = self.peers.pop(pc, None)
        if track is not None:
            track.stop()
        with contextlib.suppress(Exception):
            await pc.close()


# ------------------------------------------------------------------------------------------ entry point


async def serve(options: PreviewOptions, ready: asyncio.Event | None = None,
                stop: asyncio.Event | None = None) -> None:
    """Run the preview until ``stop`` is set (or SIGINT/SIGTERM when no event is given)."""
    server = PreviewServer(options)
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, stop.set)
    await server.start()
    try:
        print(f"preview: http://{options.host}:{server.port}/?token=<preview.token>", flush=True)
        if ready is not None:
            ready.set()
        await stop.wait()
    finally:
        await server.stop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.remove_signal_handler(sig)
        log.info("preview: stopped")


def main(settings: Settings, args: argparse.Namespace) -> int:
    """``lineinspect preview``: 0 after a clean shutdown, 2 on a configuration problem, 3 without aiortc."""
    import sys

    try:
        options = PreviewOptions.from_settings(settings, args)
    except PreviewConfigError as exc:
        print(f"lineinspect preview: {exc}", file=sys.stderr)
        return 2
    try:
        require_webrtc()
    except PreviewUnavailable as exc:
        print(f"lineinspect preview: {exc}", file=sys.stderr)
        return 3
    try:
        asyncio.run(serve(options))
    except QueueUnavailableError as exc:
        print(f"lineinspect preview: {redact_text(exc)}", file=sys.stderr)
        return 1
    except OSError as exc:  # port in use, address not available
        print(f"lineinspect preview: cannot serve on {options.host}:{options.port}: {exc}", file=sys.stderr)
        return 1
    return 0
