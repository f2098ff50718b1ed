"""Redis out of memory (maxmemory + noeviction), each test on its own private Redis: ingest counts
``redis_oom`` drops and backs off; workers start, drain and publish; /healthz says why; every frame counted."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import redis
from prometheus_client import CollectorRegistry

from config.settings import Settings
from stream import wire
from stream.contracts import Encoding
from stream.entries import PAYLOAD_FIELD
from stream.ingest import run_ingest
from stream.keys import line_keys
from stream.queue import ensure_group
from tests.helpers import wait_for
from workers.worker import Worker, _redis_client


def _settings(url: str, **extra) -> Settings:
    return Settings.load(env={}, overrides={
        "redis.url": url, "redis.key_prefix": "oom", "redis.socket_timeout_s": 2, "metrics.enabled": False,
        "queue.block_ms": 50, "queue.claim_interval_s": 0.2, "queue.claim_idle_ms": 60000, **extra})


def _start_worker(settings: Settings):
    registry = CollectorRegistry()
    worker = Worker(settings, "L1", "w1", "noop", registry, _redis_client(settings))
    stop = threading.Event()
    codes: list[int] = []
    t = threading.Thread(target=lambda: codes.append(worker.run(stop)))
    t.start()
    return worker, registry, stop, t, codes


def _raw_frame(seq: int) -> bytes:
    img = np.full((32, 32, 3), seq % 255, np.uint8)
    return wire.encode_frame(wire.image_to_frame(img, line_id="L1", camera_id="c", seq=seq, session="1",
                                                 capture_ts=time.time(), encoding=Encoding.RAW))


@pytest.mark.timeout(60)
def test_group_creation_refused_for_oom(own_redis):
    client = redis.Redis.from_url(own_redis.url)
    client.xgroup_create("s1", "g", id="0", mkstream=True)
    client.config_set("maxmemory-policy", "noeviction")
    client.config_set("maxmemory", "1")  # every write that allocates is refused
    try:
        with pytest.raises(redis.OutOfMemoryError):
            client.set("x", "y")
        ensure_group(client, "s1", "g")  # exists: start-up goes on
        with pytest.raises(redis.OutOfMemoryError):
            ensure_group(client, "s2", "g")  # missing and cannot be made: the caller retries
    finally:
        client.config_set("maxmemory", "0")


@pytest.mark.timeout(90)
def test_worker_starts_on_a_full_redis_holds_results_and_publishes_when_memory_returns(own_redis):
    settings = _settings(own_redis.url)
    keys = line_keys("oom", "L1")
    client = redis.Redis.from_url(own_redis.url)
    ensure_group(client, keys.frames, settings.queue.group)
    ids = [client.xadd(keys.frames, {PAYLOAD_FIELD: _raw_frame(i)}) for i in range(3)]
    client.config_set("maxmemory-policy", "noeviction")
    client.config_set("maxmemory", "1")
    worker, registry, stop, t, codes = _start_worker(settings)
    try:
        wait_for(lambda: worker.health()[1].startswith("redis out of memory:"), 30, "health to name the OOM")
        assert "maxmemory" in worker.health()[1]
        wait_for(lambda: len(worker.link.held or ()) == 3, 30, "all three results held")
        assert client.xlen(keys.frames) == 0  # the frames' data freed (XDEL) ...
        assert client.xpending(keys.frames, "workers")["pending"] == 3  # ... while still pending
        assert client.xlen(keys.results) == 0
        t_free = time.monotonic()
        client.config_set("maxmemory", "0")
        wait_for(lambda: client.xlen(keys.results) == 3, 10, "the held results published")
        recovery_s = time.monotonic() - t_free
        wait_for(lambda: worker.health() == (True, "ok"), 10, "health ok again")
    finally:
        client.config_set("maxmemory", "0")
        stop.set()
        t.join(20)
    assert codes == [0]
    assert recovery_s < 2.0, recovery_s
    assert client.xpending(keys.frames, "workers")["pending"] == 0
    seqs = sorted(wire.decode_result(f[PAYLOAD_FIELD]).seq for _, f in client.xrange(keys.results))
    assert seqs == [0, 1, 2] and len(ids) == 3
    assert registry.get_sample_value("lineinspect_worker_redis_oom_total", {"line": "L1"}) >= 3
    assert registry.get_sample_value("lineinspect_frames_processed_total", {"line": "L1"}) == 3
    # done keys live what idempotency needs, not a day
    ttl = max(client.ttl(k) for k in client.scan_iter("oom:L1:done:*"))
    assert 0 < ttl <= settings.queue.done_ttl_s <= 3600


@pytest.mark.timeout(120)
def test_ingest_fills_redis_counts_oom_and_workers_drain_every_frame(own_redis, tmp_path):
    import cv2

    rng = np.random.default_rng(0)
    for i in range(4):
        cv2.imwrite(str(tmp_path / f"{i}.png"), rng.integers(0, 255, (120, 120, 3), dtype=np.uint8))
    client = redis.Redis.from_url(own_redis.url)
    client.config_set("maxmemory-policy", "noeviction")
    client.config_set("maxmemory", str(int(client.info("memory")["used_memory"]) + 1_500_000))
    settings = _settings(own_redis.url, cameras=[{
        "id": "c", "line": "L1", "source": "folder", "path": str(tmp_path), "loop": True, "encoding": "raw"}])
    keys = line_keys("oom", "L1")
    ingest_registry = CollectorRegistry()
    stats = run_ingest(settings, "c", max_frames=150, registry=ingest_registry)  # ~43 kB each: fills 1.5 MB
    assert stats.stopped_by == "max_frames"
    assert stats.dropped_oom > 0 and stats.frames_enqueued > 0
    assert ingest_registry.get_sample_value(
        "lineinspect_frames_dropped_total", {"line": "L1", "camera": "c", "reason": "redis_oom"}) == stats.dropped_oom
    with pytest.raises(redis.OutOfMemoryError):  # Redis is full
        client.set("probe", b"x" * 100_000)

    worker, registry, stop, t, codes = _start_worker(settings)
    try:
        wait_for(lambda: client.xlen(keys.results) == stats.frames_enqueued, 60, "a result for every queued frame")
        wait_for(lambda: client.xpending(keys.frames, "workers")["pending"] == 0, 10, "nothing pending")
    finally:
        stop.set()
        t.join(20)
    assert codes == [0]
    print(f"ingest {stats}; worker OOM refusals "
          f"{registry.get_sample_value('lineinspect_worker_redis_oom_total', {'line': 'L1'})}")
    dead = client.xlen(keys.dead_letter)
    queued = client.xlen(keys.frames)
    results = client.xlen(keys.results)
    # captured = results + dead-lettered + dropped{reason} + still queued
    assert stats.frames_captured == results + dead + stats.frames_dropped + queued
    assert (dead, queued, stats.dropped_trimmed, stats.dropped_redis) == (0, 0, 0, 0)
    assert len({wire.decode_result(f[PAYLOAD_FIELD]).seq for _, f in client.xrange(keys.results)}) == results
