"""The worker's link to Redis: whether Redis answers (and why not), whether it refuses writes for maxmemory,
the results held meanwhile (:mod:`workers.held`), the heartbeat and publishing with retries.

Every Redis error the worker sees goes through :meth:`RedisLink.down` (unreachable, or out of memory), every
success through :meth:`RedisLink.up`; ``/healthz`` reads :meth:`RedisLink.problem`.
"""

from __future__ import annotations

import logging
import time

from stream.redact import redact_text
from stream.redisclient import redis_backoff, unavailable_errors
from workers.held import HeldResults
from workers.worker_metrics import WorkerQueueMetrics

log = logging.getLogger(__name__)

NOT_CONNECTED = "not connected yet"
HEARTBEAT_INTERVAL_S = 2.0
PUBLISH_ATTEMPTS = 5
HELD_RESULTS_LIMIT = 64  # results kept in the process while Redis is out of memory (workers.held)
OOM_RETRY_S = 0.1
DRAIN_HELD_S = 5.0


class RedisLink:
    """Redis as one worker sees it. ``queue`` (a :class:`stream.queue.FrameQueue`) is attached at connection."""

    def __init__(self, worker_id: str, line: str, qmetrics: WorkerQueueMetrics):
        self.worker_id = worker_id
        self.line = line
        self.qmetrics = qmetrics
        self.queue = None
        self.held: HeldResults | None = None
        self.ok = False
        self.error = NOT_CONNECTED
        self.oom_error = ""  # set while Redis refuses writes for maxmemory; cleared by the next publish
        self._last_heartbeat = 0.0

    def attach(self, queue) -> None:
        self.queue = queue
        self.held = HeldResults(queue, limit=HELD_RESULTS_LIMIT)

    # ------------------------------------------------------------------------------------ state
    def problem(self) -> str:
        """What ``/healthz`` reports about Redis ("" when it answers and takes writes); before the first
        connection, "" too (the model not being loaded is the news then)."""
        if not self.ok and self.error not in ("", NOT_CONNECTED):
            return f"redis unreachable: {self.error}"
        if self.oom_error:
            return f"redis out of memory: {self.oom_error}"
        return ""

    def up(self) -> None:
        self.ok, self.error = True, ""

    def down(self, exc: Exception) -> None:
        """Redis failed: unreachable (logged once, counted) or out of memory (:meth:`oom`)."""
        import redis

        if isinstance(exc, redis.OutOfMemoryError):
            self.oom(exc)
            return
        if self.ok or self.error == NOT_CONNECTED:
            log.error("worker %s: redis unreachable: %s", self.worker_id, exc)
        self.ok, self.error = False, redact_text(exc)
        self.qmetrics.redis_errors.labels(line=self.line).inc()

    def oom(self, exc: Exception) -> None:
        if not self.oom_error:
            log.error("worker %s: redis out of memory (%s): holding results, freeing frames", self.worker_id, exc)
        self.oom_error = redact_text(exc)
        self.qmetrics.redis_oom.labels(line=self.line).inc()

    # ------------------------------------------------------------------------------------ writes
    def heartbeat(self, force: bool = False) -> None:
        import redis

        now = time.monotonic()
        if force or now - self._last_heartbeat >= HEARTBEAT_INTERVAL_S:
            self._last_heartbeat = now
            try:
                self.queue.heartbeat(self.worker_id)
            except redis.OutOfMemoryError as exc:  # not a reason to stop draining
                self.oom(exc)
                return
            if self.oom_error and not self.held:  # a write went through: Redis has memory again
                self.oom_error = ""

    def complete(self, entry_id: str, frame_id: str, payload: bytes) -> bool | None:
        """complete() with a few retries (it is idempotent); None when Redis stayed unreachable."""
        backoff = redis_backoff()
        for attempt in range(PUBLISH_ATTEMPTS):
            try:
                published = self.queue.complete(entry_id, frame_id, payload)
                self.up()
                return published
            except unavailable_errors() as exc:
                self.down(exc)
                if attempt + 1 < PUBLISH_ATTEMPTS:
                    time.sleep(backoff.next_delay())
        log.error("worker %s: could not publish frame %s yet; holding its result", self.worker_id, frame_id)
        return None

    def flush_held(self) -> None:
        if self.held and self.held.flush() and not self.held:
            self.oom_error = ""
            log.info("worker %s: redis accepts writes again; held results published", self.worker_id)

    def drain_held(self) -> None:
        """On stop: try to publish held results for a few seconds; what stays held is left to a reclaim."""
        import redis

        deadline = time.monotonic() + DRAIN_HELD_S
        while self.held and time.monotonic() < deadline:
            try:
                self.flush_held()
            except redis.RedisError:
                pass
            if self.held:
                time.sleep(OOM_RETRY_S)
        if self.held:
            log.error("worker %s: %d held result(s) not published; their entries stay pending: another worker "
                      "reclaims them (or counts them as trimmed when their data was freed)", self.worker_id,
                      len(self.held))
