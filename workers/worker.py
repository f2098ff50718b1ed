"""Detection worker: one process per consumer of a line's worker group.

Start-up: connect, create the group, start the metrics/health server, load the detector ONCE
(``pipeline`` = :func:`workers.pipeline.build_detector`, or a stand-in from :mod:`workers.noop`), log which
map source, models and weights it uses.

Loop:
1. every ``queue.claim_interval_s``: reclaim entries idle longer than ``queue.claim_idle_ms`` (a dead or
   stuck consumer's frames), count the ones trimmed meanwhile, refresh queue gauges;
2. read new entries (``XREADGROUP >``, ``queue.block_ms``, ``queue.batch``);
3. per entry: more than ``queue.max_deliveries`` deliveries -> dead-letter; decode (any exception, typed
   :class:`PayloadError` or not -> dead-letter with its reason at once); ``detector.inspect`` in a single
   model thread with a timeout of ``queue.job_timeout_s`` (timeout: the entry stays pending for another
   worker and this worker exits non-zero, because its model thread is stuck; an exception: counted in
   ``frames_failed``, the entry stays pending and is retried after reclaim, and on its last allowed delivery
   it is dead-lettered with that exception); build the :class:`InspectionResult` and
   :meth:`FrameQueue.complete` it (publish once, then ack; an error other than Redis being unreachable or out
   of memory dead-letters the entry). Any other exception of one entry dead-letters it (``error: ...``).

Result timings: ``decode`` (payload -> image), the detector's stages (``Detection.timings``) and ``encode``
(label-mask PNG). The publish round trip cannot be inside the result it publishes: it is observed in
``lineinspect_stage_seconds{stage="publish"}`` (result building + the Lua call), next to every other stage.

SIGTERM/SIGINT drain: the frames in hand are finished, published and acknowledged, then exit 0.

Exit codes: 0 stopped/drained, 2 detector could not be loaded or the Redis user lacks a permission the
worker needs (checked at start-up: :meth:`FrameQueue.check_access`), 3 a job timed out (model thread stuck).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import threading
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout

from config.settings import Settings
from stream.backoff import Backoff
from stream.contracts import InspectionResult, ModelLoadError, PayloadError, QueueAccessError
from stream.keys import line_keys
from stream.redact import redact_text
from stream.redisclient import unavailable_errors
from workers.held import HeldResults

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_MODEL = 2
EXIT_STUCK = 3
HEARTBEAT_INTERVAL_S = 2.0
# retry waits while Redis is unreachable: capped at 0.1 s so that work resumes within 1 s of Redis answering
# again (a refused connection costs nothing; a frozen Redis is bounded by redis.socket_timeout_s instead)
REDIS_RETRY_INITIAL_S = 0.05
REDIS_RETRY_MAX_S = 0.1
PUBLISH_ATTEMPTS = 5
MAX_REASON_CHARS = 500
HELD_RESULTS_LIMIT = 64  # results kept in the process while Redis is out of memory (workers.held)
OOM_RETRY_S = 0.1
DRAIN_HELD_S = 5.0


class WorkerQueueMetrics:
    """Counters of the worker's queue handling that :class:`stream.prometheus_metrics.WorkerMetrics` has no place for."""

    def __init__(self, registry):
        from prometheus_client import Counter

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


class _ModelThread:
    """One daemon thread that runs the detector. A stuck call does not keep the process from exiting."""

    def __init__(self) -> None:
        import queue

        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="model", daemon=True)

    def start(self) -> _ModelThread:
        self._thread.start()
        return self

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            future, fn, args = job
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args))
            except BaseException as exc:  # handed to the caller through the future
                future.set_exception(exc)

    def submit(self, fn, *args) -> Future:
        future: Future = Future()
        self._jobs.put((future, fn, args))
        return future

    def shutdown(self) -> None:
        self._jobs.put(None)


def default_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


def load_detector(settings: Settings, line: str, name: str, client):
    """The detector named ``name``: ``pipeline`` (the real one, loaded lazily) or a :mod:`workers.noop` one."""
    if name == "pipeline":
        try:
            from workers.pipeline import build_detector
        except ImportError as exc:
            raise ModelLoadError(f"workers.pipeline cannot be imported: {exc}") from exc
        return build_detector(settings, line, client)
    from workers.noop import make_test_detector

    try:
        return make_test_detector(name)
    except ValueError as exc:
        raise ModelLoadError(f"{exc} (or: pipeline)") from None


class Worker:
    """The loop of one consumer. Nothing connects in the constructor; :meth:`run` does everything."""

    def __init__(self, settings: Settings, line: str, worker_id: str, detector_name: str, registry, client):
        from stream.prometheus_metrics import WorkerMetrics

        self.settings = settings
        self.line = line
        self.worker_id = worker_id
        self.detector_name = detector_name
        self.registry = registry
        self.client = client
        self.keys = line_keys(settings.redis.key_prefix, line, settings.redis.key_layout)
        self.metrics = WorkerMetrics(registry)
        self.qmetrics = WorkerQueueMetrics(registry)
        self.detector = None
        self.queue = None
        self.redis_ok = False
        self.redis_error = "not connected yet"
        self.oom_error = ""  # set while Redis refuses writes for maxmemory; cleared by the next publish
        self.held = None  # workers.held.HeldResults, once connected
        self.processed = self.duplicates = self.failed = self.dead_lettered = self.reclaimed = 0
        self._last_heartbeat = 0.0
        self._last_prune = float("-inf")
        self._orphans_seen = 0

    # ------------------------------------------------------------------------------------ health
    def health(self) -> tuple[bool, str]:
        if not self.redis_ok and self.redis_error not in ("", "not connected yet"):
            return False, f"redis unreachable: {self.redis_error}"
        if self.oom_error:
            return False, f"redis out of memory: {self.oom_error}"
        if self.detector is None:
            return False, f"model not loaded ({self.detector_name})"
        if not self.redis_ok:
            return False, f"redis unreachable: {self.redis_error}"
        return True, "ok"

    # ------------------------------------------------------------------------------------ start-up
    def _connect(self, stop: threading.Event) -> bool:
        import redis

        from stream.queue import FrameQueue

        self.queue = FrameQueue(self.client, self.keys, self.settings.queue, self.worker_id)
        self.held = HeldResults(self.queue, limit=HELD_RESULTS_LIMIT)
        backoff = Backoff(REDIS_RETRY_INITIAL_S, REDIS_RETRY_MAX_S)
        while not stop.is_set():
            try:
                self.queue.ensure_group()
                self.queue.check_access()
                self.redis_ok, self.redis_error = True, ""
                return True
            except (*unavailable_errors(), redis.OutOfMemoryError) as exc:
                self._redis_down(exc)
                if stop.wait(backoff.next_delay()):
                    break
        return False

    def _load(self) -> None:
        s = self.settings
        t0 = time.perf_counter()
        detector = load_detector(s, self.line, self.detector_name, self.client)
        load_s = time.perf_counter() - t0
        models = dict(detector.models)
        self.metrics.model_load_seconds.labels(line=self.line).set(load_s)
        info = {"detector": self.detector_name, "map_source": s.detector.map_source,
                **{f"model_{k}": str(v) for k, v in models.items()}}
        if self.detector_name == "pipeline":
            info.update(sam_backend=s.sam.backend, sam_encoder=s.sam.encoder_path, sam_decoder=s.sam.decoder_path,
                        clip_model=s.clip.model, clip_weights=s.clip.pretrained, memory_features=s.memory.features)
        self.metrics.model_info.info(info)
        log.info("worker %s line %s: detector %s loaded in %.2fs; map source %s; models %s%s", self.worker_id,
                 self.line, self.detector_name, load_s, s.detector.map_source, models,
                 (f"; weights: sam={s.sam.backend}:{s.sam.encoder_path},{s.sam.decoder_path} "
                  f"clip={s.clip.model}:{s.clip.pretrained}") if self.detector_name == "pipeline" else "")
        self.detector = detector

    # ------------------------------------------------------------------------------------ loop
    def _redis_down(self, exc: Exception) -> None:
        import redis

        if isinstance(exc, redis.OutOfMemoryError):
            self._oom(exc)
            return
        if self.redis_ok or self.redis_error == "not connected yet":
            log.error("worker %s: redis unreachable: %s", self.worker_id, exc)
        self.redis_ok, self.redis_error = False, redact_text(exc)
        self.qmetrics.redis_errors.labels(line=self.line).inc()

    def _oom(self, exc: Exception) -> None:
        if not self.oom_error:
            log.error("worker %s: redis out of memory (%s): holding results, freeing frames", self.worker_id, exc)
        self.oom_error = redact_text(exc)
        self.qmetrics.redis_oom.labels(line=self.line).inc()

    def _heartbeat(self, force: bool = False) -> None:
        import redis

        now = time.monotonic()
        if force or now - self._last_heartbeat >= HEARTBEAT_INTERVAL_S:
            self._last_heartbeat = now
            try:
                self.queue.heartbeat(self.worker_id)
            except redis.OutOfMemoryError as exc:  # not a reason to stop draining
                self._oom(exc)
                return
            if self.oom_error and not self.held:  # a write went through: Redis has memory again
                self.oom_error = ""

    def _drain_held(self) -> None:
        """On stop: try to publish held results for a few seconds; what stays held is left to a reclaim."""
        import redis

        deadline = time.monotonic() + DRAIN_HELD_S
        while self.held and time.monotonic() < deadline:
            try:
                self._flush_held()
            except redis.RedisError:
                pass
            if self.held:
                time.sleep(OOM_RETRY_S)
        if self.held:
            log.error("worker %s: %d held result(s) not published; their entries stay pending: another worker "
                      "reclaims them (or counts them as trimmed when their data was freed)", self.worker_id,
                      len(self.held))

    def _flush_held(self) -> None:
        if self.held and self.held.flush() and not self.held:
            self.oom_error = ""
            log.info("worker %s: redis accepts writes again; held results published", self.worker_id)

    def _prune(self) -> None:
        """Every ``dead_consumer_idle_s / 2`` (at most a minute): remove dead consumers and stale heartbeats."""
        import redis

        idle_s = self.settings.queue.dead_consumer_idle_s
        now = time.monotonic()
        if now - self._last_prune < min(60.0, idle_s / 2):
            return
        self._last_prune = now
        try:
            removed, stale = self.queue.prune(idle_s)
        except (*unavailable_errors(), redis.OutOfMemoryError):
            raise
        except redis.ResponseError as exc:  # e.g. no permission for XGROUP DELCONSUMER: housekeeping only
            log.warning("worker %s: cannot remove dead consumers: %s", self.worker_id, exc)
            return
        if removed or stale:
            log.info("worker %s: removed %d dead consumer(s) %s and %d stale heartbeat(s)", self.worker_id,
                     len(removed), removed[:5], len(stale))

    def _reclaim(self) -> list:
        self._prune()
        claim = self.queue.reclaim()
        if claim.deleted_ids:
            n = len(claim.deleted_ids)
            self.qmetrics.trimmed_pending.labels(line=self.line).inc(n)
            log.warning("worker %s: %d pending frame(s) were trimmed before being finished", self.worker_id, n)
        if claim.entries:
            self.reclaimed += len(claim.entries)
            self.metrics.frames_reclaimed.labels(line=self.line).inc(len(claim.entries))
            log.info("worker %s: reclaimed %d idle entr%s", self.worker_id, len(claim.entries),
                     "y" if len(claim.entries) == 1 else "ies")
        stats = self.queue.stats()
        self.metrics.queue_length.labels(line=self.line).set(stats.length)
        self.metrics.group_lag.labels(line=self.line).set(max(stats.lag, 0))
        self.metrics.pending.labels(line=self.line).set(stats.pending)
        return list(claim.entries)

    def _dead_letter(self, entry, reason: str, label: str) -> None:
        # the reason may quote crafted text: valid UTF-8 (lone surrogates escaped), bounded length
        reason = reason.encode("utf-8", "backslashreplace").decode("utf-8")[:MAX_REASON_CHARS]
        self.queue.dead_letter(entry.entry_id, entry.payload, reason, entry.deliveries, self.worker_id)
        self.dead_lettered += 1
        self.metrics.frames_dead_lettered.labels(line=self.line, reason=label).inc()
        log.warning("worker %s: entry %s dead-lettered: %s", self.worker_id, entry.entry_id, reason)

    def _failed(self, entry, frame_id: str, stage: str, exc: BaseException) -> None:
        """A frame failed in ``stage``: left pending for a retry, or dead-lettered with this reason on its last
        allowed delivery (so the dead-letter stream says why, not only "delivered N times")."""
        q = self.settings.queue
        self.failed += 1
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

    def _process_guarded(self, entry, model: _ModelThread) -> bool:
        """:meth:`_process`, where an unexpected error of one entry dead-letters it and the worker goes on.

        Redis being unreachable or out of memory is not the entry's fault: raised to the loop (entry pending).
        """
        import redis

        try:
            return self._process(entry, model)
        except (*unavailable_errors(), redis.OutOfMemoryError):
            raise
        except Exception as exc:
            log.exception("worker %s: entry %s raised", self.worker_id, entry.entry_id)
            try:
                self._dead_letter(entry, f"error: {type(exc).__name__}: {exc}", "error")
            except redis.ResponseError as dl_exc:  # e.g. no permission for the script: leave it pending
                log.error("worker %s: entry %s cannot be dead-lettered: %s", self.worker_id, entry.entry_id,
                          dl_exc)
            return True

    def _process(self, entry, model: _ModelThread) -> bool:
        """Handle one entry. Returns False when the model thread is stuck (the worker must exit)."""
        import redis

        from stream import wire

        q = self.settings.queue
        if entry.deliveries > q.max_deliveries:
            last = self.queue.last_failure(entry.entry_id)  # e.g. a job timeout of the worker that died
            label = "job_timeout" if last.startswith("job_timeout") else "max_deliveries"
            self._dead_letter(entry, f"{label}: delivered {entry.deliveries} times (limit {q.max_deliveries})"
                                     + (f"; last failure: {last}" if last else ""), label)
            return True
        if entry.payload is None:
            self._dead_letter(entry, "payload: entry has no 'p' field", "payload")
            return True
        t0 = time.perf_counter()
        try:
            frame = wire.decode_frame(entry.payload, q.max_frame_pixels)
            image = wire.frame_to_image(frame, q.max_frame_pixels)
        except PayloadError as exc:
            self._dead_letter(entry, f"payload: {exc.reason}", "payload")
            return True
        except Exception as exc:  # anything else a crafted payload provokes is still this entry's fault
            self._dead_letter(entry, f"payload: {type(exc).__name__}: {exc}", "payload")
            return True
        decode_s = time.perf_counter() - t0

        self.metrics.busy.labels(line=self.line).set(1)
        try:
            future = model.submit(self.detector.inspect, image, frame.frame_id)
            try:
                det = self._wait(future, q.job_timeout_s)
            except Exception as exc:
                if future.done():  # the detector raised (even a TimeoutError of its own)
                    self._failed(entry, frame.frame_id, "inspect", exc)
                    return True
                self.qmetrics.job_timeouts.labels(line=self.line).inc()
                self._note_failure(entry, f"job_timeout: exceeded job_timeout_s={q.job_timeout_s:g} "
                                          f"(worker {self.worker_id}, delivery {entry.deliveries})")
                log.error("worker %s: frame %s (entry %s) exceeded job_timeout_s=%.1f; leaving it pending "
                          "for another worker and exiting (model thread stuck)", self.worker_id,
                          frame.frame_id, entry.entry_id, q.job_timeout_s)
                return False
        finally:
            self.metrics.busy.labels(line=self.line).set(0)

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
        except Exception as exc:  # a malformed Detection: like a detector failure, retried then dead-lettered
            self._failed(entry, frame.frame_id, "encode", exc)
            return True

        from workers.held import HeldResult

        def _finished(published: bool) -> None:
            self._finished(result, timings, time.perf_counter() - t1 - timings["encode"], published)

        try:
            published = self._complete(entry.entry_id, frame.frame_id, payload)
        except redis.OutOfMemoryError as exc:  # keep the result, free the frame, go on (workers.held)
            self._oom(exc)
            self.held.hold(HeldResult(entry.entry_id, frame.frame_id, payload, _finished))
            return True
        except unavailable_errors():
            raise
        except Exception as exc:  # e.g. a key Redis refuses: this entry cannot be published, ever
            self._dead_letter(entry, f"publish: {type(exc).__name__}: {exc}", "publish")
            return True
        if published is None:  # Redis gone: keep the result and publish it when Redis answers (workers.held)
            self.held.hold(HeldResult(entry.entry_id, frame.frame_id, payload, _finished), release=False)
            return True
        self.oom_error = ""
        _finished(published)
        return True

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
            self.processed += 1
            m.frames_processed.labels(line=self.line).inc()
            m.verdicts.labels(line=self.line, verdict=result.verdict.value).inc()
            if result.defects:
                m.defects.labels(line=self.line).inc(len(result.defects))
            m.end_to_end_seconds.labels(line=self.line).observe(max(0.0, time.time() - result.capture_ts))
        else:
            self.duplicates += 1
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
                    self._heartbeat()
                except redis.RedisError:
                    pass

    def _complete(self, entry_id: str, frame_id: str, payload: bytes) -> bool | None:
        """complete() with a few retries (it is idempotent); None when Redis stayed unreachable."""

        backoff = Backoff(REDIS_RETRY_INITIAL_S, REDIS_RETRY_MAX_S)
        for attempt in range(PUBLISH_ATTEMPTS):
            try:
                published = self.queue.complete(entry_id, frame_id, payload)
                self.redis_ok, self.redis_error = True, ""
                return published
            except unavailable_errors() as exc:
                self._redis_down(exc)
                if attempt + 1 < PUBLISH_ATTEMPTS:
                    time.sleep(backoff.next_delay())
        log.error("worker %s: could not publish frame %s yet; holding its result", self.worker_id, frame_id)
        return None

    def run(self, stop: threading.Event) -> int:
        import redis

        s = self.settings
        server = None
        if s.metrics.enabled:
            from stream.health import start_metrics_server

            server = start_metrics_server(self.registry, s.metrics.host, s.metrics.port, self.health)
        model = None
        try:
            log.info("worker %s start: line=%s stream=%s group=%s detector=%s claim_idle_ms=%d "
                     "max_deliveries=%d job_timeout_s=%.1f", self.worker_id, self.line, self.keys.frames,
                     s.queue.group, self.detector_name, s.queue.claim_idle_ms, s.queue.max_deliveries,
                     s.queue.job_timeout_s)
            try:
                if not self._connect(stop):  # the detector may need Redis (the line's memory)
                    return EXIT_OK
            except QueueAccessError as exc:
                self.redis_error = redact_text(exc)
                log.error("worker %s cannot start: %s", self.worker_id, exc)
                return EXIT_MODEL
            try:
                self._load()
            except ModelLoadError as exc:
                log.error("worker %s: detector %s not loaded: %s", self.worker_id, self.detector_name, exc)
                return EXIT_MODEL
            except Exception:  # any other failure while loading models: no verdicts from this process
                log.exception("worker %s: detector %s failed to load", self.worker_id, self.detector_name)
                return EXIT_MODEL
            model = _ModelThread().start()
            last_claim = float("-inf")
            backoff = Backoff(REDIS_RETRY_INITIAL_S, REDIS_RETRY_MAX_S)
            while not stop.is_set():
                try:
                    self._heartbeat()
                    self._flush_held()
                    if self.held.full():  # Redis still full: publish what is held before reading more
                        if stop.wait(OOM_RETRY_S):
                            break
                        continue
                    entries = []
                    if time.monotonic() - last_claim >= s.queue.claim_interval_s:
                        entries = self._reclaim()
                        if len(entries) < s.queue.batch:  # a full batch: more may wait, claim again
                            last_claim = time.monotonic()
                    if not entries:
                        entries = self.queue.read()
                    self.redis_ok, self.redis_error = True, ""
                    backoff.reset()
                    for entry in entries:  # on SIGTERM the entries in hand are still finished (drain)
                        if not self._process_guarded(entry, model):
                            return EXIT_STUCK
                except (*unavailable_errors(), redis.OutOfMemoryError) as exc:
                    self._redis_down(exc)
                    if stop.wait(backoff.next_delay()):
                        break
            self._drain_held()
            log.info("worker %s: stopping (drained)", self.worker_id)
            return EXIT_OK
        finally:
            if model is not None:
                model.shutdown()
            if self.queue is not None:
                try:
                    self.queue.remove_heartbeat(self.worker_id)
                except redis.RedisError:
                    pass
            if server is not None:
                server.stop()
            log.info("worker %s end: processed=%d duplicates=%d failed=%d dead_lettered=%d reclaimed=%d",
                     self.worker_id, self.processed, self.duplicates, self.failed, self.dead_lettered,
                     self.reclaimed)


def _redis_client(settings: Settings):
    from stream.redisclient import make_client

    timeout = settings.redis.socket_timeout_s
    # XREADGROUP blocks up to queue.block_ms: the socket timeout must outlast it
    read_timeout = max(timeout, settings.queue.block_ms / 1000.0 + timeout)
    return make_client(settings.redis, socket_timeout=read_timeout, connect_timeout=timeout)


def run_worker(settings: Settings, line: str, worker_id: str | None = None, detector: str = "pipeline",
               stop: threading.Event | None = None, registry=None, *, client=None) -> int:
    """Run one worker until ``stop`` is set; returns the process exit code (see the module doc)."""
    from prometheus_client import CollectorRegistry

    worker = Worker(settings, line, worker_id or default_worker_id(), detector,
                    registry if registry is not None else CollectorRegistry(),
                    client if client is not None else _redis_client(settings))
    return worker.run(stop or threading.Event())


def main(settings: Settings, args: argparse.Namespace) -> int:
    """``lineinspect worker --line L [--id W] [--detector pipeline|noop|slow:SECONDS|fail]``."""
    stop = threading.Event()

    def _on_signal(signum, _frame) -> None:
        log.info("signal %d: draining", signum)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _on_signal)
    try:
        return run_worker(settings, args.line, worker_id=getattr(args, "worker_id", None),
                          detector=getattr(args, "detector", "pipeline"), stop=stop)
    except OSError as exc:  # e.g. the metrics port is taken
        log.error("worker cannot start: %s", exc)
        return EXIT_MODEL
