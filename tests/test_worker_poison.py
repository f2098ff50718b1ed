"""A live worker (in-process, real Redis) dead-letters crafted payloads on their FIRST delivery with their real
reason, and goes on: a good frame queued after them gets its result from the same worker."""

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
from stream.keys import line_keys
from tests.helpers import wait_for
from tests.test_wire_limits import GOOD_HEADER, POISON, _big_png, frame_payload
from workers.worker import Worker, _redis_client


@pytest.mark.timeout(120)
def test_worker_dead_letters_poison_on_first_delivery_and_goes_on(redis_url, key_prefix):
    settings = Settings.load(overrides={
        "redis.url": redis_url, "redis.key_prefix": key_prefix, "metrics.enabled": False,
        "queue.block_ms": 100, "queue.claim_interval_s": 0.2, "queue.claim_idle_ms": 60000})
    keys = line_keys(key_prefix, "L1")
    client = redis.Redis.from_url(redis_url)
    poison = {name: payload for name, (payload, _) in POISON.items()}
    poison["png_8000x8000_lying_header"] = frame_payload({**GOOD_HEADER, "enc": "jpeg", "shape": [10, 10]},
                                                         _big_png(8000))
    ids = {client.xadd(keys.frames, {PAYLOAD_FIELD: p}).decode(): name for name, p in poison.items()}
    good = wire.encode_frame(wire.image_to_frame(
        np.full((16, 16, 3), 50, np.uint8), line_id="L1", camera_id="c", seq=7, session="1",
        capture_ts=time.time(), encoding=Encoding.RAW))
    client.xadd(keys.frames, {PAYLOAD_FIELD: good})

    registry = CollectorRegistry()
    worker = Worker(settings, "L1", "w1", "noop", registry, _redis_client(settings))
    stop = threading.Event()
    codes = []
    t = threading.Thread(target=lambda: codes.append(worker.run(stop)))
    t.start()
    try:
        wait_for(lambda: client.xlen(keys.results) == 1, 60, "the good frame's result")
        wait_for(lambda: client.xlen(keys.dead_letter) == len(poison), 10, "every poison entry dead-lettered")
        assert t.is_alive() and worker.health() == (True, "ok")
    finally:
        stop.set()
        t.join(20)
    assert codes == [0]
    (_, fields), = client.xrange(keys.results)
    assert wire.decode_result(fields[PAYLOAD_FIELD]).seq == 7
    dead = {f[b"entry_id"].decode(): f for _, f in client.xrange(keys.dead_letter)}
    assert set(dead) == set(ids)
    for entry_id, f in dead.items():
        name = ids[entry_id]
        reason = f[b"reason"].decode()
        assert f[b"deliveries"] == b"1", (name, f)
        assert reason.startswith("payload: ") and "max_deliveries" not in reason, (name, reason)
        if name in POISON:
            assert POISON[name][1] in reason, (name, reason)
        assert f[b"payload"] == poison[name]
    assert "max_frame_pixels" in dead[next(i for i, n in ids.items() if n.startswith("png"))][b"reason"].decode()
    assert client.xlen(keys.frames) == 0
    assert client.xpending(keys.frames, settings.queue.group)["pending"] == 0
    assert registry.get_sample_value("lineinspect_frames_dead_lettered_total",
                                     {"line": "L1", "reason": "payload"}) == len(poison)
    assert registry.get_sample_value("lineinspect_frames_processed_total", {"line": "L1"}) == 1
