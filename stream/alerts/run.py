"""``lineinspect alerts --line L [--line L2]``: the alert service as a process, until SIGTERM/SIGINT."""

from __future__ import annotations

import logging
import signal
import threading
from typing import TYPE_CHECKING, Any

from stream.alerts.debounce import AlertDebouncer
from stream.alerts.delivery import build_sinks
from stream.alerts.drift import DriftMonitor
from stream.alerts.frames import FrameTail
from stream.alerts.service import AlertService
from stream.prometheus_metrics import AlertMetrics

if TYPE_CHECKING:
    from config.settings import Settings

log = logging.getLogger(__name__)


def drift_monitors(settings: Settings, lines: list[str]) -> dict[str, DriftMonitor]:
    """A drift monitor per line (none when ``alerts.drift.enabled`` is false), against the calibrated rate."""
    d = settings.alerts.drift
    if not d.enabled:
        return {}
    return {line: DriftMonitor(line, d, settings.detector.false_alarm_rate) for line in lines}


def _service(settings: Settings, client: Any, lines: list[str], sinks: list, metrics: AlertMetrics) -> AlertService:
    a, prefix, layout = settings.alerts, settings.redis.key_prefix, settings.redis.key_layout
    return AlertService(client, prefix, lines, AlertDebouncer(a.debounce_count, a.debounce_window_s, a.cooldown_s),
                        sinks, metrics, frame_tail=FrameTail(client, prefix, lines, layout=layout), layout=layout,
                        drift=drift_monitors(settings, lines), group=a.consumer_group)


def _drift_summary(settings: Settings) -> str:
    d = settings.alerts.drift
    if not d.enabled:
        return "off"
    return (f"on (window {d.window_frames} frames / {d.window_s:g}s, >= {d.min_frames} frames; starts at share >= "
            f"{d.start_share:g}, p <= {d.max_p_value:g} against {settings.detector.false_alarm_rate:g}, median ratio "
            f">= {d.start_median_ratio:g}; or median ratio >= reference + {d.start_median_rise:g}; ends at share <= "
            f"{d.end_share:g} and median <= reference + {d.start_median_rise / 2:g})")


def _run_until_signal(service: AlertService) -> None:
    stop = threading.Event()

    def _on_signal(signum: int, _frame: Any) -> None:
        log.info("alerts: signal %d, stopping", signum)
        stop.set()

    previous = {sig: signal.signal(sig, _on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        service.run(stop)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def main(settings: Settings, args: Any) -> int:
    """``lineinspect alerts --line L [--line L2]``: run the alert service until SIGTERM/SIGINT."""
    from prometheus_client import CollectorRegistry

    from stream.health import start_metrics_server
    from stream.redisclient import make_client

    lines = list(dict.fromkeys(getattr(args, "line", None) or []))
    if not lines:
        print("lineinspect alerts: give at least one --line", flush=True)
        return 2
    if not settings.alerts.enabled:
        log.warning("alerts.enabled is false: nothing to do")
        return 0
    a = settings.alerts
    client = make_client(settings.redis, socket_timeout=settings.redis.socket_timeout_s + 2)
    registry = CollectorRegistry()
    metrics = AlertMetrics(registry)
    try:
        sinks = build_sinks(settings, client, metrics)
    except (ImportError, ValueError) as exc:
        log.error("%s", exc)
        return 2
    service = _service(settings, client, lines, sinks, metrics)
    server = (start_metrics_server(registry, settings.metrics.host, settings.metrics.port, service.health)
              if settings.metrics.enabled else None)
    log.info("alerts: lines %s, sinks %s, group %s, debounce %d in %.1fs, cooldown %.1fs, drift %s", ", ".join(lines),
             ", ".join(s.name for s in sinks), a.consumer_group, a.debounce_count, a.debounce_window_s, a.cooldown_s,
             _drift_summary(settings))
    try:
        _run_until_signal(service)
    finally:
        service.close()
        if server is not None:
            server.stop()
        client.close()
    return 0
