"""Follow a line's results: one printed line per frame, optional overlay images.

Frames are deleted from the frame stream once a worker has published their result, so a follower that wants
overlays reads the frame stream as frames arrive (plain XREAD, never the workers' consumer group) and keeps the
last few in a bounded cache keyed by frame id. A result whose frame is no longer cached is drawn on a black
canvas of the frame's size, so an overlay is always written.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import redis

from config.settings import Settings
from stream.cache import BoundedCache
from stream.contracts import InspectionResult, PayloadError, Verdict
from stream.keys import LineKeys, line_keys
from stream.reader import FROM_NOW, FROM_START, StreamCursor, follow
from stream.redact import redact_text, redact_url
from stream.wire import decode_frame, decode_result, frame_to_image

log = logging.getLogger(__name__)

FRAME_CACHE = 64  # decoded frames kept for overlays


def format_result(r: InspectionResult) -> str:
    stamp = time.strftime("%H:%M:%S", time.localtime(r.processed_ts or time.time()))
    return (f"{stamp} {r.frame_id:<28} {r.verdict.value.upper():<6} score={r.image_score:6.3f} "
            f"defects={len(r.defects):<2} latency={r.latency_s * 1000:7.1f} ms  worker={r.worker_id}")


@dataclass
class ResultFollower:
    """Reads a line's results stream (and, for overlays, its frame stream) from a redis client."""

    client: redis.Redis
    keys: LineKeys
    from_start: bool = False
    want_frames: bool = False
    block_ms: int = 500
    frames: BoundedCache[np.ndarray] = field(default_factory=lambda: BoundedCache(max_items=FRAME_CACHE))

    def __post_init__(self) -> None:
        starts = {self.keys.results: FROM_START if self.from_start else FROM_NOW}
        if self.want_frames:
            starts[self.keys.frames] = FROM_NOW
        self._cursor = StreamCursor(starts)

    def poll(self) -> list[InspectionResult]:
        """Results that arrived since the last call (blocks up to block_ms when there are none)."""
        results: list[InspectionResult] = []
        for entry in follow(self.client, self._cursor, count=256, block_ms=self.block_ms):
            if entry.stream == self.keys.frames:
                self._cache_frame(entry.payload)
                continue
            try:
                results.append(decode_result(entry.payload))
            except PayloadError as exc:
                log.warning("result %s does not decode: %s", entry.entry_id, exc.reason)
        return results

    def _cache_frame(self, payload: bytes | None) -> None:
        try:
            frame = decode_frame(payload)
            self.frames.put(frame.frame_id, frame_to_image(frame))
        except PayloadError as exc:
            log.debug("frame not cached: %s", exc.reason)

    def follow(self, stop: Callable[[], bool] = lambda: False) -> Iterator[InspectionResult]:
        while not stop():
            yield from self.poll()


def write_overlay(out_dir: Path, result: InspectionResult, image: np.ndarray | None,
                  shape: tuple[int, ...] | None = None) -> Path:
    """Draw a result on its frame (or a black canvas) and write ``<frame id>.jpg``."""
    import cv2

    from stream.overlay import draw_overlay

    if image is None:
        h, w = (shape or (480, 640))[:2]
        image = np.zeros((h, w, 3), np.uint8)
    if image.ndim == 2:
        image = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / (result.frame_id.replace(":", "_") + ".jpg")
    cv2.imwrite(str(path), draw_overlay(image, result))
    return path


def main(settings: Settings, args) -> int:
    from stream.redisclient import make_client

    client = make_client(settings.redis, socket_timeout=settings.redis.socket_timeout_s + 5)
    keys = line_keys(settings.redis.key_prefix, args.line, settings.redis.key_layout)
    out = Path(args.overlays) if args.overlays else None
    follower = ResultFollower(client, keys, from_start=args.from_start or not args.follow, want_frames=out is not None)
    seen = 0
    defects = 0

    def done() -> bool:
        return bool(args.count) and seen >= args.count

    try:
        while not done():
            batch = follower.poll()
            if not batch and not args.follow:
                break
            for r in batch:
                print(format_result(r), flush=True)
                seen += 1
                defects += r.verdict is Verdict.DEFECT
                if out is not None:
                    write_overlay(out, r, follower.frames.get(r.frame_id))
                if done():
                    break
    except redis.RedisError as exc:
        print(f"lineinspect results: Redis at {redact_url(settings.redis.url)} failed: {redact_text(exc)}")
        return 1
    except KeyboardInterrupt:
        pass
    print(f"{seen} results, {defects} defective", flush=True)
    return 0
