"""Running ``python -m stream.cli ...`` as real OS processes in tests, each with its own log file."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT


class CliProcesses:
    """Starts lineinspect subprocesses (logs in ``tmp``) and kills whatever is left at teardown."""

    def __init__(self, tmp: Path, redis_url: str, prefix: str):
        self.tmp, self.redis_url, self.prefix = Path(tmp), redis_url, prefix
        self.procs: list[subprocess.Popen] = []

    def spawn(self, config: Path, *args: str) -> subprocess.Popen:
        log = open(self.tmp / f"proc{len(self.procs)}-{args[0]}.log", "wb")  # noqa: SIM115 (closed at exit)
        proc = subprocess.Popen([sys.executable, "-m", "stream.cli", "--config", str(config), *args], cwd=ROOT,
                                stdout=log, stderr=subprocess.STDOUT)
        proc.log_path = log.name
        self.procs.append(proc)
        return proc

    def output(self, proc: subprocess.Popen) -> str:
        return Path(proc.log_path).read_text(errors="replace")

    def stop(self, proc: subprocess.Popen, timeout: float = 20) -> int:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        return proc.wait(timeout)

    def cleanup(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)


def processes_fixture(cls: type[CliProcesses]):
    """A pytest fixture named ``procs`` giving an instance of ``cls`` for one test."""

    @pytest.fixture
    def procs(tmp_path, redis_url, key_prefix):
        p = cls(tmp_path, redis_url, key_prefix)
        yield p
        p.cleanup()

    return procs
