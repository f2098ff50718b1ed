"""The preview's web server: the page, the lines, the WebRTC signalling, and the line sources its viewers
share (one per line and camera filter, stopped when its last viewer leaves)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path
from typing import Any

from stream.contracts import QueueUnavailableError
from stream.entries import text
from stream.keys import line_keys, lines_index
from stream.preview.access import PUBLIC_PREFIX, json_object_body, token_guard
from stream.preview.options import PreviewOptions, require_webrtc
from stream.preview.review_api import ReviewApi
from stream.preview.source import LineSource
from stream.preview.track import viewer_track_class
from stream.redact import redact_text, redact_url

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).parent.parent / "preview_static"


async def _connect(options: PreviewOptions) -> Any:
    """The asyncio client of the preview (a single node or a cluster, as every process), answering."""
    import redis

    from stream.redisclient import make_client

    rs = options.redis
    client = make_client(rs, asyncio=True, socket_timeout=rs.socket_timeout_s + options.block_ms / 1000)
    try:
        await client.ping()
    except redis.RedisError as exc:
        await client.aclose()
        raise QueueUnavailableError(f"preview: Redis at {redact_url(rs.url)} does not answer: "
                                    f"{redact_text(exc)}") from None
    return client


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
        self.review = ReviewApi(options.redis, options.review, self._known_lines)

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("preview server not started")
        return self._port

    def build_app(self):
        from aiohttp import web

        app = web.Application(middlewares=[token_guard(self.options.token)], client_max_size=256 * 1024)
        app.router.add_get("/", self._index)
        app.router.add_get("/api/lines", self._lines)
        app.router.add_post("/api/offer", self._offer)
        self.review.add_routes(app)
        app.router.add_static(PUBLIC_PREFIX.rstrip("/"), STATIC_DIR, show_index=False, follow_symlinks=False)
        app.on_shutdown.append(self._on_shutdown)
        return app

    async def start(self) -> int:
        from aiohttp import web

        require_webrtc()
        self._track_cls = viewer_track_class()
        self.client = await _connect(self.options)
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
        self.review.close()
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
        members = await self.client.smembers(lines_index(self.options.redis.key_prefix))
        return sorted(text(m) for m in members)

    async def _lines(self, request):
        from aiohttp import web

        lines = await self._known_lines()
        viewers = {f"{line}/{cam}" if cam else line: len(src.viewers) for (line, cam), src in self.sources.items()}
        return web.json_response({"lines": lines, "viewers": viewers})

    async def _offer(self, request):
        from aiohttp import web
        from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription

        body, refused = await json_object_body(request)
        if body is None:
            return refused
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
            src = LineSource(self.client, line_keys(self.options.redis.key_prefix, line, self.options.redis.key_layout),
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

