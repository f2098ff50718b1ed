"""HTTP endpoint of every process: ``/metrics`` (Prometheus text format) and ``/healthz``.

``/healthz`` answers 200 ``ok`` while ``health()`` returns ``(True, ...)`` and 503 with the reason otherwise
(Redis unreachable, camera down beyond its grace period, model not loaded). A health check that raises counts
as failing.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

log = logging.getLogger(__name__)

HealthCheck = Callable[[], tuple[bool, str]]


@dataclass
class MetricsServer:
    server: ThreadingHTTPServer
    thread: threading.Thread

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


def _handler(registry: CollectorRegistry, health: HealthCheck) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._send(200, generate_latest(registry), CONTENT_TYPE_LATEST)
            elif path == "/healthz":
                try:
                    ok, reason = health()
                except Exception as exc:  # a broken check is a failing check
                    ok, reason = False, f"health check raised {type(exc).__name__}: {exc}"
                self._send(200 if ok else 503, (reason or ("ok" if ok else "failing")).encode() + b"\n",
                           "text/plain; charset=utf-8")
            else:
                self._send(404, b"not found\n", "text/plain; charset=utf-8")

        def _send(self, code: int, body: bytes, ctype: str) -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, fmt: str, *args: object) -> None:  # keep scrapes out of the process log
            log.debug("metrics http: " + fmt, *args)

    return Handler


def start_metrics_server(registry: CollectorRegistry, host: str, port: int,
                         health: HealthCheck | None = None) -> MetricsServer:
    """Serve /metrics and /healthz in a daemon thread; ``port=0`` picks a free port (see ``.port``)."""
    check: HealthCheck = health or (lambda: (True, "ok"))
    server = ThreadingHTTPServer((host, port), _handler(registry, check))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True)
    thread.start()
    log.info("metrics on http://%s:%d/metrics, health on /healthz", host, server.server_address[1])
    return MetricsServer(server=server, thread=thread)
