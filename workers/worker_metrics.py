"""Prometheus counters of the worker's queue handling that :class:`stream.prometheus_metrics.WorkerMetrics` has no place
for (trimmed pending frames, job timeouts, Redis errors, orphan results, Redis OOM)."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter


class WorkerQueueMetrics:
    """Counters of the worker's queue handling that :class:`stream.prometheus_metrics.WorkerMetrics` has no place for."""

    def __init__(self, registry: CollectorRegistry):
        self.trimmed_pending = Counter(
            "lineinspect_worker_frames_trimmed_total",
            "Pending frames trimmed from the stream before any worker finished them (reported by XAUTOCLAIM)",
            ["line"], registry=registry)
        self.job_timeouts = Counter(
            "lineinspect_job_timeouts_total", "Frames whose inspection exceeded queue.job_timeout_s", ["line"],
            registry=registry)
        self.redis_errors = Counter(
            "lineinspect_worker_redis_errors_total", "Redis connection errors seen by the worker", ["line"],
            registry=registry)
        self.orphan_results = Counter(
            "lineinspect_worker_orphan_results_total",
            "Results published for frames whose entry the group no longer had (Redis lost the stream, or the "
            "entry was trimmed and counted): answered although counted as lost elsewhere", ["line"],
            registry=registry)
        self.redis_oom = Counter(
            "lineinspect_worker_redis_oom_total",
            "Redis writes refused for maxmemory (OOM) seen by the worker (results held, frames freed)", ["line"],
            registry=registry)


@dataclass
class WorkerCounts:
    """What one worker process did (its last log line)."""

    processed: int = 0
    duplicates: int = 0
    failed: int = 0
    dead_lettered: int = 0
    reclaimed: int = 0
