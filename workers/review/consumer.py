"""A worker's side of operator review, in its main thread between frames (:class:`ReviewConsumer`).

Every ``review.poll_interval_s`` the worker reads at most one request of its line from the reviews stream's
group (:data:`stream.review.requests.REVIEW_GROUP`: each request goes to one worker), its own unanswered ones
first (a request it read before Redis went away, or one taken over from a worker that died holding it for
``CLAIM_IDLE_S``), without blocking. The request's model work runs in the
model thread between frames (:class:`workers.review.apply.ReviewApplier`); once it is done the outcome is
written to the audit stream, counted, and the request acknowledged. A request that fails for a reason of its
own is audited as failed; Redis being unreachable leaves it pending for the next poll.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from stream.entries import text
from stream.keys import LineKeys
from stream.redisclient import unavailable_errors
from stream.review.requests import REVIEW_GROUP, ReviewInputError, ReviewOutcome, ReviewRequest, write_outcome
from workers.review.apply import Applied, ReviewApplier
from workers.review.metrics import ReviewMetrics

log = logging.getLogger(__name__)

CLAIM_IDLE_S = 300.0  # a request pending this long under another consumer (a worker that died) is taken over
CLAIM_EVERY_S = 30.0
REDIS_RETRY_S = 1.0  # after a Redis error, the next look for requests waits this much longer
WARN_EVERY_S = 30.0


@dataclass(frozen=True)
class _Running:
    request: ReviewRequest
    future: Future
    started: float


class ReviewConsumer:
    """Reads, applies (through the model thread) and audits one line's review requests."""

    def __init__(self, client: Any, keys: LineKeys, worker_id: str, applier: ReviewApplier,
                 metrics: ReviewMetrics, poll_interval_s: float = 0.5, audit_maxlen: int = 100000):
        self.client = client
        self.keys = keys
        self.worker_id = worker_id
        self.applier = applier
        self.metrics = metrics
        self.poll_interval_s = poll_interval_s
        self.audit_maxlen = audit_maxlen
        self._running: _Running | None = None
        self._last_read = float("-inf")
        self._group_ready = False
        self._own_pending = True  # read this consumer's unacknowledged requests first ("0"), then new ones
        self._last_claim = float("-inf")
        self._last_warning = float("-inf")

    @property
    def busy(self) -> bool:
        return self._running is not None

    def poll(self, model) -> None:
        """Finish a request the model thread has done; else, every ``poll_interval_s``, hand it the next one.
        Never blocks, and never raises for a Redis error: review must not stop inspection (the request stays
        pending and is read again; a group Redis lost, NOGROUP after a restart without data, is made again)."""
        import redis

        try:
            if self._running is not None:
                if not self._running.future.done():
                    return
                self._finish(self._running)
            now = time.monotonic()
            if now - self._last_read < self.poll_interval_s:
                return
            self._last_read = now
            request = self._next()
            if request is not None:
                self._running = _Running(request, model.submit(self.applier.apply, request), time.perf_counter())
        except redis.RedisError as exc:
            self._running = None
            self._own_pending = True
            if "NOGROUP" in str(exc):
                self._group_ready = False
            self._last_read = time.monotonic() + REDIS_RETRY_S  # no retry storm while Redis is away
            now = time.monotonic()
            if now - self._last_warning >= WARN_EVERY_S:
                self._last_warning = now
                log.warning("worker %s: review requests wait for Redis: %s: %s", self.worker_id,
                            type(exc).__name__, exc)

    def drain(self, timeout_s: float) -> None:
        """On shutdown: wait up to ``timeout_s`` for the request in the model thread and audit it."""
        running = self._running
        if running is None:
            return
        try:
            running.future.result(timeout=timeout_s)
        except Exception:  # audited as failed by _finish, or left pending on timeout
            pass
        if not running.future.done():
            return
        try:
            self._finish(running)
        except Exception as exc:  # Redis away at shutdown: the request stays pending for another worker
            log.warning("worker %s: review %s not audited at shutdown: %s", self.worker_id,
                        running.request.request_id, exc)

    # ------------------------------------------------------------------------------------ internals
    def _ensure_group(self) -> None:
        import redis

        if self._group_ready:
            return
        try:
            self.client.xgroup_create(self.keys.reviews, REVIEW_GROUP, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._group_ready = True

    def _next(self) -> ReviewRequest | None:
        """The next request to apply (its own unacknowledged ones first); a malformed one is audited and
        acknowledged here."""
        self._ensure_group()
        self._claim_abandoned()
        start = "0" if self._own_pending else ">"
        reply = self.client.xreadgroup(REVIEW_GROUP, self.worker_id, {self.keys.reviews: start}, count=1)
        entries = [(eid, fields) for _, items in reply or () for eid, fields in items]
        if not entries:
            self._own_pending = False
            return None
        entry_id, fields = entries[0]
        if not fields:  # trimmed meanwhile
            self.client.xack(self.keys.reviews, REVIEW_GROUP, entry_id)
            return None
        try:
            return ReviewRequest.from_entry(entry_id, fields)
        except ReviewInputError as exc:
            f = {text(k): text(v) for k, v in fields.items()}
            bad = ReviewOutcome(request_id=text(entry_id), line=self.keys.line, frame_id=f.get("frame_id", "")[:128],
                                decision=f.get("decision", "")[:16], who=f.get("who", "")[:64], requested_ts=0.0,
                                outcome="failed", reason=str(exc), worker=self.worker_id, applied_ts=time.time())
            self._audit(bad)
            self.client.xack(self.keys.reviews, REVIEW_GROUP, entry_id)
            return None

    def _claim_abandoned(self) -> None:
        """Every ``CLAIM_EVERY_S``: take over a request another consumer has held for ``CLAIM_IDLE_S`` (its
        worker died while applying it); it is then read as this consumer's own."""
        now = time.monotonic()
        if now - self._last_claim < CLAIM_EVERY_S:
            return
        self._last_claim = now
        reply = self.client.xautoclaim(self.keys.reviews, REVIEW_GROUP, self.worker_id,
                                       min_idle_time=int(CLAIM_IDLE_S * 1000), start_id="0-0", count=1)
        claimed = reply[1] if len(reply) > 1 else []
        if claimed:
            self._own_pending = True
            log.info("worker %s: took over review request %s of a worker that went away", self.worker_id,
                     text(claimed[0][0]))

    def _finish(self, running: _Running) -> None:
        """Audit, count and acknowledge a request the model thread is done with."""
        import redis

        req = running.request
        try:
            applied: Applied = running.future.result()
        except (*unavailable_errors(), redis.OutOfMemoryError):
            self._running = None
            self._own_pending = True
            raise
        except Exception as exc:  # anything else is this request's failure
            log.exception("worker %s: review %s of frame %s raised", self.worker_id, req.request_id, req.frame_id)
            applied = Applied("failed", reason=f"{type(exc).__name__}: {exc}")
        apply_s = time.perf_counter() - running.started
        server_ms = self._server_ms()
        latency = max(0.0, (server_ms - int(req.request_id.split("-")[0])) / 1000.0)
        outcome = ReviewOutcome(
            request_id=req.request_id, line=req.line, frame_id=req.frame_id, decision=req.decision, who=req.who,
            requested_ts=req.requested_ts, outcome=applied.outcome, reason=applied.reason, worker=self.worker_id,
            rows_added=applied.rows_added, memory_rows=applied.memory_rows, score_before=applied.score_before,
            score_after=applied.score_after, verdict_after=applied.verdict_after, latency_s=latency,
            files=applied.files, applied_ts=server_ms / 1000.0)
        self._audit(outcome)
        self.client.xack(self.keys.reviews, REVIEW_GROUP, req.request_id)
        self._running = None
        self.metrics.observe(req.line, outcome, apply_s)
        log.info("worker %s: review %s by %s: frame %s %s -> %s%s (rows +%d, score %.3f -> %.3f, %.2f s after "
                 "the request)", self.worker_id, req.request_id, req.who, req.frame_id, req.decision,
                 outcome.outcome, f" ({outcome.reason})" if outcome.reason else "", outcome.rows_added,
                 outcome.score_before, outcome.score_after, latency)

    def _server_ms(self) -> int:
        secs, micros = self.client.time()
        return int(secs) * 1000 + int(micros) // 1000

    def _audit(self, outcome: ReviewOutcome) -> None:
        write_outcome(self.client, self.keys, outcome, self.audit_maxlen)
