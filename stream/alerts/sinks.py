"""Where alerts go: the sink interface, its delivery error, and the webhook and Redis stream sinks (MQTT:
:mod:`stream.alerts.mqtt`)."""

from __future__ import annotations

from typing import Any, Protocol
from urllib.parse import urlparse

from stream.alerts.alert import Deliverable
from stream.contracts import LineInspectError
from stream.keys import line_keys
from stream.redact import redact_url

ALERTS_STREAM_MAXLEN = 1000


class DeliveryError(LineInspectError):
    """A sink could not deliver an alert. ``retryable=False`` for permanent refusals (HTTP 4xx)."""

    def __init__(self, message: str, retryable: bool = True):
        super().__init__(message)
        self.retryable = retryable


class Sink(Protocol):
    name: str

    def deliver(self, alert: Deliverable) -> None:
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

    def deliver(self, alert: Deliverable) -> None:
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

    def deliver(self, alert: Deliverable) -> None:
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
