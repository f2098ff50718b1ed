"""The preview's review API (behind the preview token, like every route but ``/static/``):

- ``GET /api/review/recent?line=L[&n=20][&verdict=defect][&frame=ID]``: the line's most recent kept verdicts
  (newest first; only DEFECT ones with ``verdict=defect``; one frame with ``frame=ID``), and the window's size;
- ``GET /api/review/frame?line=L&frame=ID[&max_side=480]``: the kept frame with its result drawn (JPEG);
- ``POST /api/review`` ``{line, frame_id, decision: ok|defect, who}``: submits a review request (202 with its
  ``request_id``; 404 when the frame is no longer kept, 400 for bad input);
- ``GET /api/review/outcome?line=L&request=ID``: the request's audit entry once a worker applied it.

Redis is read with a synchronous client in worker threads (the frame decoding and drawing run there too), so
the event loop that serves the video is never held up.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from config.settings import ReviewSettings, SettingsError, check_ident
from stream.keys import LineKeys, line_keys
from stream.preview.access import json_object_body
from stream.review.archive import ReviewArchive
from stream.review.requests import FrameNotKept, ReviewInputError, find_outcome, submit_review

log = logging.getLogger(__name__)

MAX_LIST = 200
THUMB_SIDE = 480


def _item(kept) -> dict[str, Any]:
    from stream.wire import decode_result

    r = decode_result(kept.result)
    return {"frame_id": kept.frame_id, "ts": kept.ts, "verdict": r.verdict.value, "score": r.image_score,
            "threshold": r.threshold, "defects": len(r.defects), "camera": r.camera_id,
            "capture_ts": r.capture_ts, "worker": r.worker_id}


def _overlay_jpeg(kept, max_side: int) -> bytes:
    import cv2

    from stream.overlay import draw_overlay
    from stream.wire import decode_frame, decode_result, frame_to_image

    image = frame_to_image(decode_frame(kept.frame))
    out = draw_overlay(image, decode_result(kept.result))
    h, w = out.shape[:2]
    if max_side and max(h, w) > max_side:
        s = max_side / max(h, w)
        out = cv2.resize(out, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA)
    ok, buf = cv2.imencode(".jpg", out, [cv2.IMWRITE_JPEG_QUALITY, 85])
    if not ok:
        raise ValueError("JPEG encoding failed")
    return buf.tobytes()


class ReviewApi:
    """Routes of the review panel. ``known_lines`` is the preview's coroutine listing the lines."""

    def __init__(self, redis_settings, review: ReviewSettings, known_lines):
        self.redis_settings = redis_settings
        self.review = review
        self.known_lines = known_lines
        self._client: Any = None

    def add_routes(self, app) -> None:
        app.router.add_get("/api/review/recent", self._recent)
        app.router.add_get("/api/review/frame", self._frame)
        app.router.add_get("/api/review/outcome", self._outcome)
        app.router.add_post("/api/review", self._submit)

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def _sync_client(self):
        if self._client is None:
            from stream.redisclient import make_client

            self._client = make_client(self.redis_settings)
        return self._client

    def _keys(self, line: str) -> LineKeys:
        rs = self.redis_settings
        return line_keys(rs.key_prefix, line, rs.key_layout)

    def _archive(self, line: str) -> ReviewArchive:
        return ReviewArchive(self._sync_client(), self._keys(line), self.review.keep_bytes)

    async def _line(self, value: Any) -> str | None:
        """The request's line when it is a known one, else None."""
        try:
            line = check_ident("line", value if isinstance(value, str) else "")
        except SettingsError:
            return None
        return line if line in await self.known_lines() else None

    # -------------------------------------------------------------------------------- handlers
    async def _recent(self, request):
        from aiohttp import web

        q = request.query
        line = await self._line(q.get("line"))
        if line is None or not self.review.enabled:
            return web.json_response({"error": "unknown line" if self.review.enabled else "review disabled"},
                                     status=404)
        try:
            n = max(1, min(MAX_LIST, int(q.get("n", "20"))))
        except ValueError:
            return web.json_response({"error": "n must be an integer"}, status=400)

        def read() -> dict[str, Any]:
            arch = self._archive(line)
            if q.get("frame"):
                kept = arch.get(q["frame"])
                entries = [kept] if kept is not None else []
            else:
                entries = arch.recent(n, defects_only=q.get("verdict") == "defect")
            total, count = arch.stats()
            return {"line": line, "items": [_item(k) for k in entries],
                    "window": {"bytes": total, "frames": count, "max_bytes": arch.max_bytes}}

        return web.json_response(await asyncio.to_thread(read))

    async def _frame(self, request):
        from aiohttp import web

        q = request.query
        line = await self._line(q.get("line"))
        frame_id = q.get("frame", "")
        if line is None or not frame_id or not self.review.enabled:
            return web.json_response({"error": "unknown line or frame"}, status=404)
        try:
            max_side = max(0, min(4096, int(q.get("max_side", str(THUMB_SIDE)))))
        except ValueError:
            return web.json_response({"error": "max_side must be an integer"}, status=400)

        def render() -> bytes | None:
            kept = self._archive(line).get(frame_id)
            return None if kept is None else _overlay_jpeg(kept, max_side)

        body = await asyncio.to_thread(render)
        if body is None:
            return web.json_response({"error": str(FrameNotKept(frame_id, self.review.keep_bytes / (1 << 20)))},
                                     status=404)
        return web.Response(body=body, content_type="image/jpeg")

    async def _submit(self, request):
        from aiohttp import web

        body, refused = await json_object_body(request)
        if body is None:
            return refused
        line = await self._line(body.get("line"))
        if line is None or not self.review.enabled:
            return web.json_response({"error": "unknown line" if self.review.enabled else "review disabled"},
                                     status=404)
        frame_id, decision, who = body.get("frame_id"), body.get("decision"), body.get("who")
        if not all(isinstance(v, str) for v in (frame_id, decision, who)):
            return web.json_response({"error": "expected {line, frame_id, decision: ok|defect, who}"}, status=400)

        def submit() -> str:
            return submit_review(self._sync_client(), self._keys(line), self._archive(line), frame_id, decision,
                                 who, self.review.requests_maxlen)

        try:
            request_id = await asyncio.to_thread(submit)
        except ReviewInputError as exc:
            return web.json_response({"error": str(exc)}, status=400)
        except FrameNotKept as exc:
            return web.json_response({"error": str(exc)}, status=404)
        log.info("preview: review %s of line %s frame %s: %s by %s", request_id, line, frame_id, decision, who)
        return web.json_response({"request_id": request_id}, status=202)

    async def _outcome(self, request):
        from aiohttp import web

        q = request.query
        line = await self._line(q.get("line"))
        if line is None:
            return web.json_response({"error": "unknown line"}, status=404)
        request_id = q.get("request", "")
        try:
            found = await asyncio.to_thread(find_outcome, self._sync_client(), self._keys(line), request_id)
        except ReviewInputError as exc:
            return web.json_response({"error": str(exc)}, status=400)
        return web.json_response({"request_id": request_id, "outcome": found.as_json() if found else None})
