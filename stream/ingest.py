"""Camera ingest: one process per camera, frames into the line's Redis stream.

Per frame: read from the (reconnecting) source, pace to ``camera.fps``, encode (JPEG or raw), wrap in a
:class:`~stream.contracts.Frame` and in ONE round trip (the producer's Lua script) ``XADD`` it to the line's
frames stream and ``XTRIM MAXLEN [~] queue.maxlen``. The stream is bounded: when workers fall behind the oldest
frames are dropped (policy DROP_OLDEST); those no worker had been given are counted as
``frames_dropped{reason="trimmed_oldest"}`` (the rule, and the stream identity that detects a Redis that
lost the stream, ``redis_lost``: :mod:`stream.producer`).

Other losses are counted too: ``unreadable`` (a file of a folder source that does not decode),
``encode_error``, ``redis_error`` (Redis unreachable: frames read meanwhile are dropped while the
connection is retried with backoff), ``redis_unconfirmed`` (the XADD was sent but not answered, a timeout or a
connection closed mid-command: the outcome is unknown, a frozen Redis may still add it later) and ``redis_oom`` (Redis refused the XADD because ``maxmemory`` is reached
with ``noeviction``: frames are dropped and counted while ingest backs off the same way; it never dies of it).

Before its first frame (and after every reconnect) ingest creates the workers' consumer group
(:func:`stream.queue.ensure_group`), so the group exists before Redis can fill up and workers can start and
drain a full Redis.

``lineinspect ingest --camera ID`` calls :func:`main`; tests and the benchmark call :func:`run_ingest`.
"""


from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time
from dataclasses import dataclass

import numpy as np

from config.settings import CameraSettings, Settings, SettingsError
from stream.contracts import Encoding, PayloadError, SourceConnectionError, SourceExhausted
from stream.keys import LineKeys, line_keys, lines_index
from stream.producer import EnqueueReply, FrameProducer
from stream.prometheus_metrics import IngestMetrics
from stream.queue import ensure_group
from stream.redact import redact_text, redact_url
from stream.redisclient import REDIS_RETRY_MAX_S, redis_backoff, unavailable_errors
from stream.sources import ReconnectingSource, camera_source

log = logging.getLogger(__name__)

DROP_POLICY = "DROP_OLDEST"
NOT_CONNECTED = "not connected yet"


@dataclass(frozen=True)
class IngestStats:
    camera_id: str
    line_id: str
    stream: str
    session: str
    frames_captured: int  # frames read from the source
    frames_enqueued: int  # frames added to the stream
    dropped_trimmed: int  # oldest frames trimmed from the stream (exact, from XTRIM)
    dropped_redis: int  # frames lost while Redis was unreachable
    dropped_unreadable: int  # source files that did not decode
    dropped_encode: int  # frames that did not encode
    dropped_oom: int  # frames Redis refused for maxmemory (OOM)
    dropped_unconfirmed: int  # sent, not answered (timeout, connection closed): may be queued all the same
    dropped_lost: int  # queued frames lost when Redis came back without the stream (restart without AOF)
    trimmed_delivered: int  # trimmed while a worker held them: not a loss here (see stream.producer)
    frames_missed: int  # frame slots at camera.fps that passed while ingest was blocked (never captured)
    reconnects: int  # camera reopen attempts
    stopped_by: str  # "stop" | "exhausted" | "camera_failed" | "max_frames"
    seconds: float

    @property
    def frames_dropped(self) -> int:
        return (self.dropped_trimmed + self.dropped_redis + self.dropped_unreadable + self.dropped_encode
                + self.dropped_oom + self.dropped_unconfirmed + self.dropped_lost)


class _Counts:
    """Mutable counters of one run (frozen into IngestStats at the end)."""

    def __init__(self) -> None:
        self.captured = self.enqueued = self.trimmed = self.redis = self.unreadable = self.encode = 0
        self.oom = self.timeout = self.lost = self.trimmed_delivered = self.missed = 0


class _Health:
    def __init__(self, camera: CameraSettings):
        self.camera = camera
        self.redis_ok = False
        self.redis_error = NOT_CONNECTED
        self.oom_error = ""
        self.source: ReconnectingSource | None = None

    def __call__(self) -> tuple[bool, str]:
        if not self.redis_ok:
            return False, f"redis unreachable: {self.redis_error}"
        if self.oom_error:
            return False, f"redis out of memory: {self.oom_error}"
        if self.source is None:
            return True, "ok (camera opening)"
        down = self.source.down_for()
        if down > self.camera.down_grace_s:
            return False, f"camera {self.camera.id} down for {down:.1f}s: {self.source.last_error}"
        return True, "ok"


def _unconfirmed(exc: Exception) -> bool:
    """Whether a Redis error came after the command was sent (outcome unknown), not while connecting."""
    import redis

    if not isinstance(exc, (redis.ConnectionError, redis.TimeoutError)):  # CLUSTERDOWN, TRYAGAIN: refused
        return False
    text = str(exc)
    return not ("connecting to" in text or "Timeout connecting" in text or "Connection refused" in text)


def _ensure_group(client, stream: str, group: str) -> None:
    """The workers' group, created early (best effort: a user without XGROUP leaves it to the workers)."""
    import redis

    try:
        ensure_group(client, stream, group)
    except (*unavailable_errors(), redis.OutOfMemoryError):
        raise
    except redis.ResponseError as exc:
        log.warning("ingest cannot create the consumer group %r on %s (%s): the workers will", group, stream, exc)


def _count_drop(metrics: IngestMetrics, labels: dict[str, str], reason: str, n: int = 1) -> None:
    metrics.frames_dropped.labels(reason=reason, **labels).inc(n)


class _RedisSide:
    """Ingest's side of Redis: adds each frame through the producer, and accounts for every frame that is not
    added (Redis down, full, not answering) or that Redis loses later (trimmed, lost in a restart)."""

    def __init__(self, settings: Settings, keys: LineKeys, client, metrics: IngestMetrics,
                 labels: dict[str, str], counts: _Counts, health: _Health):
        q = settings.queue
        self.client = client
        self.keys = keys
        self.group = q.group
        self.producer = FrameProducer(client, keys, lines_index(settings.redis.key_prefix), maxlen=q.maxlen,
                                      approximate=q.trim == "approximate", group=q.group)
        self.metrics = metrics
        self.labels = labels
        self.counts = counts
        self.health = health
        self._registered = False  # the group exists and the line is in the lines index (since the last connect)
        self._retry_at = 0.0  # Redis known down or full until then: frames are dropped, not sent
        self._down_reason = "redis_error"  # what a frame dropped before _retry_at is counted as
        self._backoff = redis_backoff()
        self._last_backlog = 0  # undelivered frames after the last frame added (redis_lost on a restart)

    def check_redis(self) -> None:
        """The initial health; failures later are handled (and counted) per frame."""
        try:
            self.client.ping()
            self.health.redis_ok, self.health.redis_error = True, ""
        except unavailable_errors() as exc:
            self.health.redis_error = redact_text(exc)
            log.error("redis unreachable at start (%s): frames will be dropped until it answers", exc)

    def enqueue(self, payload: bytes) -> None:
        """Add the frame to the line's stream, or count why it was lost (Redis down, full, not answering)."""
        import redis

        if time.monotonic() < self._retry_at:  # Redis known down or full: do not stall the camera, count the loss
            self._count_lost(self._down_reason)
            return
        try:
            if not self._registered:
                _ensure_group(self.client, self.keys.frames, self.group)
            reply = self.producer.add(payload, register=not self._registered)
        except unavailable_errors() as exc:
            self._redis_down(exc)
        except redis.OutOfMemoryError as exc:  # maxmemory reached (noeviction): count, back off, go on
            self._redis_full(exc)
        else:
            self._redis_up()
            self._added(reply)

    def _count_lost(self, reason: str) -> None:
        if reason == "redis_oom":
            self.counts.oom += 1
        elif reason == "redis_unconfirmed":
            self.counts.timeout += 1
        else:
            self.counts.redis += 1
        _count_drop(self.metrics, self.labels, reason)

    def _redis_down(self, exc: Exception) -> None:
        # sent but not answered (a timeout, a connection closed mid-command): the outcome is unknown, a frozen
        # Redis may still run the XADD; its own reason, redis_unconfirmed
        self._count_lost("redis_unconfirmed" if _unconfirmed(exc) else "redis_error")
        health = self.health
        if health.redis_ok or health.redis_error == NOT_CONNECTED:
            log.error("redis unreachable (%s): dropping frames, retrying every <= %.1fs", exc, REDIS_RETRY_MAX_S)
        health.redis_ok, health.redis_error = False, redact_text(exc)
        self._registered = False
        self._down_reason = "redis_error"
        self._retry_at = time.monotonic() + self._backoff.next_delay()

    def _redis_full(self, exc: Exception) -> None:
        self._count_lost("redis_oom")
        if not self.health.oom_error:
            log.error("redis out of memory (%s): dropping frames (redis_oom), retrying every <= %.1fs",
                      exc, REDIS_RETRY_MAX_S)
        self.health.oom_error = redact_text(exc)
        self._down_reason = "redis_oom"
        self._retry_at = time.monotonic() + self._backoff.next_delay()

    def _redis_up(self) -> None:
        health = self.health
        if health.oom_error:
            log.info("redis accepts frames again")
            health.oom_error = ""
        if not health.redis_ok and health.redis_error != NOT_CONNECTED:
            log.info("redis reachable again")
        health.redis_ok, health.redis_error = True, ""
        self._backoff.reset()
        self._registered = True

    def _added(self, reply: EnqueueReply) -> None:
        counts = self.counts
        counts.enqueued += 1
        self.metrics.frames_enqueued.labels(**self.labels).inc()
        if reply.trimmed_undelivered:
            counts.trimmed += reply.trimmed_undelivered
            _count_drop(self.metrics, self.labels, "trimmed_oldest", reply.trimmed_undelivered)
        counts.trimmed_delivered += reply.trimmed - reply.trimmed_undelivered
        if reply.identity_created and self._last_backlog:  # Redis came back without the stream
            counts.lost += self._last_backlog
            _count_drop(self.metrics, self.labels, "redis_lost", self._last_backlog)
            log.error("redis lost the stream %s (restarted without its data?): %d queued frame(s) lost, "
                      "counted as redis_lost", self.keys.frames, self._last_backlog)
        self._last_backlog = reply.backlog


class _CameraRun:
    """One run of one camera: its state, and the steps of a frame (pace, capture, encode, then
    :meth:`_RedisSide.enqueue`)."""

    def __init__(self, settings: Settings, camera: CameraSettings, client, metrics: IngestMetrics,
                 stop: threading.Event):
        self.camera = camera
        self.metrics = metrics
        self.stop = stop
        self.labels = {"line": camera.line, "camera": camera.id}
        self.keys = line_keys(settings.redis.key_prefix, camera.line, settings.redis.key_layout)
        self.encoding = Encoding(camera.encoding)
        self.session = str(int(time.time() * 1000))
        self.counts = _Counts()
        self.health = _Health(camera)
        self.redis = _RedisSide(settings, self.keys, client, metrics, self.labels, self.counts, self.health)
        self.source = camera_source(camera, sleep=stop.wait, on_reconnect=self._on_reconnect)
        self.health.source = self.source
        self.stopped_by = "stop"  # "stop" | "exhausted" | "camera_failed" | "max_frames"
        self.seq = 0
        self._unreadable_seen = 0
        self._period = 1.0 / camera.fps if camera.fps > 0 else 0.0
        self._next_due = time.monotonic()

    def _on_reconnect(self) -> None:
        self.metrics.camera_up.labels(**self.labels).set(0)
        self.metrics.camera_reconnects.labels(**self.labels).inc()

    # ------------------------------------------------------------------------------- the steps
    def pace(self) -> bool:
        """Wait for the next frame's slot at ``camera.fps``; False when stopped meanwhile. Never bursts to catch
        up: a late frame resets the schedule; whole periods that passed while ingest was blocked (a frozen
        Redis holds it up to redis.socket_timeout_s) are counted as missed."""
        period = self._period
        if not period:
            return True
        wait = self._next_due - time.monotonic()
        if wait > 0 and self.stop.wait(wait):
            return False
        behind = time.monotonic() - self._next_due
        if behind >= period:
            missed = int(behind // period)
            self.counts.missed += missed
            self.metrics.frames_missed.labels(**self.labels).inc(missed)
        self._next_due = max(self._next_due + period, time.monotonic())
        return True

    def capture(self) -> np.ndarray | None:
        """The next image of the camera; None when the run ends here (``stopped_by`` says why)."""
        try:
            image = self.source.read()
        except SourceExhausted as exc:
            log.info("camera %s: %s", self.camera.id, exc)
            self.stopped_by = "exhausted"
            return None
        except SourceConnectionError as exc:
            self.metrics.camera_up.labels(**self.labels).set(0)
            if not self.stop.is_set():
                log.error("camera %s failed for good: %s", self.camera.id, exc)
                self.stopped_by = "camera_failed"
            return None
        finally:
            unreadable = self.source.unreadable - self._unreadable_seen
            if unreadable > 0:
                self._unreadable_seen = self.source.unreadable
                self.counts.unreadable += unreadable
                _count_drop(self.metrics, self.labels, "unreadable", unreadable)
        self.counts.captured += 1
        self.metrics.frames_captured.labels(**self.labels).inc()
        self.metrics.camera_up.labels(**self.labels).set(1)
        return image

    def encode(self, image: np.ndarray) -> bytes | None:
        """The frame's wire payload; None (counted as ``encode_error``) when it does not encode."""
        from stream import wire

        t0 = time.perf_counter()
        seq, self.seq = self.seq, self.seq + 1
        try:
            frame = wire.image_to_frame(image, line_id=self.camera.line, camera_id=self.camera.id, seq=seq,
                                        session=self.session, capture_ts=time.time(), encoding=self.encoding,
                                        jpeg_quality=self.camera.jpeg_quality)
            payload = wire.encode_frame(frame)
        except PayloadError as exc:
            self.counts.encode += 1
            _count_drop(self.metrics, self.labels, "encode_error")
            log.warning("camera %s: frame %d does not encode: %s", self.camera.id, seq, exc)
            return None
        self.metrics.encode_seconds.labels(**self.labels).observe(time.perf_counter() - t0)
        return payload

    def stats(self, seconds: float) -> IngestStats:
        c = self.counts
        return IngestStats(
            camera_id=self.camera.id, line_id=self.camera.line, stream=self.keys.frames, session=self.session,
            frames_captured=c.captured, frames_enqueued=c.enqueued, dropped_trimmed=c.trimmed,
            dropped_redis=c.redis, dropped_unreadable=c.unreadable, dropped_encode=c.encode,
            dropped_oom=c.oom, dropped_unconfirmed=c.timeout, dropped_lost=c.lost,
            trimmed_delivered=c.trimmed_delivered, frames_missed=c.missed,
            reconnects=self.source.reconnects, stopped_by=self.stopped_by, seconds=seconds)


def _log_start(settings: Settings, run: _CameraRun) -> None:
    camera, q = run.camera, settings.queue
    log.info("ingest start: camera=%s source=%s path=%s line=%s stream=%s maxlen=%d trim=%s policy=%s "
             "fps=%s encoding=%s session=%s", camera.id, camera.source,
             redact_url(camera.path) if camera.source != "usb" else camera.device_index, camera.line,
             run.keys.frames, q.maxlen, q.trim, DROP_POLICY, camera.fps or "max", camera.encoding, run.session)


def _frames(run: _CameraRun, max_frames: int | None) -> None:
    """The frame loop: until stopped, the source ends or fails, or ``max_frames`` were captured."""
    while not run.stop.is_set():
        if max_frames is not None and run.counts.captured >= max_frames:
            run.stopped_by = "max_frames"
            return
        if not run.pace():
            return
        image = run.capture()
        if image is None:
            return
        payload = run.encode(image)
        if payload is not None:
            run.redis.enqueue(payload)


def run_ingest(settings: Settings, camera_id: str, stop: threading.Event | None = None, registry=None,
               *, max_frames: int | None = None, client=None) -> IngestStats:
    """Run one camera until ``stop`` is set, a finite source ends, the camera gives up or ``max_frames``."""
    from prometheus_client import CollectorRegistry

    from stream.redisclient import make_client

    camera = settings.camera(camera_id)
    registry = registry if registry is not None else CollectorRegistry()
    client = client if client is not None else make_client(settings.redis)
    run = _CameraRun(settings, camera, client, IngestMetrics(registry), stop or threading.Event())
    _log_start(settings, run)
    run.redis.check_redis()
    server = None
    if settings.metrics.enabled:
        from stream.health import start_metrics_server

        server = start_metrics_server(registry, settings.metrics.host, settings.metrics.port, run.health)
    t_start = time.monotonic()
    try:
        _frames(run, max_frames)
    finally:
        run.source.close()
        run.metrics.camera_up.labels(**run.labels).set(0)
        if server is not None:
            server.stop()
    stats = run.stats(time.monotonic() - t_start)
    log.info("ingest end: %s", stats)
    return stats


def main(settings: Settings, args: argparse.Namespace) -> int:
    """``lineinspect ingest --camera ID``: 0 when stopped or the source ended, 1 when the camera failed."""
    stop = threading.Event()

    def _on_signal(signum, _frame) -> None:
        log.info("signal %d: stopping ingest", signum)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _on_signal)
    try:
        stats = run_ingest(settings, args.camera, stop=stop, max_frames=getattr(args, "max_frames", None))
    except (SettingsError, OSError) as exc:  # unknown camera id, metrics port taken
        log.error("ingest cannot start: %s", exc)
        print(f"lineinspect ingest: {redact_text(exc)}", file=sys.stderr)
        return 2
    print(f"ingest {stats.camera_id}: captured={stats.frames_captured} enqueued={stats.frames_enqueued} "
          f"dropped_trimmed={stats.dropped_trimmed} dropped_redis={stats.dropped_redis} "
          f"dropped_unreadable={stats.dropped_unreadable} dropped_oom={stats.dropped_oom} "
          f"dropped_unconfirmed={stats.dropped_unconfirmed} dropped_lost={stats.dropped_lost} "
          f"missed={stats.frames_missed} "
          f"reconnects={stats.reconnects} "
          f"stopped_by={stats.stopped_by}", flush=True)
    return 1 if stats.stopped_by == "camera_failed" else 0
