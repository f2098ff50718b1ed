"""The MQTT alert sink (paho-mqtt, imported only when a delivery needs it)."""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlparse

from stream.alerts.alert import Deliverable
from stream.alerts.sinks import DeliveryError
from stream.redact import redact_url

log = logging.getLogger(__name__)


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

    def deliver(self, alert: Deliverable) -> None:
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
