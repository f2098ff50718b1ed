"""One entry's trip through a worker: deliveries, decode, inspect, result, publish (:class:`FrameHandler`).

Per entry: more than ``queue.max_deliveries`` deliveries -> dead-letter; decode (any exception, typed
:class:`PayloadError` or not -> dead-letter with its reason at once); ``detector.inspect`` in the single model
thread with a timeout of ``queue.job_timeout_s`` (timeout: the entry stays pending for another worker and the
worker exits non-zero, because its model thread is stuck; an exception: counted in ``frames_failed``, the
entry stays pending and is retried after reclaim, and on its last allowed delivery it is dead-lettered with
that exception); build the :class:`InspectionResult` and :meth:`FrameQueue.complete` it (publish once, then
ack; an error other than Redis being unreachable or out of memory dead-letters the entry). Any other exception
of one entry dead-letters it (``error: ...``).

Stages (the worker's loop calls them; :meth:`FrameHandler.handle` runs them one after the other for one entry):
:meth:`~FrameHandler.prepare` (deliveries, decode: main thread), :meth:`~FrameHandler.submit` (hand the decoded
frames to the model thread, with one ``embed_batch`` call first when ``encoder_batch`` > 1),
:meth:`~FrameHandler.collect` (wait for one frame's detection, with heartbeats and the job timeout) and
:meth:`~FrameHandler.complete` (result, publish + ack). With ``worker.overlap`` the worker prepares the next
entry and completes the previous one while the model thread works (:mod:`workers.worker`).

Result timings: ``decode`` (payload -> image), the detector's stages (``Detection.timings``) and ``encode``
(label-mask PNG). The publish round trip cannot be inside the result it publishes: it is observed in
``lineinspect_stage_seconds{stage="publish"}`` (result building + the Lua call), next to every other stage.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from stream.contracts import InspectionResult, PayloadError, Verdict
from stream.redisclient import unavailable_errors
from workers.held import HeldResult
from workers.model_thread import ModelThread
from workers.redis_link import HEARTBEAT_INTERVAL_S, RedisLink
from workers.worker_metrics import WorkerCounts, WorkerQueueMetrics

if TYPE_CHECKING:
    import numpy as np

    from config.settings import QueueSettings
    from stream.contracts import Frame
    from stream.prometheus_metrics import WorkerMetrics
    from workers.interfaces import Detection, FrameDetector
    from workers.review.keeper import FrameKeeper

log = logging.getLogger(__name__)

MAX_REASON_CHARS = 500


class ModelStuck(Exception):
    """A frame's inspection exceeded ``queue.job_timeout_s``: the model thread is stuck, the worker exits."""


@dataclass(frozen=True)
class Prepared:
    """An entry decoded and ready for the model."""

    entry: Any
    frame: Frame
    image: np.ndarray
    decode_s: float


@dataclass(frozen=True)
class Running:
    """A prepared entry handed to the model thread; ``future`` holds its :class:`Detection`."""

    prepared: Prepared
    future: Future


@dataclass(frozen=True)
class _Built:
    """A frame's result, ready to publish: ``started`` is when building it began (publish time is counted
    from there, less the ``encode`` stage)."""

    result: InspectionResult
    payload: bytes
    timings: dict[str, float]
    started: float


class FrameHandler:
    """Handles one worker's entries with its loaded ``detector``; Redis state and held results in ``link``."""

    def __init__(self, config: QueueSettings, line: str, worker_id: str, detector: FrameDetector,
                 link: RedisLink, metrics: WorkerMetrics, qmetrics: WorkerQueueMetrics, counts: WorkerCounts,
                 encoder_batch: int = 1, keeper: FrameKeeper | None = None):
        self.config = config
        self.line = line
        self.worker_id = worker_id
        self.detector = detector
        self.link = link
        self.queue = link.queue
        self.metrics = metrics
        self.qmetrics = qmetrics
        self.counts = counts
        self._orphans_seen = 0
        # frames per embed_batch call in submit (1: every frame embedded by its own inspect call)
        self.encoder_batch = encoder_batch if callable(getattr(detector, "embed_batch", None)) else 1
        self._in_flight = 0  # frames handed to the model thread and not collected yet (the busy gauge)
        self.keeper = keeper  # review window sink: each published frame and its result (workers.review.keeper)

    def handle(self, entry, model: ModelThread) -> bool:
        """One entry from start to end: :meth:`prepare`, :meth:`submit`, :meth:`collect`, :meth:`complete`.
        False when the model thread is stuck (the worker must exit); every other outcome is handled here
        (dead-lettered, left for retry, held). Redis being unreachable or out of memory is raised."""
        for prepared in self.prepare([entry]):
            (running,) = self.submit([prepared], model)
            try:
                det = self.collect(running)
            except ModelStuck:
                return False
            self.complete(running, det)
        return True

    def _guarded(self, entry, fn, *args):
        """``fn(*args)``, where an unexpected error of one entry dead-letters it (None) and the worker goes on.

        Redis being unreachable or out of memory is not the entry's fault: raised to the loop (entry pending)."""
        import redis

        try:
            return fn(*args)
        except (*unavailable_errors(), redis.OutOfMemoryError, ModelStuck):
            raise
        except Exception as exc:
            log.exception("worker %s: entry %s raised", self.worker_id, entry.entry_id)
            try:
                self._dead_letter(entry, f"error: {type(exc).__name__}: {exc}", "error")
            except redis.ResponseError as dl_exc:  # e.g. no permission for the script: leave it pending
                log.error("worker %s: entry %s cannot be dead-lettered: %s", self.worker_id, entry.entry_id,
                          dl_exc)
            return None

    # ------------------------------------------------------------------------------------ stages
    def prepare(self, entries) -> list[Prepared]:
        """The entries that can go to the model, decoded (main thread); the others are dead-lettered here."""
        out = []
        for entry in entries:
            prepared = self._guarded(entry, self._prepare_one, entry)
            if prepared is not None:
                out.append(prepared)
        return out

    def _prepare_one(self, entry) -> Prepared | None:
        if not self._deliverable(entry):
            return None
        decoded = self._decode(entry)
        if decoded is None:
            return None
        frame, image, decode_s = decoded
        return Prepared(entry, frame, image, decode_s)

    def submit(self, prepared: list[Prepared], model: ModelThread) -> list[Running]:
        """Hand the frames to the model thread, in order; with ``encoder_batch`` > 1 each run of that many
        frames is embedded first in one ``detector.embed_batch`` call (its ``inspect`` calls then find the
        embeddings in the detector's cache)."""
        running = []
        for start in range(0, len(prepared), self.encoder_batch):
            chunk = prepared[start:start + self.encoder_batch]
            if len(chunk) > 1:
                model.submit(self._embed_batch, [p.image for p in chunk], [p.frame.frame_id for p in chunk])
            for p in chunk:
                running.append(Running(p, model.submit(self.detector.inspect, p.image, p.frame.frame_id)))
        self._in_flight += len(running)
        if running:
            self.metrics.busy.labels(line=self.line).set(1)
        return running

    def _embed_batch(self, images: list, keys: list[str]) -> None:
        """In the model thread: one encoder call for several frames. A failure only costs the batching: each
        frame's ``inspect`` embeds it again (and fails there, counted, if the frame is at fault)."""
        try:
            self.detector.embed_batch(images, keys)
        except Exception as exc:
            log.warning("worker %s: batched encoder call for %d frames failed (%s: %s); embedding them one by "
                        "one", self.worker_id, len(keys), type(exc).__name__, exc)

    def collect(self, running: Running) -> Detection | None:
        """The frame's detection; None when the detector raised (counted, retried or dead-lettered). Raises
        :class:`ModelStuck` after ``queue.job_timeout_s`` (the entry stays pending)."""
        p = running.prepared
        try:
            return self._guarded(p.entry, self._inspect, p.entry, p.frame.frame_id, running.future)
        finally:
            self._in_flight = max(0, self._in_flight - 1)
            if not self._in_flight:
                self.metrics.busy.labels(line=self.line).set(0)

    def complete(self, running: Running, det: Detection | None) -> None:
        """Build the frame's result and publish + acknowledge it (nothing when ``det`` is None)."""
        if det is None:
            return
        p = running.prepared
        self._guarded(p.entry, self._complete_one, p, det)

    def _complete_one(self, p: Prepared, det: Detection) -> None:
        built = self._result(p.entry, p.frame, det, p.decode_s)
        if built is not None:
            self._publish(p.entry, built)

    def _deliverable(self, entry) -> bool:
        """False (and dead-lettered) when the entry was delivered too often or carries no payload."""
        q = self.config
        if entry.deliveries > q.max_deliveries:
            last = self.queue.last_failure(entry.entry_id)  # e.g. a job timeout of the worker that died
            label = "job_timeout" if last.startswith("job_timeout") else "max_deliveries"
            self._dead_letter(entry, f"{label}: delivered {entry.deliveries} times (limit {q.max_deliveries})"
                                     + (f"; last failure: {last}" if last else ""), label)
            return False
        if entry.payload is None:
            self._dead_letter(entry, "payload: entry has no 'p' field", "payload")
            return False
        return True

    def _decode(self, entry) -> tuple[Frame, np.ndarray, float] | None:
        """(frame, image, seconds) of the entry's payload; None (dead-lettered) when it cannot be decoded."""
        from stream import wire

        limit = self.config.max_frame_pixels
        t0 = time.perf_counter()
        try:
            frame = wire.decode_frame(entry.payload, limit)
            image = wire.frame_to_image(frame, limit)
        except PayloadError as exc:
            self._dead_letter(entry, f"payload: {exc.reason}", "payload")
            return None
        except Exception as exc:  # anything else a crafted payload provokes is still this entry's fault
            self._dead_letter(entry, f"payload: {type(exc).__name__}: {exc}", "payload")
            return None
        return frame, image, time.perf_counter() - t0

    def _inspect(self, entry, frame_id: str, future: Future) -> Detection | None:
        """The detector's result from the model thread; None when it raised (counted, retried or
        dead-lettered). Raises :class:`ModelStuck` after ``queue.job_timeout_s`` (the entry stays pending)."""
        q = self.config
        try:
            return self._wait(future, q.job_timeout_s)
        except Exception as exc:
            if future.done():  # the detector raised (even a TimeoutError of its own)
                self._failed(entry, frame_id, "inspect", exc)
                return None
        self.qmetrics.job_timeouts.labels(line=self.line).inc()
        self._note_failure(entry, f"job_timeout: exceeded job_timeout_s={q.job_timeout_s:g} "
                                  f"(worker {self.worker_id}, delivery {entry.deliveries})")
        log.error("worker %s: frame %s (entry %s) exceeded job_timeout_s=%.1f; leaving it pending "
                  "for another worker and exiting (model thread stuck)", self.worker_id,
                  frame_id, entry.entry_id, q.job_timeout_s)
        raise ModelStuck(frame_id)

    def _result(self, entry, frame: Frame, det: Detection, decode_s: float) -> _Built | None:
        """The frame's :class:`InspectionResult` and its wire payload; None when the detection cannot be encoded
        (like a detector failure: retried, then dead-lettered)."""
        from stream import wire

        t1 = time.perf_counter()
        try:
            mask_png = wire.encode_label_mask(det.labels) if det.defects else b""
            timings = {"decode": decode_s, **{k: float(v) for k, v in det.timings.items()},
                       "encode": time.perf_counter() - t1}
            result = InspectionResult(
                frame_id=frame.frame_id, line_id=frame.line_id, camera_id=frame.camera_id, seq=frame.seq,
                capture_ts=frame.capture_ts, image_score=float(det.image_score), threshold=1.0,
                verdict=det.verdict, defects=tuple(det.defects), mask_png=mask_png, timings=timings,
                models={**dict(self.detector.models), **dict(det.models)}, worker_id=self.worker_id,
                processed_ts=time.time())
            payload = wire.encode_result(result)
        except Exception as exc:  # a malformed Detection
            self._failed(entry, frame.frame_id, "encode", exc)
            return None
        return _Built(result, payload, timings, t1)

    def _publish(self, entry, built: _Built) -> None:
        """Publish and acknowledge; a result Redis cannot take now is held (workers.held) and published later."""
        import redis

        def _finished(published: bool) -> None:
            publish_s = time.perf_counter() - built.started - built.timings["encode"]
            self._finished(built.result, built.timings, publish_s, published)

        frame_id = built.result.frame_id
        held = HeldResult(entry.entry_id, frame_id, built.payload, _finished)
        try:
            published = self.link.complete(entry.entry_id, frame_id, built.payload)
        except redis.OutOfMemoryError as exc:  # keep the result, free the frame, go on
            self.link.oom(exc)
            self.link.held.hold(held)
            return
        except unavailable_errors():
            raise
        except Exception as exc:  # e.g. a key Redis refuses: this entry cannot be published, ever
            self._dead_letter(entry, f"publish: {type(exc).__name__}: {exc}", "publish")
            return
        if published is None:  # Redis gone: keep the result and publish it when Redis answers
            self.link.held.hold(held, release=False)
            return
        self.link.oom_error = ""
        _finished(published)
        if published and self.keeper is not None:
            r = built.result
            self.keeper.keep(frame_id, entry.payload, built.payload, r.processed_ts, r.verdict is Verdict.DEFECT)

    def _finished(self, result: InspectionResult, timings: dict, publish_s: float, published: bool) -> None:
        """Metrics of a frame whose result was published (or found published already)."""
        m = self.metrics
        if self.queue.orphaned > self._orphans_seen:
            n, self._orphans_seen = self.queue.orphaned - self._orphans_seen, self.queue.orphaned
            self.qmetrics.orphan_results.labels(line=self.line).inc(n)
            log.warning("worker %s: %d orphan result(s): frame %s answered, its entry was no longer pending "
                        "(Redis lost the stream, or it was trimmed and counted)", self.worker_id, n, result.frame_id)
        for stage, seconds in {**timings, "publish": publish_s}.items():
            m.stage_seconds.labels(line=self.line, stage=stage).observe(seconds)
        if published:
            self.counts.processed += 1
            m.frames_processed.labels(line=self.line).inc()
            m.verdicts.labels(line=self.line, verdict=result.verdict.value).inc()
            if result.defects:
                m.defects.labels(line=self.line).inc(len(result.defects))
            m.end_to_end_seconds.labels(line=self.line).observe(max(0.0, time.time() - result.capture_ts))
        else:
            self.counts.duplicates += 1
            m.duplicates_skipped.labels(line=self.line).inc()
            log.info("worker %s: frame %s already had a result; acknowledged without publishing",
                     self.worker_id, result.frame_id)

    def _wait(self, future: Future, timeout_s: float):
        """The detector's result; heartbeats go on while a long inspection runs (FutureTimeout after timeout_s)."""
        import redis

        deadline = time.monotonic() + timeout_s
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise FutureTimeout()
            try:
                return future.result(timeout=min(remaining, HEARTBEAT_INTERVAL_S))
            except FutureTimeout:
                if future.done():
                    raise
                try:
                    self.link.heartbeat()
                except redis.RedisError:
                    pass

    def _failed(self, entry, frame_id: str, stage: str, exc: BaseException) -> None:
        """A frame failed in ``stage``: left pending for a retry, or dead-lettered with this reason on its last
        allowed delivery (so the dead-letter stream says why, not only "delivered N times")."""
        q = self.config
        self.counts.failed += 1
        self.metrics.frames_failed.labels(line=self.line).inc()
        reason = f"{stage}: {type(exc).__name__}: {exc}"
        if entry.deliveries >= q.max_deliveries:
            self._dead_letter(entry, f"{reason} (delivery {entry.deliveries} of {q.max_deliveries})", stage)
            return
        self._note_failure(entry, reason)
        log.warning("worker %s: frame %s failed (delivery %d of %d), left for retry: %s", self.worker_id,
                    frame_id, entry.deliveries, q.max_deliveries, reason)

    def _note_failure(self, entry, reason: str) -> None:
        import redis

        try:
            self.queue.note_failure(entry.entry_id, reason[:MAX_REASON_CHARS])
        except redis.RedisError as exc:  # only a better dead-letter reason is lost
            log.warning("worker %s: failure of entry %s not noted: %s", self.worker_id, entry.entry_id, exc)

    def _dead_letter(self, entry, reason: str, label: str) -> None:
        # the reason may quote crafted text: valid UTF-8 (lone surrogates escaped), bounded length
        reason = reason.encode("utf-8", "backslashreplace").decode("utf-8")[:MAX_REASON_CHARS]
        self.queue.dead_letter(entry.entry_id, entry.payload, reason, entry.deliveries, self.worker_id)
        self.counts.dead_lettered += 1
        self.metrics.frames_dead_lettered.labels(line=self.line, reason=label).inc()
        log.warning("worker %s: entry %s dead-lettered: %s", self.worker_id, entry.entry_id, reason)
