"""Leftovers are cleaned up: dead consumers (idle, nothing pending) and stale heartbeats are removed; a source
that opens but gives only unreadable frames counts against camera.max_reconnects."""

from __future__ import annotations

import threading
import time

import pytest
import redis
from prometheus_client import CollectorRegistry

from config.settings import Settings
from stream.contracts import SourceConnectionError
from stream.ingest import run_ingest
from stream.keys import line_keys
from stream.queue import FrameQueue, ensure_group
from stream.sources import FolderSource, ReconnectingSource
from workers.worker import Worker, _redis_client


def _dead_consumers(client, keys, n):
    ensure_group(client, keys.frames, "workers")
    for i in range(n):  # a worker that finished a frame and was killed leaves its consumer and heartbeat
        client.xadd(keys.frames, {b"p": b"x"})
        (_, [(entry_id, _)]), = client.xreadgroup("workers", f"dead{i}", {keys.frames: ">"}, count=1)
        client.xack(keys.frames, "workers", entry_id)
        client.xdel(keys.frames, entry_id)
        client.hset(keys.heartbeat, f"dead{i}", f"{time.time() - 1000:.3f}")


def _consumers(client, keys):
    return {c["name"].decode(): c["pending"] for c in client.xinfo_consumers(keys.frames, "workers")}


def test_prune_removes_idle_consumers_without_pending_and_stale_heartbeats(redis_client, key_prefix):
    keys = line_keys(key_prefix, "L1")
    _dead_consumers(redis_client, keys, 30)
    redis_client.xadd(keys.frames, {b"p": b"x"})
    redis_client.xreadgroup("workers", "holder", {keys.frames: ">"}, count=1)  # dead, but holds an entry
    redis_client.hset(keys.heartbeat, "alive", f"{time.time():.3f}")
    assert len(_consumers(redis_client, keys)) == 31
    time.sleep(0.3)
    settings = Settings.load(env={}, overrides={"redis.key_prefix": key_prefix})
    removed, stale = FrameQueue(redis_client, keys, settings.queue, "alive").prune(idle_s=0.2)
    assert sorted(removed) == sorted(f"dead{i}" for i in range(30))
    assert _consumers(redis_client, keys) == {"holder": 1}  # left for XAUTOCLAIM
    assert sorted(stale) == sorted(f"dead{i}" for i in range(30))
    assert set(redis_client.hkeys(keys.heartbeat)) == {b"alive"}


@pytest.mark.timeout(60)
def test_a_running_worker_removes_dead_consumers(redis_url, key_prefix):
    keys = line_keys(key_prefix, "L1")
    client = redis.Redis.from_url(redis_url)
    _dead_consumers(client, keys, 30)
    time.sleep(0.3)
    settings = Settings.load(env={}, overrides={
        "redis.url": redis_url, "redis.key_prefix": key_prefix, "metrics.enabled": False,
        "queue.block_ms": 50, "queue.claim_interval_s": 0.05, "queue.dead_consumer_idle_s": 0.2})
    worker = Worker(settings, "L1", "w1", "noop", CollectorRegistry(), _redis_client(settings))
    stop = threading.Event()
    t = threading.Thread(target=worker.run, args=(stop,))
    t.start()
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not set(_consumers(client, keys)) <= {"w1"}:
            time.sleep(0.05)
        consumers = set(_consumers(client, keys))
        heartbeats = set(client.hkeys(keys.heartbeat))
    finally:
        stop.set()
        t.join(20)
    assert consumers <= {"w1"} and heartbeats == {b"w1"}  # (w1 is a consumer once it was given a frame)


def _corrupt_folder(path, n=3):
    path.mkdir()
    for i in range(n):
        (path / f"{i}.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    return path


def test_folder_of_unreadable_files_gives_up_after_max_reconnects(tmp_path):
    source = ReconnectingSource(FolderSource(_corrupt_folder(tmp_path / "bad"), loop=True), initial_s=0.001,
                                max_s=0.002, max_reconnects=3)
    with pytest.raises(SourceConnectionError, match="gave up after 3 reconnect attempts"):
        source.read()
    assert source.reconnects == 3 and source.unreadable == 3 * 4  # every file of the first open + 3 reopens


@pytest.mark.timeout(60)
def test_ingest_stops_on_a_camera_of_unreadable_files(redis_url, key_prefix, tmp_path):
    settings = Settings.load(env={}, overrides={
        "redis.url": redis_url, "redis.key_prefix": key_prefix, "metrics.enabled": False,
        "cameras": [{"id": "c", "line": "L1", "source": "folder", "path": str(_corrupt_folder(tmp_path / "bad")),
                     "loop": True, "max_reconnects": 2, "reconnect_initial_s": 0.01, "reconnect_max_s": 0.02}]})
    registry = CollectorRegistry()
    t0 = time.monotonic()
    stats = run_ingest(settings, "c", registry=registry)
    assert stats.stopped_by == "camera_failed" and time.monotonic() - t0 < 10
    assert stats.reconnects == 2 and stats.frames_captured == 0
    assert stats.dropped_unreadable == 9 == registry.get_sample_value(
        "lineinspect_frames_dropped_total", {"line": "L1", "camera": "c", "reason": "unreadable"})
