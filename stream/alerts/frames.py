"""Where an alert's frame comes from: the service's own short memory of each line's frames, else the frames
stream itself (workers delete a frame's entry once its result is published; see :mod:`stream.alerts`)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import Any

from stream.cache import BoundedCache
from stream.contracts import Frame, InspectionResult, PayloadError
from stream.entries import Entry, payload_of
from stream.keys import line_keys
from stream.reader import StreamCursor, follow, mark_now
from stream.wire import decode_frame

log = logging.getLogger(__name__)


def _decoded(payload: bytes | None) -> Frame | None:
    try:
        return decode_frame(payload)
    except PayloadError:
        return None


def find_frame(client: Any, prefix: str, result: InspectionResult, *, slack_s: float = 5.0,
               max_entries: int = 64, layout: str = "plain") -> Frame | None:
    """The result's frame if it is still in the line's frames stream, else None.

    Entry ids of the frames stream are Redis auto ids (milliseconds at XADD), which come after the capture
    time; ``slack_s`` allows for clock skew between the camera host and Redis.
    """
    start_ms = max(0, int((result.capture_ts - slack_s) * 1000))
    entries = client.xrange(line_keys(prefix, result.line_id, layout).frames, min=f"{start_ms}-0", max="+",
                            count=max_entries)
    for _eid, fields in entries:
        frame = _decoded(payload_of(fields))
        if frame is not None and frame.frame_id == result.frame_id:
            return frame
    return None


class FrameTail:
    """Follows the frames streams of ``lines`` (``XREAD``, no group) and keeps the newest frames in memory,
    at most ``max_bytes`` of payload, looked up by frame id. Started and stopped explicitly."""

    def __init__(self, client: Any, prefix: str, lines: Sequence[str], max_bytes: int = 32 << 20,
                 block_ms: int = 1000, layout: str = "plain"):
        from stream.redisclient import is_cluster

        self.client = client
        self.streams = [line_keys(prefix, line, layout).frames for line in dict.fromkeys(lines)]
        self._cursor = StreamCursor.from_now(self.streams, cluster=is_cluster(client))  # one XREAD per slot
        self.max_bytes = max_bytes
        self.block_ms = block_ms
        self._frames: BoundedCache[Frame] = BoundedCache(max_bytes=max_bytes, size_of=lambda f: len(f.data))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.seen = 0  # frames read so far

    def start(self) -> None:
        """Note where each stream ends now (frames added after this call are all seen), then follow them."""
        import redis

        self._stop.clear()
        try:
            mark_now(self.client, self._cursor)
        except redis.RedisError:
            self._cursor.rewind_to_now()  # the thread retries
        self._thread = threading.Thread(target=self._run, name="alert-frame-tail", daemon=True)
        self._thread.start()

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def get(self, frame_id: str) -> Frame | None:
        return self._frames.get(frame_id)

    def _keep(self, entries: list[Entry]) -> None:
        for entry in entries:
            frame = _decoded(entry.payload)
            if frame is not None:
                self._frames.put(frame.frame_id, frame)
                self.seen += 1

    def _run(self) -> None:
        import redis

        while not self._stop.is_set():
            try:
                entries = follow(self.client, self._cursor, count=100, block_ms=self.block_ms)
            except redis.RedisError as exc:
                log.debug("frame tail: %s", exc)
                self._cursor.rewind_to_now()
                self._stop.wait(1.0)
                continue
            self._keep(entries)
