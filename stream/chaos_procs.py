"""Process harness of the chaos benchmark (:mod:`stream.chaos`): a private ``redis-server`` that can be killed,
frozen, filled and restarted, and lineinspect ingest/worker processes with their own log files."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PrivateRedis:
    """``redis-server`` on a free port of 127.0.0.1, its files in ``dir``; never the shared server."""

    def __init__(self, workdir: Path, *, aof: bool = False, maxmemory: str = "0"):
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server not on PATH (apt-get install redis-server)")
        self.binary = binary
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="redis-", dir=workdir))
        self.aof = aof
        self.maxmemory = maxmemory
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self, timeout: float = 5.0):
        from stream.redisclient import connect

        return connect(self.url, socket_timeout=timeout)

    def start(self) -> float:
        """Start and wait until it answers; returns the monotonic time it first answered."""
        import redis

        args = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--dir", str(self.dir),
                "--maxmemory", self.maxmemory, "--maxmemory-policy", "noeviction"]
        args += ["--appendonly", "yes", "--appendfsync", "always"] if self.aof else ["--appendonly", "no"]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                self.client(0.5).ping()
                return time.monotonic()
            except redis.RedisError:
                time.sleep(0.01)
        raise RuntimeError(f"private redis-server on port {self.port} did not start")

    def stop(self) -> None:
        """SIGTERM (what a container restart sends): with AOF the file is flushed, without it all is gone."""
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(20)
        self.proc = None

    def freeze(self) -> None:
        os.kill(self.proc.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        os.kill(self.proc.pid, signal.SIGCONT)


class Procs:
    """lineinspect subprocesses with log files in ``workdir``; :meth:`cleanup` kills what is left."""

    def __init__(self, workdir: Path, config: dict):
        self.workdir = workdir
        self.config_path = workdir / "settings.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.procs: list[subprocess.Popen] = []
        self.killed: set[int] = set()  # pids this harness SIGKILLed on purpose

    def _command(self, args: tuple[str, ...]) -> tuple[list[str], dict[str, str]]:
        """The ``lineinspect`` command line with this harness's settings file, and its environment."""
        env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
        return [sys.executable, "-m", "stream.cli", "--config", str(self.config_path), *args], env

    def spawn(self, *args: str) -> subprocess.Popen:
        log = open(self.workdir / f"{len(self.procs):03d}-{args[0]}.log", "wb")  # noqa: SIM115 (kept open)
        cmd, env = self._command(args)
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        proc.log_path = log.name
        self.procs.append(proc)
        return proc

    def run(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        """A one-shot command (``memory add``, ``config``...) to its end; stdout and stderr apart."""
        cmd, env = self._command(args)
        return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)

    def worker(self, worker_id: str, detector: str = "noop") -> subprocess.Popen:
        return self.spawn("worker", "--line", "L1", "--id", worker_id, "--detector", detector)

    def kill(self, proc: subprocess.Popen) -> None:
        self.killed.add(proc.pid)
        proc.kill()
        proc.wait(10)

    def stop(self, proc: subprocess.Popen, timeout: float = 30) -> int:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill(proc)
            return -9

    def output(self, proc: subprocess.Popen) -> str:
        return Path(proc.log_path).read_text(errors="replace")

    def crashes(self) -> int:
        """Worker/ingest processes that died on their own (not SIGKILLed here) or logged a traceback."""
        n = 0
        for p in self.procs:
            own_kill = p.pid in self.killed
            bad_exit = p.poll() not in (None, 0) and not own_kill
            n += bad_exit or "Traceback (most recent call last)" in self.output(p)
        return n

    def worker_trimmed(self) -> int:
        """Pending frames trimmed before any worker finished them, as the workers logged them."""
        return sum(int(m) for p in self.procs
                   for m in re.findall(r"(\d+) pending frame\(s\) were trimmed", self.output(p)))

    def orphans(self) -> int:
        """Results published for entries no longer pending (counted as lost too), as the workers logged them."""
        return sum(int(m) for p in self.procs for m in re.findall(r"(\d+) orphan result\(s\)", self.output(p)))

    def skipped(self) -> int:
        """Finished frames acknowledged without a result because their frame id had one (worker logs)."""
        return sum(self.output(p).count("already had a result") for p in self.procs)

    def cleanup(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)


def ingest_stats(text: str) -> dict[str, int]:
    """The counters of ingest's final line (``ingest CAM: captured=... dropped_...=...``)."""
    line = next((ln for ln in reversed(text.splitlines()) if ln.startswith("ingest ") and "captured=" in ln), "")
    return {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", line)}
