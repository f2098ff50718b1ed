"""Alert service: defect results of one or more lines -> debounced alerts -> webhook, Redis stream, MQTT.

``lineinspect alerts --line L [--line L2]`` reads each line's results stream with its own consumer group
(``alerts``; created at ``$`` the first time, so a restarted service resumes where it stopped and never sees
results from before its first start). Every defect result goes through :class:`AlertDebouncer`:

* an alert is raised when ``alerts.debounce_count`` defective frames of a line fall within
  ``alerts.debounce_window_s`` seconds (good frames in between do not reset the count);
* after an alert the line is quiet for ``alerts.cooldown_s``; defect results in that time are counted as
  suppressed (reason ``cooldown``) and do not count towards the next alert.

Results older than ``stale_after_s`` (wall clock, from the worker's ``processed_ts``) are suppressed with
reason ``stale``: a service that was down for an hour does not page for defects the line had an hour ago.

Snapshot choice: the worker's result carries the label mask (PNG) but not the image, and the worker deletes
a frame from the frames stream (``XDEL``) as soon as its result is published. So the service keeps its own
short memory of frames: :class:`FrameTail` follows each line's frames stream with plain ``XREAD`` (no consumer
group: the workers are not affected) and keeps the most recent frames up to a byte budget
(``frame_cache_bytes``, 32 MiB by default). For an alert the frame is taken from there, else looked up in the
frames stream itself (a bounded ``XRANGE`` from a few seconds before the capture time: works when the entry was
not deleted yet), and the mask and boxes are drawn over it (JPEG, ``snapshot.source = "frame"``). When the
frame is in neither (the workers lag by more frames than the budget holds, or the service started after the
frame), the mask alone is drawn (PNG, ``source = "mask"``). No snapshot key is written by the worker: that
would cost a Redis write for every frame to serve the few that alert.

Delivery: each sink (:class:`WebhookSink`, :class:`RedisStreamSink`, :class:`MqttSink`) runs behind its own
bounded queue and thread (:class:`SinkWorker`). A failing delivery is retried with exponential backoff
(``retry_initial_s`` doubling up to ``retry_max_s``, at most ``max_retries`` retries), counted in
:class:`AlertMetrics` and logged; a full queue drops the alert for that sink (outcome ``dropped``). Reading
results never waits for a sink. Results are acknowledged once the alert is queued, so an alert still queued
when the process dies is lost (at-most-once per sink after the queue; receivers can dedupe on ``alert_id``).
"""

from __future__ import annotations

import base64
import json
import logging
import os
import queue
import signal
import socket
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from enum import Enum
from typing import Any, Protocol
from urllib.parse import unquote, urlparse

import numpy as np

from stream.backoff import Backoff
from stream.contracts import Defect, Frame, InspectionResult, LineInspectError, PayloadError, Verdict
from stream.keys import line_keys, slot_groups
from stream.metrics import AlertMetrics
from stream.redact import redact_url
from stream.wire import MAGIC, decode_frame, decode_result, frame_to_image, result_mask

log = logging.getLogger(__name__)

ALERT_GROUP = "alerts"
SNAPSHOT_MAX_SIDE = 1024
ALERTS_STREAM_MAXLEN = 1000

Clock = Callable[[], float]


# --------------------------------------------------------------------------------------- debounce


class Decision(str, Enum):
    OK = "ok"  # not a defect
    DEBOUNCE = "debounce"  # a defect, but not yet enough of them within the window
    COOLDOWN = "cooldown"  # a defect while the line is in its cooldown after an alert
    RAISE = "raise"  # raise an alert now


class AlertDebouncer:
    """Pure debounce + per-line cooldown logic; ``clock`` (seconds, monotonic) is injectable for tests."""

    def __init__(self, debounce_count: int, window_s: float, cooldown_s: float, clock: Clock = time.monotonic):
        if debounce_count < 1:
            raise ValueError(f"debounce_count must be >= 1, got {debounce_count}")
        if window_s < 0 or cooldown_s < 0:
            raise ValueError("debounce window and cooldown must be >= 0")
        self.debounce_count = debounce_count
        self.window_s = window_s
        self.cooldown_s = cooldown_s
        self._clock = clock
        self._hits: dict[str, deque[float]] = {}
        self._last_alert: dict[str, float] = {}

    def observe(self, line: str, defective: bool, now: float | None = None) -> Decision:
        """Feed one result of ``line``; returns what to do with it."""
        if not defective:
            return Decision.OK
        t = self._clock() if now is None else now
        last = self._last_alert.get(line)
        if last is not None and t - last < self.cooldown_s:
            return Decision.COOLDOWN
        hits = self._hits.setdefault(line, deque())
        hits.append(t)
        while hits and t - hits[0] > self.window_s:
            hits.popleft()
        if len(hits) >= self.debounce_count:
            hits.clear()
            self._last_alert[line] = t
            return Decision.RAISE
        return Decision.DEBOUNCE

    def pending(self, line: str) -> int:
        """Defective frames of ``line`` counted towards the next alert (within the window, as of now)."""
        t = self._clock()
        return sum(1 for h in self._hits.get(line, ()) if t - h <= self.window_s)

    def cooldown_left(self, line: str) -> float:
        last = self._last_alert.get(line)
        return 0.0 if last is None else max(0.0, self.cooldown_s - (self._clock() - last))


# ------------------------------------------------------------------------------------------ alerts


@dataclass(frozen=True)
class Alert:
    """One raised alert. ``snapshot`` is an encoded image (``snapshot_mime``), empty when none could be drawn."""

    alert_id: str
    line: str
    frame_id: str
    camera: str
    score: float
    threshold: float
    defects: tuple[Defect, ...]
    capture_ts: float
    raised_ts: float
    defect_frames: int  # defective frames in the window that raised it
    snapshot: bytes = field(default=b"", repr=False)
    snapshot_mime: str = ""
    snapshot_source: str = "none"  # "frame" (overlay on the frame), "mask" (mask alone) or "none"

    def to_dict(self, with_snapshot: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {
            "type": "lineinspect.defect",
            "alert_id": self.alert_id,
            "line": self.line,
            "frame_id": self.frame_id,
            "camera": self.camera,
            "score": self.score,
            "threshold": self.threshold,
            "defects": [{"label": d.label, "box": list(d.box), "area": d.area, "score": d.score}
                        for d in self.defects],
            "time": datetime.fromtimestamp(self.capture_ts, timezone.utc).isoformat(),
            "capture_ts": self.capture_ts,
            "raised_ts": self.raised_ts,
            "defect_frames": self.defect_frames,
            "snapshot": {"mime": self.snapshot_mime, "source": self.snapshot_source},
        }
        if with_snapshot:
            out["snapshot"]["base64"] = base64.b64encode(self.snapshot).decode("ascii")
        return out

    def to_json(self, with_snapshot: bool = True) -> bytes:
        return json.dumps(self.to_dict(with_snapshot), separators=(",", ":")).encode()


def _payload_of(fields: dict[bytes, bytes]) -> bytes | None:
    """The wire payload among a stream entry's fields (whatever the field is called)."""
    for value in fields.values():
        if isinstance(value, bytes) and value[:2] == MAGIC:
            return value
    return None


def find_frame(client: Any, prefix: str, result: InspectionResult, *, slack_s: float = 5.0,
               max_entries: int = 64, layout: str = "plain") -> Frame | None:
    """The result's frame if it is still in the line's frames stream, else None.

    Entry ids of the frames stream are Redis auto ids (milliseconds at XADD), which come after the capture
    time; ``slack_s`` allows for clock skew between the camera host and Redis.
    """
    start_ms = max(0, int((result.capture_ts - slack_s) * 1000))
    entries = client.xrange(line_keys(prefix, result.line_id, layout).frames, min=f"{start_ms}-0", max="+",
                            count=max_entries)
    for _eid, fields in entries:
        payload = _payload_of(fields)
        if payload is None:
            continue
        try:
            frame = decode_frame(payload)
        except PayloadError:
            continue
        if frame.frame_id == result.frame_id:
            return frame
    return None


class FrameTail:
    """Follows the frames streams of ``lines`` (``XREAD``, no group) and keeps the newest frames in memory,
    at most ``max_bytes`` of payload, looked up by frame id. Started and stopped explicitly."""

    def __init__(self, client: Any, prefix: str, lines: Sequence[str], max_bytes: int = 32 << 20,
                 block_ms: int = 1000, layout: str = "plain"):
        from stream.redisclient import is_cluster

        self.client = client
        self.streams = [line_keys(prefix, line, layout).frames for line in dict.fromkeys(lines)]
        self._groups = slot_groups(self.streams, is_cluster(client))  # one XREAD per cluster slot
        self.max_bytes = max_bytes
        self.block_ms = block_ms
        self._frames: OrderedDict[str, Frame] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.seen = 0  # frames read so far

    def start(self) -> None:
        """Note where each stream ends now (frames added after this call are all seen), then follow them."""
        import redis

        self._stop.clear()
        try:
            start_ids: dict[str, str] | None = self._start_ids()
        except redis.RedisError:
            start_ids = None  # the thread retries
        self._thread = threading.Thread(target=self._run, args=(start_ids,), name="alert-frame-tail",
                                        daemon=True)
        self._thread.start()

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def get(self, frame_id: str) -> Frame | None:
        with self._lock:
            return self._frames.get(frame_id)

    def _add(self, frame: Frame) -> None:
        with self._lock:
            old = self._frames.pop(frame.frame_id, None)
            if old is not None:
                self._bytes -= len(old.data)
            self._frames[frame.frame_id] = frame
            self._bytes += len(frame.data)
            while self._bytes > self.max_bytes and len(self._frames) > 1:
                _, dropped = self._frames.popitem(last=False)
                self._bytes -= len(dropped.data)
            self.seen += 1

    def _start_ids(self) -> dict[str, str]:
        ids = {}
        for stream in self.streams:  # from the newest entry now (entries added later are all seen)
            last = self.client.xrevrange(stream, count=1)
            ids[stream] = (last[0][0].decode() if isinstance(last[0][0], bytes) else last[0][0]) if last else "0-0"
        return ids

    def _run(self, ids: dict[str, str] | None) -> None:
        import redis

        while not self._stop.is_set():
            try:
                if ids is None:
                    ids = self._start_ids()
                block = max(1, self.block_ms // len(self._groups))
                reply = [r for group in self._groups
                         for r in self.client.xread({k: ids[k] for k in group}, count=100, block=block) or []]
            except redis.RedisError as exc:
                log.debug("frame tail: %s", exc)
                ids = None
                self._stop.wait(1.0)
                continue
            for stream, entries in reply or []:
                key = stream.decode() if isinstance(stream, bytes) else stream
                for eid, fields in entries:
                    ids[key] = eid.decode() if isinstance(eid, bytes) else eid
                    payload = _payload_of(fields)
                    if payload is None:
                        continue
                    try:
                        self._add(decode_frame(payload))
                    except PayloadError:
                        continue


def render_snapshot(result: InspectionResult, image: np.ndarray | None,
                    max_side: int = SNAPSHOT_MAX_SIDE) -> tuple[bytes, str, str]:
    """(encoded image, mime, source) of an alert: mask + boxes over ``image`` (JPEG) or the mask alone (PNG)."""
    import cv2

    red = (0, 0, 255)
    if image is not None:
        canvas = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR) if image.ndim == 2 else image[..., :3].copy()
        mask = result_mask(result, canvas.shape[:2])
        if mask is not None:
            tint = canvas.copy()
            tint[mask > 0] = red
            canvas = cv2.addWeighted(canvas, 0.55, tint, 0.45, 0)
        source, ext, mime = "frame", ".jpg", "image/jpeg"
    else:
        mask = result_mask(result)
        if mask is not None:
            canvas = np.zeros((*mask.shape[:2], 3), np.uint8)
            canvas[mask > 0] = red
        elif result.defects:  # no mask and no frame: the boxes on a black canvas as large as they need
            h = max(d.box[3] for d in result.defects) + 1
            w = max(d.box[2] for d in result.defects) + 1
            canvas = np.zeros((h, w, 3), np.uint8)
        else:
            return b"", "", "none"
        source, ext, mime = "mask", ".png", "image/png"
    for d in result.defects:
        x0, y0, x1, y1 = d.box
        cv2.rectangle(canvas, (x0, y0), (max(x0, x1 - 1), max(y0, y1 - 1)), (0, 255, 255), 2)
    longest = max(canvas.shape[:2])
    if longest > max_side:
        f = max_side / longest
        canvas = cv2.resize(canvas, (round(canvas.shape[1] * f), round(canvas.shape[0] * f)),
                            interpolation=cv2.INTER_AREA)
    params = [cv2.IMWRITE_JPEG_QUALITY, 85] if ext == ".jpg" else []
    ok, buf = cv2.imencode(ext, canvas, params)
    if not ok:
        return b"", "", "none"
    return buf.tobytes(), mime, source


# ------------------------------------------------------------------------------------------- sinks


class DeliveryError(LineInspectError):
    """A sink could not deliver an alert. ``retryable=False`` for permanent refusals (HTTP 4xx)."""

    def __init__(self, message: str, retryable: bool = True):
        super().__init__(message)
        self.retryable = retryable


class Sink(Protocol):
    name: str

    def deliver(self, alert: Alert) -> None:
        """Deliver one alert or raise :class:`DeliveryError`."""

    def close(self) -> None: ...


class WebhookSink:
    """HTTP POST of the alert as JSON (snapshot as base64) to ``url``; 2xx is success."""

    name = "webhook"

    def __init__(self, url: str, timeout_s: float = 5.0, name: str = "webhook"):
        if urlparse(url).scheme not in ("http", "https"):
            raise ValueError(f"alerts.webhook_url must be http(s)://, got {redact_url(url)!r}")
        self.name = name
        self.url = url
        self.timeout_s = timeout_s

    def deliver(self, alert: Alert) -> None:
        import urllib.error
        import urllib.request

        req = urllib.request.Request(
            self.url, data=alert.to_json(), method="POST",
            headers={"Content-Type": "application/json", "User-Agent": "lineinspect-alerts"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                resp.read()
        except urllib.error.HTTPError as exc:
            code = exc.code
            raise DeliveryError(f"webhook answered HTTP {code}",
                                retryable=code >= 500 or code in (408, 429)) from None
        except (urllib.error.URLError, OSError) as exc:
            raise DeliveryError(f"webhook unreachable: {getattr(exc, 'reason', exc)}") from None

    def close(self) -> None:
        pass


class RedisStreamSink:
    """XADD to the line's alerts stream: fields ``alert`` (JSON without the base64), ``snapshot`` (image
    bytes) and ``mime``; trimmed to about ``maxlen`` entries."""

    name = "redis"

    def __init__(self, client: Any, prefix: str, maxlen: int = ALERTS_STREAM_MAXLEN, layout: str = "plain"):
        self.client = client
        self.prefix = prefix
        self.maxlen = maxlen
        self.layout = layout

    def deliver(self, alert: Alert) -> None:
        import redis

        try:
            self.client.xadd(line_keys(self.prefix, alert.line, self.layout).alerts,
                             {"alert": alert.to_json(with_snapshot=False), "snapshot": alert.snapshot,
                              "mime": alert.snapshot_mime},
                             maxlen=self.maxlen, approximate=True)
        except redis.RedisError as exc:
            raise DeliveryError(f"redis: {exc}") from None

    def close(self) -> None:
        pass


@dataclass(frozen=True)
class MqttTarget:
    host: str
    port: int
    topic: str  # may contain {line}
    tls: bool = False
    username: str | None = None
    password: str | None = None


def parse_mqtt_url(url: str) -> MqttTarget:
    """``mqtt://[user:pass@]host[:1883]/topic`` (or ``mqtts://``, port 8883); the topic may hold ``{line}``
    and defaults to ``lineinspect/alerts/{line}``."""
    p = urlparse(url)
    if p.scheme not in ("mqtt", "mqtts") or not p.hostname:
        raise ValueError(f"alerts.mqtt_url must look like mqtt://host:port/topic, got {redact_url(url)!r}")
    tls = p.scheme == "mqtts"
    topic = unquote(p.path.lstrip("/")) or "lineinspect/alerts/{line}"
    return MqttTarget(host=p.hostname, port=p.port or (8883 if tls else 1883), topic=topic, tls=tls,
                      username=unquote(p.username) if p.username else None,
                      password=unquote(p.password) if p.password else None)


def _import_paho() -> Any:
    try:
        import paho.mqtt.client as mqtt
    except ImportError:
        raise ImportError("the MQTT alert sink needs paho-mqtt: pip install 'lineinspect[mqtt]' "
                          "(or pip install 'paho-mqtt>=2.0'), or leave alerts.mqtt_url empty") from None
    return mqtt


class MqttSink:
    """Publishes the alert JSON (QoS 1) to an MQTT broker. paho-mqtt is imported lazily; the connection is
    made on the first delivery and dropped after a failure (the next retry reconnects)."""

    name = "mqtt"

    def __init__(self, url: str, timeout_s: float = 5.0, client_id: str = ""):
        self.target = parse_mqtt_url(url)
        self.timeout_s = timeout_s
        self.client_id = client_id or f"lineinspect-alerts-{socket.gethostname()}-{os.getpid()}"
        self._client: Any = None

    def check_available(self) -> None:
        _import_paho()

    def _connect(self) -> Any:
        if self._client is not None:
            return self._client
        mqtt = _import_paho()
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=self.client_id)
        if self.target.username:
            client.username_pw_set(self.target.username, self.target.password)
        if self.target.tls:
            client.tls_set()
        try:
            client.connect(self.target.host, self.target.port, keepalive=30)
        except (OSError, ValueError) as exc:
            raise DeliveryError(f"mqtt connect to {self.target.host}:{self.target.port}: {exc}") from None
        client.loop_start()
        self._client = client
        return client

    def deliver(self, alert: Alert) -> None:
        client = self._connect()
        topic = self.target.topic.replace("{line}", alert.line)
        try:
            info = client.publish(topic, alert.to_json(), qos=1)
            info.wait_for_publish(timeout=self.timeout_s)
            ok = info.is_published()
        except (RuntimeError, ValueError, OSError) as exc:
            self.close()
            raise DeliveryError(f"mqtt publish: {exc}") from None
        if not ok:
            self.close()
            raise DeliveryError(f"mqtt publish to {topic!r} not acknowledged within {self.timeout_s}s")

    def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            try:
                client.disconnect()
                client.loop_stop()
            except Exception:  # closing a broken connection: nothing more to do
                log.debug("mqtt close failed", exc_info=True)


_STOP = object()


class SinkWorker:
    """One sink behind a bounded queue and a daemon thread, with retries and exponential backoff."""

    def __init__(self, sink: Sink, metrics: AlertMetrics, *, queue_size: int = 100, retry_initial_s: float = 1.0,
                 retry_max_s: float = 60.0, max_retries: int = 5):
        self.sink = sink
        self.metrics = metrics
        self.retry_initial_s = retry_initial_s
        self.retry_max_s = retry_max_s
        self.max_retries = max_retries
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=queue_size)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def name(self) -> str:
        return self.sink.name

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"alert-sink-{self.name}", daemon=True)
        self._thread.start()

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def submit(self, alert: Alert) -> bool:
        """Queue ``alert`` without waiting; False (counted as ``dropped``) when the queue is full."""
        try:
            self._queue.put_nowait(alert)
        except queue.Full:
            self.metrics.sink_deliveries.labels(self.name, "dropped").inc()
            log.error("alert sink %s: queue full, alert %s dropped", self.name, alert.alert_id)
            return False
        self.metrics.sink_queue_length.labels(self.name).set(self._queue.qsize())
        return True

    def stop(self, timeout: float = 5.0) -> None:
        """Stop retrying, deliver what is queued once more (no backoff) and end the thread."""
        self._stop.set()
        if self._thread is not None:
            try:
                self._queue.put(_STOP, timeout=timeout)
            except queue.Full:
                pass
            self._thread.join(timeout)
        self.sink.close()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            self.metrics.sink_queue_length.labels(self.name).set(self._queue.qsize())
            try:
                self._deliver(item)
            except Exception:  # the thread must outlive any bug in a sink
                log.exception("alert sink %s crashed on %s", self.name, item.alert_id)
                self.metrics.sink_deliveries.labels(self.name, "failed").inc()

    def _deliver(self, alert: Alert) -> None:
        backoff = Backoff(self.retry_initial_s, self.retry_max_s)
        for attempt in range(self.max_retries + 1):
            try:
                self.sink.deliver(alert)
            except DeliveryError as exc:
                if not exc.retryable:
                    self.metrics.sink_deliveries.labels(self.name, "rejected").inc()
                    log.error("alert sink %s rejected %s: %s (not retried)", self.name, alert.alert_id, exc)
                    return
                if attempt == self.max_retries or self._stop.is_set():
                    self.metrics.sink_deliveries.labels(self.name, "failed").inc()
                    log.error("alert sink %s gave up on %s after %d attempts: %s", self.name, alert.alert_id,
                              attempt + 1, exc)
                    return
                self.metrics.sink_retries.labels(self.name).inc()
                delay = backoff.next_delay()
                log.warning("alert sink %s: %s; retry %d/%d in %.2fs", self.name, exc, attempt + 1,
                            self.max_retries, delay)
                self._stop.wait(delay)
            else:
                self.metrics.sink_deliveries.labels(self.name, "delivered").inc()
                log.info("alert %s delivered via %s", alert.alert_id, self.name)
                return


def build_sinks(settings: Any, client: Any, metrics: AlertMetrics, *, queue_size: int = 100) -> list[SinkWorker]:
    """The configured sinks (Redis stream always; webhook and MQTT when their URL is set), not started."""
    a = settings.alerts
    sinks: list[Sink] = [RedisStreamSink(client, settings.redis.key_prefix, layout=settings.redis.key_layout)]
    if a.webhook_url:
        sinks.append(WebhookSink(a.webhook_url, a.webhook_timeout_s))
    if a.mqtt_url:
        mqtt_sink = MqttSink(a.mqtt_url, a.webhook_timeout_s)
        mqtt_sink.check_available()
        sinks.append(mqtt_sink)
    return [SinkWorker(s, metrics, queue_size=queue_size, retry_initial_s=a.retry_initial_s,
                       retry_max_s=a.retry_max_s, max_retries=a.max_retries) for s in sinks]


# ----------------------------------------------------------------------------------------- service


class AlertService:
    """Reads results of ``lines`` (consumer group ``alerts``), debounces, and hands alerts to the sinks."""

    def __init__(self, client: Any, prefix: str, lines: Sequence[str], debouncer: AlertDebouncer,
                 sinks: Sequence[SinkWorker], metrics: AlertMetrics, *, consumer: str = "",
                 stale_after_s: float = 300.0, wall_clock: Clock = time.time,
                 frame_tail: FrameTail | None = None, layout: str = "plain"):
        if not lines:
            raise ValueError("the alert service needs at least one line")
        self.client = client
        self.prefix = prefix
        self.lines = list(dict.fromkeys(lines))
        self.debouncer = debouncer
        self.sinks = list(sinks)
        self.metrics = metrics
        self.consumer = consumer or f"{socket.gethostname()}-{os.getpid()}"
        self.stale_after_s = stale_after_s
        self._wall = wall_clock
        self.frame_tail = frame_tail
        from stream.redisclient import is_cluster

        self.layout = layout
        self._streams = {line_keys(prefix, line, layout).results: line for line in self.lines}
        self._groups = slot_groups(self._streams, is_cluster(client))  # one XREADGROUP per cluster slot
        self._last_ok = 0.0  # monotonic time of the last successful Redis read
        self._last_error = "not started"
        self._ready = False

    # -------------------------------------------------------------------------------- lifecycle
    def setup(self) -> list[Alert]:
        """Create the consumer groups, start the sinks, take over entries a dead instance left pending."""
        import redis

        for stream in self._streams:
            try:
                self.client.xgroup_create(stream, ALERT_GROUP, id="$", mkstream=True)
            except redis.ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise
        for s in self.sinks:
            if not s.alive():
                s.start()
        if self.frame_tail is not None and not self.frame_tail.alive():
            self.frame_tail.start()
        self._ready = True
        self._last_ok = time.monotonic()
        raised = []
        for stream in self._streams:  # pending entries of earlier (crashed) instances
            start = "0-0"
            while True:
                reply = self.client.xautoclaim(stream, ALERT_GROUP, self.consumer, min_idle_time=0,
                                               start_id=start, count=100)
                start, entries = reply[0], reply[1]
                raised += self._handle_entries(stream, entries)
                if not entries or start in (b"0-0", "0-0"):
                    break
        return raised

    def close(self, timeout: float = 5.0) -> None:
        if self.frame_tail is not None:
            self.frame_tail.stop(timeout)
        for s in self.sinks:
            s.stop(timeout)

    # ---------------------------------------------------------------------------------- reading
    def poll(self, block_ms: int = 1000, count: int = 50) -> list[Alert]:
        """Read new results once (waiting up to ``block_ms``); returns the alerts raised."""
        import redis

        try:
            block = max(1, block_ms // len(self._groups)) if block_ms else block_ms
            reply = [r for group in self._groups
                     for r in self.client.xreadgroup(ALERT_GROUP, self.consumer, {s: ">" for s in group},
                                                     count=count, block=block) or []]
        except redis.ResponseError as exc:
            if "NOGROUP" in str(exc):  # Redis lost its data (restart without persistence): recreate
                log.warning("alerts: consumer group missing, creating it again")
                self.setup()
                return []
            raise
        self._last_ok = time.monotonic()
        raised: list[Alert] = []
        for stream, entries in reply or []:
            raised += self._handle_entries(stream.decode() if isinstance(stream, bytes) else stream, entries)
        return raised

    def _handle_entries(self, stream: str, entries: list) -> list[Alert]:
        line = self._streams[stream]
        raised = []
        for eid, fields in entries:
            if not fields:  # trimmed away while pending
                self.client.xack(stream, ALERT_GROUP, eid)
                continue
            self.metrics.results_read.labels(line).inc()
            payload = _payload_of(fields)
            try:
                if payload is None:
                    raise PayloadError("no wire payload among the entry's fields")
                result = decode_result(payload)
            except PayloadError as exc:
                log.warning("alerts: unreadable result %s on %s: %s", eid, stream, exc.reason)
            else:
                alert = self.handle(result)
                if alert is not None:
                    raised.append(alert)
            self.client.xack(stream, ALERT_GROUP, eid)
        return raised

    def handle(self, result: InspectionResult) -> Alert | None:
        """Debounce one result; on an alert, build it (with snapshot) and queue it on every sink."""
        line = result.line_id
        defective = result.verdict is Verdict.DEFECT
        if defective and result.processed_ts and self._wall() - result.processed_ts > self.stale_after_s:
            self.metrics.alerts_suppressed.labels(line, "stale").inc()
            return None
        decision = self.debouncer.observe(line, defective)
        if decision is Decision.OK:
            return None
        if decision is not Decision.RAISE:
            self.metrics.alerts_suppressed.labels(line, decision.value).inc()
            return None
        alert = self._build(result)
        self.metrics.alerts_raised.labels(line).inc()
        log.warning("ALERT line %s: frame %s score %.3f, %d defect(s), snapshot from %s", line, result.frame_id,
                    result.image_score, len(result.defects), alert.snapshot_source)
        for s in self.sinks:
            s.submit(alert)
        return alert

    def _build(self, result: InspectionResult) -> Alert:
        image = None
        try:
            frame = self.frame_tail.get(result.frame_id) if self.frame_tail is not None else None
            if frame is None:
                frame = find_frame(self.client, self.prefix, result, layout=self.layout)
            if frame is not None:
                image = frame_to_image(frame)
        except PayloadError as exc:
            log.info("alerts: frame %s does not decode (%s): drawing the mask alone", result.frame_id, exc.reason)
        except Exception as exc:  # a snapshot problem must never stop the alert itself
            log.warning("alerts: frame lookup for %s failed: %s", result.frame_id, exc)
        try:
            snapshot, mime, source = render_snapshot(result, image)
        except Exception as exc:
            log.warning("alerts: snapshot of %s failed: %s", result.frame_id, exc)
            snapshot, mime, source = b"", "", "none"
        return Alert(
            alert_id=f"{result.line_id}:{result.frame_id}", line=result.line_id, frame_id=result.frame_id,
            camera=result.camera_id, score=result.image_score, threshold=result.threshold,
            defects=result.defects, capture_ts=result.capture_ts, raised_ts=self._wall(),
            defect_frames=self.debouncer.debounce_count, snapshot=snapshot, snapshot_mime=mime,
            snapshot_source=source)

    # ---------------------------------------------------------------------------------- running
    def health(self) -> tuple[bool, str]:
        if not self._ready:
            return False, f"alerts: not connected ({self._last_error})"
        age = time.monotonic() - self._last_ok
        if age > 15.0:
            return False, f"alerts: no successful Redis read for {age:.0f}s ({self._last_error})"
        dead = [s.name for s in self.sinks if not s.alive()]
        if dead:
            return False, f"alerts: sink thread(s) stopped: {', '.join(dead)}"
        return True, f"ok: watching {', '.join(self.lines)}"

    def run(self, stop: threading.Event, block_ms: int = 1000) -> None:
        """Poll until ``stop`` is set; Redis outages are logged and retried with backoff."""
        import redis

        backoff = Backoff(0.5, 10.0)
        while not stop.is_set():
            try:
                if not self._ready:
                    self.setup()
                self.poll(block_ms)
                backoff.reset()
            except redis.RedisError as exc:
                self._last_error = f"{type(exc).__name__}: {exc}"
                self._ready = False
                delay = backoff.next_delay()
                log.warning("alerts: Redis error (%s); retrying in %.1fs", self._last_error, delay)
                stop.wait(delay)


def main(settings: Any, args: Any) -> int:
    """``lineinspect alerts --line L [--line L2]``: run the alert service until SIGTERM/SIGINT."""
    from prometheus_client import CollectorRegistry

    from stream.health import start_metrics_server

    lines = list(dict.fromkeys(getattr(args, "line", None) or []))
    if not lines:
        print("lineinspect alerts: give at least one --line", flush=True)
        return 2
    if not settings.alerts.enabled:
        log.warning("alerts.enabled is false: nothing to do")
        return 0
    a = settings.alerts
    from stream.redisclient import make_client

    client = make_client(settings.redis, socket_timeout=settings.redis.socket_timeout_s + 2)
    registry = CollectorRegistry()
    metrics = AlertMetrics(registry)
    try:
        sinks = build_sinks(settings, client, metrics)
    except (ImportError, ValueError) as exc:
        log.error("%s", exc)
        return 2
    layout = settings.redis.key_layout
    service = AlertService(client, settings.redis.key_prefix, lines,
                           AlertDebouncer(a.debounce_count, a.debounce_window_s, a.cooldown_s), sinks, metrics,
                           frame_tail=FrameTail(client, settings.redis.key_prefix, lines, layout=layout),
                           layout=layout)
    server = (start_metrics_server(registry, settings.metrics.host, settings.metrics.port, service.health)
              if settings.metrics.enabled else None)
    stop = threading.Event()

    def _on_signal(signum: int, _frame: Any) -> None:
        log.info("alerts: signal %d, stopping", signum)
        stop.set()

    previous = {sig: signal.signal(sig, _on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    log.info("alerts: lines %s, sinks %s, debounce %d in %.1fs, cooldown %.1fs", ", ".join(lines),
             ", ".join(s.name for s in sinks), a.debounce_count, a.debounce_window_s, a.cooldown_s)
    try:
        service.run(stop)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        service.close()
        if server is not None:
            server.stop()
        client.close()
    return 0
