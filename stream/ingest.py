"""Camera ingest: one process per camera, frames into the line's Redis stream.

Per frame: read from the (reconnecting) source, pace to ``camera.fps``, encode (JPEG or raw), wrap in a
:class:`~stream.contracts.Frame` and in ONE round trip (MULTI/EXEC pipeline) ``XADD`` it to the line's frames
stream and ``XTRIM MAXLEN [~] queue.maxlen``. The stream is bounded: when workers fall behind the oldest
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

from config.settings import CameraSettings, Settings, SettingsError
from stream.backoff import Backoff
from stream.contracts import Encoding, PayloadError, SourceConnectionError, SourceExhausted
from stream.keys import line_keys, lines_index
from stream.producer import FrameProducer
from stream.queue import ensure_group
from stream.redact import redact_text, redact_url
from stream.redisclient import unavailable_errors

log = logging.getLogger(__name__)

DROP_POLICY = "DROP_OLDEST"
# retry waits while Redis is unreachable: capped at 0.1 s so that work resumes within 1 s of Redis answering
# again (a refused connection costs nothing; a frozen Redis is bounded by redis.socket_timeout_s instead)
REDIS_RETRY_INITIAL_S = 0.05
REDIS_RETRY_MAX_S = 0.1


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
    """Mutable counters of one run (local to run_ingest, frozen into IngestStats at the end)."""

    def __init__(self) -> None:
        self.captured = self.enqueued = self.trimmed = self.redis = self.unreadable = self.encode = 0
        self.oom = self.timeout = self.lost = self.trimmed_delivered = self.missed = 0


class _Health:
    def __init__(self, camera: CameraSettings):
        self.camera = camera
        self.redis_ok = False
        self.redis_error = "not connected yet"
        self.oom_error = ""
        self.source = None

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


def _redis_client(settings: Settings):
    from stream.redisclient import make_client

    return make_client(settings.redis)


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


def run_ingest(settings: Settings, camera_id: str, stop: threading.Event | None = None, registry=None,
               *, max_frames: int | None = None, client=None) -> IngestStats:
    """Run one camera until ``stop`` is set, a finite source ends, the camera gives up or ``max_frames``."""
    import redis
    from prometheus_client import CollectorRegistry

    from stream import wire
    from stream.prometheus_metrics import IngestMetrics
    from stream.sources import ReconnectingSource, make_source

    camera = settings.camera(camera_id)
    stop = stop or threading.Event()
    registry = registry if registry is not None else CollectorRegistry()
    metrics = IngestMetrics(registry)
    lbl = {"line": camera.line, "camera": camera.id}
    keys = line_keys(settings.redis.key_prefix, camera.line, settings.redis.key_layout)
    q = settings.queue
    approximate = q.trim == "approximate"
    encoding = Encoding(camera.encoding)
    session = str(int(time.time() * 1000))
    counts = _Counts()
    health = _Health(camera)
    client = client if client is not None else _redis_client(settings)

    log.info("ingest start: camera=%s source=%s path=%s line=%s stream=%s maxlen=%d trim=%s policy=%s "
             "fps=%s encoding=%s session=%s", camera.id, camera.source,
             redact_url(camera.path) if camera.source != "usb" else camera.device_index, camera.line, keys.frames,
             q.maxlen, q.trim, DROP_POLICY, camera.fps or "max", camera.encoding, session)

    try:  # initial health; failures are handled (and counted) per frame below
        client.ping()
        health.redis_ok, health.redis_error = True, ""
    except unavailable_errors() as exc:
        health.redis_error = redact_text(exc)
        log.error("redis unreachable at start (%s): frames will be dropped until it answers", exc)
    server = None
    if settings.metrics.enabled:
        from stream.health import start_metrics_server

        server = start_metrics_server(registry, settings.metrics.host, settings.metrics.port, health)

    def _on_reconnect() -> None:
        metrics.camera_up.labels(**lbl).set(0)
        metrics.camera_reconnects.labels(**lbl).inc()

    source = ReconnectingSource(
        make_source(camera), initial_s=camera.reconnect_initial_s, max_s=camera.reconnect_max_s,
        max_reconnects=camera.max_reconnects, sleep=stop.wait, on_reconnect=_on_reconnect)
    health.source = source

    registered = False
    redis_retry_at = 0.0
    last_backlog = 0  # undelivered frames in the stream after the last frame added (redis_lost on a restart)
    enqueuer = FrameProducer(client, keys, lines_index(settings.redis.key_prefix), maxlen=q.maxlen,
                             approximate=approximate, group=q.group)
    down_reason = "redis_error"  # what a frame dropped before redis_retry_at is counted as
    redis_backoff = Backoff(REDIS_RETRY_INITIAL_S, REDIS_RETRY_MAX_S)
    period = 1.0 / camera.fps if camera.fps > 0 else 0.0
    next_due = time.monotonic()
    t_start = time.monotonic()
    stopped_by = "stop"
    seq = 0
    unreadable_seen = 0
    try:
        while not stop.is_set():
            if max_frames is not None and counts.captured >= max_frames:
                stopped_by = "max_frames"
                break
            if period:
                wait = next_due - time.monotonic()
                if wait > 0 and stop.wait(wait):
                    break
                # never burst to catch up: a late frame resets the schedule; whole periods that passed while
                # ingest was blocked (a frozen Redis holds it up to redis.socket_timeout_s) are counted as missed
                behind = time.monotonic() - next_due
                if behind >= period:
                    missed = int(behind // period)
                    counts.missed += missed
                    metrics.frames_missed.labels(**lbl).inc(missed)
                next_due = max(next_due + period, time.monotonic())
            try:
                image = source.read()
            except SourceExhausted as exc:
                log.info("camera %s: %s", camera.id, exc)
                stopped_by = "exhausted"
                break
            except SourceConnectionError as exc:
                metrics.camera_up.labels(**lbl).set(0)
                if stop.is_set():
                    break
                log.error("camera %s failed for good: %s", camera.id, exc)
                stopped_by = "camera_failed"
                break
            finally:
                if source.unreadable > unreadable_seen:
                    n = source.unreadable - unreadable_seen
                    unreadable_seen = source.unreadable
                    counts.unreadable += n
                    metrics.frames_dropped.labels(reason="unreadable", **lbl).inc(n)
            capture_ts = time.time()
            counts.captured += 1
            metrics.frames_captured.labels(**lbl).inc()
            metrics.camera_up.labels(**lbl).set(1)

            t0 = time.perf_counter()
            try:
                frame = wire.image_to_frame(image, line_id=camera.line, camera_id=camera.id, seq=seq,
                                            session=session, capture_ts=capture_ts, encoding=encoding,
                                            jpeg_quality=camera.jpeg_quality)
                payload = wire.encode_frame(frame)
            except PayloadError as exc:
                counts.encode += 1
                metrics.frames_dropped.labels(reason="encode_error", **lbl).inc()
                log.warning("camera %s: frame %d does not encode: %s", camera.id, seq, exc)
                seq += 1
                continue
            metrics.encode_seconds.labels(**lbl).observe(time.perf_counter() - t0)
            seq += 1

            now = time.monotonic()
            if now < redis_retry_at:  # Redis known down or full: do not stall the camera, count the loss
                if down_reason == "redis_oom":
                    counts.oom += 1
                else:
                    counts.redis += 1
                metrics.frames_dropped.labels(reason=down_reason, **lbl).inc()
                continue
            try:
                if not registered:
                    _ensure_group(client, keys.frames, q.group)
                reply = enqueuer.add(payload, register=not registered)
            except unavailable_errors() as exc:
                # sent but not answered (a timeout, a connection closed mid-command): the outcome is unknown,
                # a frozen Redis may still run the XADD; its own reason, redis_unconfirmed
                reason = "redis_unconfirmed" if _unconfirmed(exc) else "redis_error"
                if reason == "redis_unconfirmed":
                    counts.timeout += 1
                else:
                    counts.redis += 1
                metrics.frames_dropped.labels(reason=reason, **lbl).inc()
                if health.redis_ok or health.redis_error == "not connected yet":
                    log.error("redis unreachable (%s): dropping frames, retrying every <= %.1fs", exc,
                              REDIS_RETRY_MAX_S)
                health.redis_ok, health.redis_error = False, redact_text(exc)
                registered = False
                down_reason = "redis_error"
                redis_retry_at = time.monotonic() + redis_backoff.next_delay()
                continue
            except redis.OutOfMemoryError as exc:  # maxmemory reached (noeviction): count, back off, go on
                counts.oom += 1
                metrics.frames_dropped.labels(reason="redis_oom", **lbl).inc()
                if not health.oom_error:
                    log.error("redis out of memory (%s): dropping frames (redis_oom), retrying every <= %.1fs",
                              exc, REDIS_RETRY_MAX_S)
                health.oom_error = redact_text(exc)
                down_reason = "redis_oom"
                redis_retry_at = time.monotonic() + redis_backoff.next_delay()
                continue
            if health.oom_error:
                log.info("redis accepts frames again")
                health.oom_error = ""
            if not health.redis_ok and health.redis_error != "not connected yet":
                log.info("redis reachable again")
            health.redis_ok, health.redis_error = True, ""
            redis_backoff.reset()
            registered = True
            counts.enqueued += 1
            metrics.frames_enqueued.labels(**lbl).inc()
            if reply.trimmed_undelivered:
                counts.trimmed += reply.trimmed_undelivered
                metrics.frames_dropped.labels(reason="trimmed_oldest", **lbl).inc(reply.trimmed_undelivered)
            counts.trimmed_delivered += reply.trimmed - reply.trimmed_undelivered
            if reply.identity_created and last_backlog:  # Redis came back without the stream
                counts.lost += last_backlog
                metrics.frames_dropped.labels(reason="redis_lost", **lbl).inc(last_backlog)
                log.error("redis lost the stream %s (restarted without its data?): %d queued frame(s) lost, "
                          "counted as redis_lost", keys.frames, last_backlog)
            last_backlog = reply.backlog
    finally:
        source.close()
        metrics.camera_up.labels(**lbl).set(0)
        if server is not None:
            server.stop()
    stats = IngestStats(
        camera_id=camera.id, line_id=camera.line, stream=keys.frames, session=session,
        frames_captured=counts.captured, frames_enqueued=counts.enqueued, dropped_trimmed=counts.trimmed,
        dropped_redis=counts.redis, dropped_unreadable=counts.unreadable, dropped_encode=counts.encode,
        dropped_oom=counts.oom, dropped_unconfirmed=counts.timeout, dropped_lost=counts.lost,
        trimmed_delivered=counts.trimmed_delivered, frames_missed=counts.missed,
        reconnects=source.reconnects, stopped_by=stopped_by, seconds=time.monotonic() - t_start)
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
