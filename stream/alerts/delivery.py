"""Delivery: each sink behind its own bounded queue and thread, retried with backoff, never blocking the
reading of results (see :mod:`stream.alerts`)."""

from __future__ import annotations

import logging
import queue
import threading
from typing import TYPE_CHECKING, Any

from stream.alerts.alert import Deliverable
from stream.alerts.mqtt import MqttSink
from stream.alerts.sinks import DeliveryError, RedisStreamSink, Sink, WebhookSink
from stream.backoff import Backoff
from stream.prometheus_metrics import AlertMetrics

if TYPE_CHECKING:
    from config.settings import Settings

log = logging.getLogger(__name__)


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

    def submit(self, alert: Deliverable) -> bool:
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

    def _deliver(self, alert: Deliverable) -> None:
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


def build_sinks(settings: Settings, client: Any, metrics: AlertMetrics, *, queue_size: int = 100) -> list[SinkWorker]:
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
