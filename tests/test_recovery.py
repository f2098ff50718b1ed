"""Results resume within 1 s of Redis answering again, however long it was down (private Redis restarted)."""

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
from stream.keys import line_keys
from stream.queue import PAYLOAD_FIELD
from workers.worker import Worker, _redis_client


def _payload(seq):
    img = np.full((16, 16, 3), 50, np.uint8)
    return wire.encode_frame(wire.image_to_frame(img, line_id="L1", camera_id="c", seq=seq, session="1",
                                                 capture_ts=time.time(), encoding=Encoding.RAW))


def _wait(pred, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return time.monotonic()
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


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
        _wait(lambda: worker.health()[0], 30, "a healthy worker")
        for seq, down_s in enumerate((3.5, 8.0)):  # an uncapped backoff would wait seconds after either
            own_redis.stop()
            _wait(lambda: not worker.health()[0], 30, "health to fail")
            time.sleep(down_s)
            own_redis.start()
            t_up = time.monotonic()
            client = redis.Redis.from_url(own_redis.url)
            client.xadd(keys.frames, {PAYLOAD_FIELD: _payload(seq)})
            t_result = _wait(lambda c=client: c.xlen(keys.results) == 1, 30, "the result after the restart")
            delays.append(t_result - t_up)
    finally:
        stop.set()
        t.join(20)
    print(f"result after Redis answered again: {', '.join(f'{d:.2f}s' for d in delays)}")
    assert max(delays) <= 1.0, delays
