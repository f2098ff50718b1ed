"""Detection worker: one process per consumer of a line's worker group.

Start-up: connect, create the group, start the metrics/health server, load the detector ONCE
(``pipeline`` = :func:`workers.pipeline.build_detector`, or a stand-in from :mod:`workers.noop`), log which
map source, models and weights it uses.

Loop:
1. every ``queue.claim_interval_s``: reclaim entries idle longer than ``queue.claim_idle_ms`` (a dead or
   stuck consumer's frames), count the ones trimmed meanwhile, refresh queue gauges;
2. read new entries (``XREADGROUP >``, ``queue.block_ms``, ``queue.batch``);
3. per entry: :class:`workers.frame_handler.FrameHandler` (deliveries, decode, inspect in the model thread
   with ``queue.job_timeout_s``, result, publish; what is dead-lettered, retried or held, and the result
   timings, are described there). Redis as the worker sees it (unreachable, out of memory, held results,
   heartbeat): :class:`workers.redis_link.RedisLink`.

Overlap (``worker.overlap``, default on): while the model thread works on frame N, the main thread reads and
decodes frame N+1 (a non-blocking read: at most one read's entries, ``queue.batch``, prepared ahead), then
waits for N, hands N+1 to the model and only then builds and publishes N's result. Results are published,
and entries acknowledged, in the order they were read, each only after its result is published; a frame read
ahead is pending under this consumer like the frame in hand (reclaimed by another worker if this one dies).
Off: read, decode, inspect, publish one entry after the other. Batching (``worker.encoder_batch`` > 1, only
when the SAM encoder runs on a GPU, or with ``worker.encoder_batch_on_cpu``): up to that many entries are read
at once and embedded in one encoder call before their per-frame inspections.

SIGTERM/SIGINT drain: no new entries are read; the frames in hand (in the model thread and read ahead) are
finished, published and acknowledged, then exit 0.

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
from collections import deque

from config.settings import Settings
from stream.contracts import ModelLoadError, QueueAccessError
from stream.keys import line_keys
from stream.redact import redact_text
from stream.redisclient import redis_backoff, unavailable_errors
from workers.frame_handler import FrameHandler, ModelStuck, Prepared, Running
from workers.model_thread import ModelThread
from workers.redis_link import OOM_RETRY_S, RedisLink
from workers.worker_metrics import WorkerCounts, WorkerQueueMetrics

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_MODEL = 2
EXIT_STUCK = 3


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
        self.counts = WorkerCounts()
        self.link = RedisLink(worker_id, line, self.qmetrics)
        self.detector = None
        self.queue = None
        self.handler: FrameHandler | None = None  # once the detector is loaded
        self.review = None  # workers.review.consumer.ReviewConsumer once loaded (review.enabled)
        self._last_prune = float("-inf")
        self._last_claim = float("-inf")

    # ------------------------------------------------------------------------------------ health
    def health(self) -> tuple[bool, str]:
        problem = self.link.problem()
        if problem:
            return False, problem
        if self.detector is None:
            return False, f"model not loaded ({self.detector_name})"
        if not self.link.ok:
            return False, f"redis unreachable: {self.link.error}"
        return True, "ok"

    # ------------------------------------------------------------------------------------ start-up
    def _connect(self, stop: threading.Event) -> bool:
        import redis

        from stream.queue import FrameQueue

        self.queue = FrameQueue(self.client, self.keys, self.settings.queue, self.worker_id)
        self.link.attach(self.queue)
        backoff = redis_backoff()
        while not stop.is_set():
            try:
                self.queue.ensure_group()
                self.queue.check_access()
                self.link.up()
                return True
            except (*unavailable_errors(), redis.OutOfMemoryError) as exc:
                self.link.down(exc)
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
        self.encoder_batch = self._encoder_batch(detector)
        keeper = None
        if s.review.enabled:
            from workers.review.setup import review_parts

            keeper, self.review = review_parts(s, self.client, self.keys, self.worker_id, detector, self.registry)
        self.handler = FrameHandler(s.queue, self.line, self.worker_id, detector, self.link, self.metrics,
                                    self.qmetrics, self.counts, encoder_batch=self.encoder_batch, keeper=keeper)
        log.info("worker %s: overlap %s, encoder batch %d", self.worker_id,
                 "on" if s.worker.overlap else "off", self.handler.encoder_batch)

    def _encoder_batch(self, detector) -> int:
        """``worker.encoder_batch`` where it applies: a detector with ``embed_batch`` whose SAM encoder runs on a
        GPU (or ``worker.encoder_batch_on_cpu``); else 1, with a log line saying why."""
        w = self.settings.worker
        if w.encoder_batch <= 1:
            return 1
        if not callable(getattr(detector, "embed_batch", None)):
            log.info("worker %s: worker.encoder_batch=%d ignored: detector %s embeds frame by frame",
                     self.worker_id, w.encoder_batch, self.detector_name)
            return 1
        from workers.sam import encoder_on_gpu

        sam = getattr(detector, "sam", None)
        if sam is not None and not encoder_on_gpu(sam) and not w.encoder_batch_on_cpu:
            log.warning("worker %s: worker.encoder_batch=%d ignored: the SAM encoder runs on the CPU (%s), where "
                        "a batch does not pay (worker.encoder_batch_on_cpu: true forces it)", self.worker_id,
                        w.encoder_batch, ", ".join(getattr(sam, "active_providers", ())) or "cpu")
            return 1
        return w.encoder_batch

    # ------------------------------------------------------------------------------------ housekeeping
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
            self.counts.reclaimed += len(claim.entries)
            self.metrics.frames_reclaimed.labels(line=self.line).inc(len(claim.entries))
            log.info("worker %s: reclaimed %d idle entr%s", self.worker_id, len(claim.entries),
                     "y" if len(claim.entries) == 1 else "ies")
        stats = self.queue.stats()
        self.metrics.queue_length.labels(line=self.line).set(stats.length)
        self.metrics.group_lag.labels(line=self.line).set(max(stats.lag, 0))
        self.metrics.pending.labels(line=self.line).set(stats.pending)
        return list(claim.entries)

    def run(self, stop: threading.Event) -> int:
        """Start, then read and process until ``stop``; returns the process exit code (see the module doc)."""
        server = self._metrics_server()
        model = None
        try:
            failed = self._start(stop)
            if failed is not None:
                return failed
            model = ModelThread().start()
            if not self._loop(stop, model):
                return EXIT_STUCK
            self.link.drain_held()
            log.info("worker %s: stopping (drained)", self.worker_id)
            return EXIT_OK
        finally:
            self._shut_down(model, server)

    def _metrics_server(self):
        m = self.settings.metrics
        if not m.enabled:
            return None
        from stream.health import start_metrics_server

        return start_metrics_server(self.registry, m.host, m.port, self.health)

    def _start(self, stop: threading.Event) -> int | None:
        """Connect (the detector may need Redis: the line's memory), then load the detector; the exit code when
        the worker cannot start, None when it can."""
        q = self.settings.queue
        log.info("worker %s start: line=%s stream=%s group=%s detector=%s claim_idle_ms=%d "
                 "max_deliveries=%d job_timeout_s=%.1f", self.worker_id, self.line, self.keys.frames,
                 q.group, self.detector_name, q.claim_idle_ms, q.max_deliveries, q.job_timeout_s)
        try:
            if not self._connect(stop):
                return EXIT_OK
        except QueueAccessError as exc:
            self.link.error = redact_text(exc)
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
        return None

    def _loop(self, stop: threading.Event, model: ModelThread) -> bool:
        """Read and process entries until ``stop``; False when the model thread is stuck. On SIGTERM the entries
        in hand (in the model thread, or read ahead) are still finished (drain).

        ``flight``: frames handed to the model thread, oldest first; ``ahead``: frames read and decoded, not
        handed over yet (only while something is in flight, and only with ``worker.overlap``)."""
        import redis

        backoff = redis_backoff()
        overlap = self.settings.worker.overlap
        flight: deque[Running] = deque()
        ahead: list[Prepared] = []
        while flight or ahead or not stop.is_set():
            if self.review is not None and not stop.is_set():
                self.review.poll(model)  # between frames: a review's model work runs in the model thread
            if not ahead and not stop.is_set() and (overlap or not flight):
                try:
                    ahead = self._read_ahead(stop, flight)
                    backoff.reset()
                except (*unavailable_errors(), redis.OutOfMemoryError) as exc:
                    self.link.down(exc)
                    if not flight:
                        stop.wait(backoff.next_delay())
                        continue
            if not flight:
                flight.extend(self.handler.submit(ahead, model))
                ahead = []
                continue
            head = flight.popleft()
            try:
                det = self.handler.collect(head)
            except ModelStuck:
                return False
            except (*unavailable_errors(), redis.OutOfMemoryError) as exc:  # the entry stays pending
                self.link.down(exc)
                det = None
            if not flight and ahead:  # the model starts on the next frame while this result is published
                flight.extend(self.handler.submit(ahead, model))
                ahead = []
            try:
                self.handler.complete(head, det)
            except (*unavailable_errors(), redis.OutOfMemoryError) as exc:  # the entry stays pending
                self.link.down(exc)
        return True

    def _read_ahead(self, stop: threading.Event, flight: deque) -> list[Prepared]:
        """Heartbeat, held results, then the next entries decoded: waiting up to ``queue.block_ms`` when nothing
        is in flight, not at all when the model is busy (its frame must not wait for an empty stream)."""
        self.link.heartbeat()
        self.link.flush_held()
        if self.link.held.full():  # Redis still full: publish what is held before reading more
            if not flight:
                stop.wait(OOM_RETRY_S)
            return []
        in_hand = {r.prepared.entry.entry_id for r in flight}
        entries = [e for e in self._next_entries(block=not flight) if e.entry_id not in in_hand]
        self.link.up()
        return self.handler.prepare(entries)

    def _next_entries(self, block: bool = True) -> list:
        """Reclaimed entries every ``queue.claim_interval_s`` (again at once after a full batch: more may wait),
        else new ones (``max(queue.batch, encoder batch)`` at most)."""
        q = self.settings.queue
        count = max(q.batch, self.encoder_batch)
        entries = []
        if time.monotonic() - self._last_claim >= q.claim_interval_s:
            entries = self._reclaim()
            if len(entries) < q.batch:
                self._last_claim = time.monotonic()
        return entries or self.queue.read(count=count, block_ms=None if block else 0)

    def _shut_down(self, model: ModelThread | None, server) -> None:
        import redis

        if model is not None:
            if self.review is not None:
                self.review.drain(self.settings.queue.job_timeout_s)
            model.shutdown()
        if self.queue is not None:
            try:
                self.queue.remove_heartbeat(self.worker_id)
            except redis.RedisError:
                pass
        if server is not None:
            server.stop()
        c = self.counts
        log.info("worker %s end: processed=%d duplicates=%d failed=%d dead_lettered=%d reclaimed=%d",
                 self.worker_id, c.processed, c.duplicates, c.failed, c.dead_lettered, c.reclaimed)


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
