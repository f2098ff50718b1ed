"""Prometheus metrics of operator review in a worker: reviews applied or failed, how long they took, memory
rows they added, and the review window the worker fills (frames kept, bytes, dropped, errors)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

if TYPE_CHECKING:
    from stream.review.archive import KeptFrame
    from stream.review.requests import ReviewOutcome

APPLY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120)


class ReviewMetrics:
    def __init__(self, registry: CollectorRegistry):
        self.reviews = Counter(
            "lineinspect_reviews_total", "Operator reviews handled by this worker, by decision (ok = false alarm, "
            "defect = confirmed) and outcome (applied, failed)", ["line", "decision", "outcome"], registry=registry)
        self.apply_seconds = Histogram(
            "lineinspect_review_apply_seconds", "Time from handing a review to the model thread to its outcome",
            ["line", "decision"], buckets=APPLY_BUCKETS, registry=registry)
        self.latency_seconds = Histogram(
            "lineinspect_review_latency_seconds", "Review request to applied (Redis server clock): click-to-memory",
            ["line", "decision"], buckets=APPLY_BUCKETS, registry=registry)
        self.rows_added = Counter(
            "lineinspect_review_memory_rows_added_total", "Memory rows added by frames reviewed OK", ["line"],
            registry=registry)
        self.kept_bytes = Gauge(
            "lineinspect_review_kept_bytes", "Bytes of frames and results kept for review (the line's window)",
            ["line"], registry=registry)
        self.kept_frames = Gauge(
            "lineinspect_review_kept_frames", "Frames kept for review (the line's window)", ["line"],
            registry=registry)
        self.dropped = Counter(
            "lineinspect_review_dropped_total", "Kept frames dropped from the review window (oldest first)",
            ["line"], registry=registry)
        self.keep_errors = Counter(
            "lineinspect_review_keep_errors_total", "Frames that could not be kept for review (Redis refused)",
            ["line"], registry=registry)

    def observe(self, line: str, outcome: ReviewOutcome, apply_s: float) -> None:
        self.reviews.labels(line=line, decision=outcome.decision, outcome=outcome.outcome).inc()
        self.apply_seconds.labels(line=line, decision=outcome.decision).observe(apply_s)
        if outcome.applied:
            self.latency_seconds.labels(line=line, decision=outcome.decision).observe(outcome.latency_s)
        if outcome.rows_added:
            self.rows_added.labels(line=line).inc(outcome.rows_added)

    def kept(self, line: str, kept: KeptFrame) -> None:
        self.kept_bytes.labels(line=line).set(kept.bytes)
        self.kept_frames.labels(line=line).set(kept.frames)
        if kept.dropped:
            self.dropped.labels(line=line).inc(kept.dropped)
