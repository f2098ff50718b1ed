"""The worker's sink into the review window (:class:`FrameKeeper`): after a frame's result is published, the
frame payload as the worker got it and the result payload are kept (:class:`stream.review.archive.ReviewArchive`).
A failure is logged (at most once a minute) and counted; the pipeline goes on without it."""

from __future__ import annotations

import logging
import time

from stream.review.archive import ReviewArchive
from workers.review.metrics import ReviewMetrics

log = logging.getLogger(__name__)

LOG_EVERY_S = 60.0


class FrameKeeper:
    def __init__(self, archive: ReviewArchive, metrics: ReviewMetrics, line: str):
        self.archive = archive
        self.metrics = metrics
        self.line = line
        self._last_log = float("-inf")
        self.failures = 0

    def keep(self, frame_id: str, frame_payload: bytes, result_payload: bytes, ts: float, defect: bool) -> bool:
        """Keep one judged frame; False (logged, counted) when Redis refused it."""
        try:
            kept = self.archive.keep(frame_id, frame_payload, result_payload, ts, defect)
        except Exception as exc:  # a sink: never the frame's failure
            self.failures += 1
            self.metrics.keep_errors.labels(line=self.line).inc()
            now = time.monotonic()
            if now - self._last_log >= LOG_EVERY_S:
                self._last_log = now
                log.warning("line %s: frame %s not kept for review (%d so far): %s: %s", self.line, frame_id,
                            self.failures, type(exc).__name__, exc)
            return False
        self.metrics.kept(self.line, kept)
        if not kept.kept:
            log.warning("line %s: frame %s (%d bytes) is larger than the review window (%d bytes): not kept",
                        self.line, frame_id, len(frame_payload) + len(result_payload), self.archive.max_bytes)
        return kept.kept
