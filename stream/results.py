"""Follow a line's results: one printed line per frame, optional overlay images.

Frames are deleted from the frame stream once a worker has published their result, so a follower that wants
overlays reads the frame stream as frames arrive (plain XREAD, never the workers' consumer group) and keeps the
last few in a bounded cache keyed by frame id. A result whose frame is no longer cached is drawn on a black
canvas of the frame's size, so an overlay is always written.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import redis

from config.settings import Settings
from stream.contracts import InspectionResult, PayloadError, Verdict
from stream.keys import LineKeys, line_keys
from stream.redact import redact_text, redact_url
from stream.wire import decode_frame, decode_result, frame_to_image

log = logging.getLogger(__name__)


def format_result(r: InspectionResult) -> str:
    stamp = time.strftime("%H:%M:%S", time.localtime(r.processed_ts or time.time()))
    return (f"{stamp} {r.frame_id:<28} {r.verdict.value.upper():<6} score={r.image_score:6.3f} "
            f"defects={len(r.defects):<2} latency={r.latency_s * 1000:7.1f} ms  worker={r.worker_id}")


class FrameCache:
    """The last ``size`` decoded frames of a line, by frame id."""

    def __init__(self, size: int = 64):
        self.size = size
        self._frames: OrderedDict[str, np.ndarray] = OrderedDict()

    def put(self, frame_id: str, image: np.ndarray) -> None:
        self._frames[frame_id] = image
        self._frames.move_to_end(frame_id)
        while len(self._frames) > self.size:
            self._frames.popitem(last=False)

    def get(self, frame_id: str) -> np.ndarray | None:
        return self._frames.get(frame_id)


@dataclass
class ResultFollower:
    """Reads a line's results stream (and, for overlays, its frame stream) from a redis client."""

    client: redis.Redis
    keys: LineKeys
    from_start: bool = False
    want_frames: bool = False
    block_ms: int = 500

    def __post_init__(self) -> None:
        self._result_id = "0-0" if self.from_start else "$"
        self._frame_id = "$"
        self.frames = FrameCache()

    def _start_ids(self) -> None:
        # "$" must be resolved once: later XREADs continue from the last id seen.
        if self._result_id == "$":
            last = self.client.xrevrange(self.keys.results, count=1)
            self._result_id = last[0][0].decode() if last else "0-0"
        if self._frame_id == "$":
            last = self.client.xrevrange(self.keys.frames, count=1)
            self._frame_id = last[0][0].decode() if last else "0-0"

    def poll(self) -> list[InspectionResult]:
        """Results that arrived since the last call (blocks up to block_ms when there are none)."""
        self._start_ids()
        streams = {self.keys.results: self._result_id}
        if self.want_frames:
            streams[self.keys.frames] = self._frame_id
        reply = self.client.xread(streams, block=self.block_ms, count=256) or []
        results: list[InspectionResult] = []
        for stream, entries in reply:
            is_frames = stream.decode() == self.keys.frames
            for entry_id, fields in entries:
                payload = fields.get(b"p")
                if is_frames:
                    self._frame_id = entry_id.decode()
                    self._cache_frame(payload)
                    continue
                self._result_id = entry_id.decode()
                try:
                    results.append(decode_result(payload))
                except PayloadError as exc:
                    log.warning("result %s does not decode: %s", entry_id, exc.reason)
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
