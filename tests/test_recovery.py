"""Results resume within 1 s of Redis answering again, however long it was down (private Redis restarted)."""

from __future__ import annotations

import threading
import time

import pytest
import redis
from prometheus_client import CollectorRegistry

from config.settings import Settings
from stream.entries import PAYLOAD_FIELD
from stream.keys import line_keys
from tests.helpers import raw_frame, wait_for
from workers.worker import Worker, _redis_client


def _payload(seq):
    return raw_frame(seq, 50, 16)




@pytest.mark.timeout(90)
def test_results_resume_within_one_second_of_redis_answering(own_redis):
    settings = Settings.load(env={}, overrides={
        "redis.url": own_redis.url, "redis.key_prefix": "rec", "redis.socket_timeout_s": 1,
        "metrics.enabled": False})  # default queue.block_ms (1000) and claim settings
    keys = line_keys("rec", "L1")
    worker = Worker(settings, "L1", "w1", "noop", CollectorRegistry(), _redis_client(settings))
    stop = threading.Event()
    t = threading.Thread(target=worker.run, args=(stop,))
    t.start()
    delays = []
    try:
        client = redis.Redis.from_url(own_redis.url)
        wait_for(lambda: worker.health()[0], 30, "a healthy worker", poll=0.01)
        for seq, down_s in enumerate((3.5, 8.0)):  # an uncapped backoff would wait seconds after either
            own_redis.stop()
            wait_for(lambda: not worker.health()[0], 30, "health to fail", poll=0.01)
            time.sleep(down_s)
            own_redis.start()
            t_up = time.monotonic()
            client = redis.Redis.from_url(own_redis.url)
            client.xadd(keys.frames, {PAYLOAD_FIELD: _payload(seq)})
            t_result = wait_for(lambda c=client: c.xlen(keys.results) == 1, 30, "the result after the restart", poll=0.01)
            delays.append(t_result - t_up)
    finally:
        stop.set()
        t.join(20)
    print(f"result after Redis answered again: {', '.join(f'{d:.2f}s' for d in delays)}")
    assert max(delays) <= 1.0, delays
