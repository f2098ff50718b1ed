"""One line's preview source: reads the line's frames and results (plain XREAD from now, never the workers'
group), matches each frame with its result, renders it and hands the newest rendered frame to its viewers."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from stream.backoff import Backoff
from stream.cache import BoundedCache
from stream.contracts import Frame, InspectionResult, PayloadError
from stream.entries import Entry
from stream.keys import LineKeys
from stream.preview.options import PreviewOptions
from stream.preview.render import FpsMeter, PtsClock, RenderedFrame, render_yuv
from stream.reader import StreamCursor, follow_async
from stream.wire import decode_frame, decode_result

log = logging.getLogger(__name__)

RECONNECT_INITIAL_S = 0.5  # waits between attempts while Redis is unreachable (the video pauses meanwhile)
RECONNECT_MAX_S = 5.0


class LineSource:
    """Reads one line's frames and results from Redis and publishes rendered video frames to its viewers.

    ``camera`` (optional) keeps only that camera's frames. Viewers call :meth:`wait_newer`; a viewer that is
    slower than the source simply gets the newest frame (frames in between are skipped for it).
    """

    BATCH = 256
    RESULT_CACHE = 512

    def __init__(self, client: Any, keys: LineKeys, options: PreviewOptions, camera: str = ""):
        from stream.redisclient import is_cluster

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
        # results first, so that a frame's result is seen with it (a line's keys share one cluster slot)
        self._cursor = StreamCursor.from_now([keys.results, keys.frames], cluster=is_cluster(client))
        self._results: BoundedCache[InspectionResult] = BoundedCache(max_items=self.RESULT_CACHE)
        self._latest: dict[str, InspectionResult] = {}  # camera -> newest result
        self._fps = FpsMeter()
        self._pts = PtsClock()
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
        from stream.redisclient import unavailable_errors

        backoff = Backoff(RECONNECT_INITIAL_S, RECONNECT_MAX_S)
        try:
            while not self._closed:
                try:
                    await self._read_loop()
                except unavailable_errors() as exc:  # a lost connection, and on a cluster CLUSTERDOWN & co
                    # viewers keep their connection (the video pauses); reading resumes at the streams' end
                    delay = backoff.next_delay()
                    log.warning("preview: line %s: Redis unreachable (%s), retrying in %.1fs", self.keys.line,
                                exc, delay)
                    self._cursor.rewind_to_now()
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

    async def _read_loop(self) -> None:
        """Read until stopped. A frame waits up to ``result_wait_s`` for its own result; a newer frame, or the
        end of the wait, publishes it with the result there is."""
        wait = self.options.result_wait_s
        pending: Frame | None = None
        deadline = 0.0
        while not self._closed:
            block = self.options.block_ms
            if pending is not None:
                block = max(1, min(block, int((deadline - time.monotonic()) * 1000) + 1))
            newest = await self._read(block)
            if pending is not None and (newest is not None or pending.frame_id in self._results
                                        or time.monotonic() >= deadline):
                await self._publish(pending)  # its result came, or it was superseded, or the wait is over
                pending = None
            if newest is not None:
                if wait <= 0 or newest.frame_id in self._results:
                    await self._publish(newest)
                else:
                    pending, deadline = newest, time.monotonic() + wait

    async def _read(self, block_ms: int) -> Frame | None:
        """One blocking read of both streams: results are taken in, the newest frame is returned."""
        entries = await follow_async(self.client, self._cursor, count=self.BATCH, block_ms=block_ms)
        frames = [e for e in entries if e.stream == self.keys.frames]
        for entry in entries:
            if entry.stream == self.keys.results:
                self._take_result(entry.payload)
        if not frames:
            return None
        self.frames_in += len(frames)
        if len(frames) >= self.BATCH:  # far behind: jump to the end of the stream
            self._cursor.rewind_to_now(self.keys.frames)
        return self._newest_frame(frames)

    def _take_result(self, payload: bytes | None) -> None:
        try:
            result = decode_result(payload)
        except PayloadError as exc:
            self.errors += 1
            log.debug("preview: skipping undecodable result: %s", exc.reason)
            return
        self._results.put(result.frame_id, result)
        prev = self._latest.get(result.camera_id)
        if prev is None or (result.capture_ts, result.seq) >= (prev.capture_ts, prev.seq):
            self._latest[result.camera_id] = result

    def _newest_frame(self, entries: list[Entry]) -> Frame | None:
        """The newest decodable frame of a batch (of this source's camera); older ones are skipped."""
        for i, entry in enumerate(reversed(entries)):
            try:
                frame = decode_frame(entry.payload)
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
    async def _publish(self, frame: Frame) -> None:
        result = self._results.get(frame.frame_id)
        if result is not None:
            self.matched += 1
        else:
            result = self._latest.get(frame.camera_id)
        fps = self._fps.update(frame.capture_ts)
        loop = asyncio.get_running_loop()
        try:
            yuv, (h, w) = await loop.run_in_executor(None, render_yuv, frame, result, fps, self.options.max_side)
        except PayloadError as exc:
            self.errors += 1
            log.debug("preview: frame %s does not decode: %s", frame.frame_id, exc.reason)
            return
        video = RenderedFrame(yuv=yuv, pts=self._pts.pts(frame.capture_ts), width=w, height=h,
                              frame_id=frame.frame_id)
        assert self._cond is not None
        async with self._cond:
            self._video = video
            self._counter += 1
            self.frames_out += 1
            self._cond.notify_all()
