"""A worker in-process against a private Redis that is stopped and restarted (empty) under it."""

from __future__ import annotations

import threading

import pytest
import redis
from prometheus_client import CollectorRegistry

from config.settings import Settings
from stream import wire
from stream.entries import PAYLOAD_FIELD
from stream.keys import line_keys
from tests.helpers import raw_frame, wait_for
from workers.worker import Worker, _redis_client


def _payload(seq):
    return raw_frame(seq, 50, 16)




@pytest.mark.timeout(90)
def test_worker_health_and_recovery_across_a_redis_restart(own_redis):
    settings = Settings.load(overrides={
        "redis.url": own_redis.url, "redis.key_prefix": "own", "redis.socket_timeout_s": 0.5,
        "metrics.enabled": False, "queue.block_ms": 100, "queue.claim_interval_s": 0.2})
    keys = line_keys("own", "L1")
    registry = CollectorRegistry()
    worker = Worker(settings, "L1", "w1", "noop", registry, _redis_client(settings))
    assert worker.health() == (False, "model not loaded (noop)")
    stop = threading.Event()
    codes = []
    t = threading.Thread(target=lambda: codes.append(worker.run(stop)))
    t.start()
    try:
        client = redis.Redis.from_url(own_redis.url)
        wait_for(lambda: worker.health()[0], 30, "a healthy worker")
        client.xadd(keys.frames, {PAYLOAD_FIELD: _payload(0)})
        wait_for(lambda: client.xlen(keys.results) == 1, 30, "the first result")

        own_redis.stop()
        wait_for(lambda: not worker.health()[0], 30, "health to fail")
        assert worker.health()[1].startswith("redis unreachable")

        own_redis.start()  # same port, no data: the stream and the group are gone
        client = redis.Redis.from_url(own_redis.url)
        wait_for(lambda: worker.health()[0], 30, "health to recover")
        client.xadd(keys.frames, {PAYLOAD_FIELD: _payload(1)})
        wait_for(lambda: client.xlen(keys.results) == 1, 30, "a result from the restarted server")
        (_, fields), = client.xrange(keys.results)
        assert wire.decode_result(fields[PAYLOAD_FIELD]).seq == 1
    finally:
        stop.set()
        t.join(20)
    assert codes == [0]
    assert registry.get_sample_value("lineinspect_worker_redis_errors_total", {"line": "L1"}) >= 1
    assert registry.get_sample_value("lineinspect_frames_processed_total", {"line": "L1"}) == 2
