"""The worker side of the queue against the real Redis: idempotent completion, dead letters, reclaim."""

from __future__ import annotations

import time

import numpy as np
import pytest

from config.settings import QueueSettings
from stream import wire
from stream.contracts import Encoding, InspectionResult, Verdict
from stream.entries import PAYLOAD_FIELD
from stream.keys import line_keys
from stream.queue import FrameQueue


def _frame_payload(seq: int, camera: str = "cam0", line: str = "L1") -> bytes:
    img = np.full((12, 16, 3), seq % 256, np.uint8)
    frame = wire.image_to_frame(img, line_id=line, camera_id=camera, seq=seq, session="1", capture_ts=time.time(),
                                encoding=Encoding.RAW)
    return wire.encode_frame(frame)


def _result_payload(frame_id: str, worker: str) -> bytes:
    return wire.encode_result(InspectionResult(
        frame_id=frame_id, line_id="L1", camera_id="cam0", seq=0, capture_ts=time.time(), image_score=0.1,
        threshold=1.0, verdict=Verdict.OK, worker_id=worker, processed_ts=time.time()))


def _queue(client, prefix: str, consumer: str, **q) -> FrameQueue:
    fq = FrameQueue(client, line_keys(prefix, "L1"), QueueSettings(**q), consumer)
    fq.ensure_group()
    return fq


def test_ensure_group_is_idempotent_and_starts_at_zero(redis_client, key_prefix):
    keys = line_keys(key_prefix, "L1")
    redis_client.xadd(keys.frames, {PAYLOAD_FIELD: _frame_payload(0)})  # queued before any worker
    q = _queue(redis_client, key_prefix, "w1")
    q.ensure_group()  # BUSYGROUP is ignored
    entries = q.read(block_ms=0)
    assert len(entries) == 1 and entries[0].deliveries == 1
    assert wire.decode_frame(entries[0].payload).seq == 0


def test_complete_publishes_once_per_frame_id(redis_client, key_prefix):
    keys = line_keys(key_prefix, "L1")
    q = _queue(redis_client, key_prefix, "w1")
    pubsub = redis_client.pubsub()
    pubsub.subscribe(keys.results_channel)
    assert pubsub.get_message(timeout=1.0)["type"] == "subscribe"

    # the same frame queued twice (e.g. a reclaimed frame finished by two workers)
    redis_client.xadd(keys.frames, {PAYLOAD_FIELD: _frame_payload(7)})
    redis_client.xadd(keys.frames, {PAYLOAD_FIELD: _frame_payload(7)})
    first, second = q.read(count=2, block_ms=0)
    frame_id = wire.decode_frame(first.payload).frame_id

    assert q.complete(first.entry_id, frame_id, _result_payload(frame_id, "w1")) is True
    assert q.complete(second.entry_id, frame_id, _result_payload(frame_id, "w2")) is False

    results = redis_client.xrange(keys.results)
    assert len(results) == 1
    assert wire.decode_result(results[0][1][PAYLOAD_FIELD]).worker_id == "w1"
    msg = pubsub.get_message(timeout=1.0)
    assert msg is not None and wire.decode_result(msg["data"]).frame_id == frame_id
    assert pubsub.get_message(timeout=0.3) is None  # no second publication
    pubsub.close()
    # both entries acknowledged and deleted; the idempotency key carries a TTL
    assert redis_client.xlen(keys.frames) == 0
    assert q.stats().pending == 0
    assert 0 < redis_client.ttl(keys.done(frame_id)) <= QueueSettings().done_ttl_s <= 3600


def test_dead_letter_moves_entry_atomically(redis_client, key_prefix):
    keys = line_keys(key_prefix, "L1")
    q = _queue(redis_client, key_prefix, "w1")
    redis_client.xadd(keys.frames, {PAYLOAD_FIELD: b"garbage"})
    (entry,) = q.read(block_ms=0)
    q.dead_letter(entry.entry_id, entry.payload, "payload: bad magic", entry.deliveries, "w1")
    (dl_id, fields), = redis_client.xrange(keys.dead_letter)
    assert fields[b"payload"] == b"garbage"
    assert fields[b"reason"] == b"payload: bad magic"
    assert fields[b"entry_id"].decode() == entry.entry_id
    assert fields[b"deliveries"] == b"1" and fields[b"worker"] == b"w1"
    assert abs(float(fields[b"ts"]) - time.time()) < 60
    assert redis_client.xlen(keys.frames) == 0 and q.stats().pending == 0


def test_reclaim_counts_deliveries_and_reports_trimmed(redis_client, key_prefix):
    keys = line_keys(key_prefix, "L1")
    dead = _queue(redis_client, key_prefix, "dead", claim_idle_ms=1, batch=10)
    alive = _queue(redis_client, key_prefix, "alive", claim_idle_ms=1, batch=10)
    ids = [redis_client.xadd(keys.frames, {PAYLOAD_FIELD: _frame_payload(i)}).decode() for i in range(3)]
    assert [e.entry_id for e in dead.read(count=10, block_ms=0)] == ids
    redis_client.xdel(keys.frames, ids[0])  # trimmed while pending
    time.sleep(0.01)
    claim = alive.reclaim()
    assert claim.deleted_ids == (ids[0],)
    assert [e.entry_id for e in claim.entries] == ids[1:]
    assert all(e.deliveries == 2 for e in claim.entries)
    assert alive.deliveries(ids[1]) == 2
    stats = alive.stats()
    assert (stats.length, stats.pending, stats.lag) == (2, 2, 0)
    # another round: the delivery count keeps growing (the worker dead-letters above max_deliveries)
    time.sleep(0.01)
    again = dead.reclaim()
    assert [e.deliveries for e in again.entries] == [3, 3]


@pytest.mark.timeout(60)
def test_worker_dead_letters_after_max_deliveries(redis_client, key_prefix):
    """A frame that makes the detector raise is retried, then dead-lettered with the detector's error on its
    last allowed delivery."""
    import threading

    from config.settings import Settings
    from workers.worker import run_worker

    settings = Settings.load(overrides={
        "redis.key_prefix": key_prefix, "metrics.enabled": False, "queue.max_deliveries": 2,
        "queue.claim_idle_ms": 50, "queue.claim_interval_s": 0.05, "queue.block_ms": 50})
    keys = line_keys(key_prefix, "L1")
    entry_id = redis_client.xadd(keys.frames, {PAYLOAD_FIELD: _frame_payload(3)}).decode()
    stop = threading.Event()
    codes = []
    t = threading.Thread(target=lambda: codes.append(run_worker(settings, "L1", "w1", "fail", stop)))
    t.start()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not redis_client.xlen(keys.dead_letter):
        time.sleep(0.05)
    stop.set()
    t.join(10)
    assert codes == [0]
    (_, fields), = redis_client.xrange(keys.dead_letter)
    assert fields[b"entry_id"].decode() == entry_id
    assert fields[b"reason"].startswith(b"inspect: DetectorFailure"), fields[b"reason"]
    assert b"(delivery 2 of 2)" in fields[b"reason"]
    assert int(fields[b"deliveries"]) == 2  # 2 failed attempts, dead-lettered on the 2nd (last) delivery
    assert wire.decode_frame(fields[b"payload"]).seq == 3
    assert redis_client.xlen(keys.results) == 0 and redis_client.xlen(keys.frames) == 0
