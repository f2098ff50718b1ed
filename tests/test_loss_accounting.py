"""Every frame accounted for: trimmed_oldest counts only frames no worker was given; a Redis that came back
without the stream is detected and its backlog counted (redis_lost); a frozen Redis's timeouts have their own
reason; a job timeout is named when the frame is finally dead-lettered."""

from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import pytest
import redis
from prometheus_client import CollectorRegistry

from config.settings import Settings
from stream import wire
from stream.entries import PAYLOAD_FIELD
from stream.ingest import run_ingest
from stream.keys import line_keys, lines_index
from stream.producer import FrameProducer
from stream.queue import FrameQueue, ensure_group
from tests.helpers import raw_frame, wait_for
from workers.worker import EXIT_STUCK, Worker, _redis_client


def _frame(seq):
    return raw_frame(seq, seq % 255, 8)




def _dropped(registry, reason):
    return registry.get_sample_value("lineinspect_frames_dropped_total",
                                     {"line": "L1", "camera": "c", "reason": reason}) or 0


def test_trimmed_oldest_counts_only_frames_no_worker_was_given(redis_client, key_prefix):
    settings = Settings.load(env={}, overrides={"redis.key_prefix": key_prefix, "queue.maxlen": 5,
                                                "queue.claim_idle_ms": 1})
    keys = line_keys(key_prefix, "L1")
    ensure_group(redis_client, keys.frames, "workers")
    enq = FrameProducer(redis_client, keys, lines_index(key_prefix), maxlen=5, approximate=False, group="workers")
    replies = [enq.add(_frame(i), register=i == 0) for i in range(5)]
    assert sum(r.trimmed for r in replies) == 0 and replies[-1].backlog == 5
    worker = FrameQueue(redis_client, keys, settings.queue, "w1")
    given = worker.read(count=3, block_ms=0)  # a worker holds 3 frames
    replies = [enq.add(_frame(i), register=False) for i in range(5, 9)]  # 4 more: the 4 oldest go
    assert sum(r.trimmed for r in replies) == 4
    assert sum(r.trimmed_undelivered for r in replies) == 1  # only seq 3 was never given to a worker
    # the worker finishes one frame it holds: its result is published (no loss) ...
    assert worker.complete(given[0].entry_id, "c:1:0", b"result") is True
    # ... and a reclaim reports the other two as trimmed while pending (the worker counts them)
    time.sleep(0.01)
    claim = FrameQueue(redis_client, keys, settings.queue, "w2").reclaim(count=10)
    assert sorted(claim.deleted_ids) == sorted(e.entry_id for e in given[1:])
    # 9 added = 1 result + 2 trimmed while held + 1 trimmed_oldest + 5 still queued
    assert 9 == redis_client.xlen(keys.results) + len(claim.deleted_ids) + 1 + redis_client.xlen(keys.frames)
    assert worker.orphaned == 0
    # the holder finishes a frame the reclaim already counted: answered, and flagged as an orphan result
    assert worker.complete(given[1].entry_id, "c:1:1", b"result") is True
    assert worker.orphaned == 1


def _ingest_settings(url, folder, **extra):
    return Settings.load(env={}, overrides={
        "redis.url": url, "redis.key_prefix": "loss", "redis.socket_timeout_s": 0.3, "metrics.enabled": False,
        "cameras": [{"id": "c", "line": "L1", "source": "folder", "path": str(folder), "loop": True,
                     "fps": 50, "encoding": "raw"}], **extra})


def _images(folder):
    import cv2

    folder.mkdir()
    for i in range(3):
        cv2.imwrite(str(folder / f"{i}.png"), np.full((8, 8, 3), i * 40, np.uint8))
    return folder


def _run_ingest_thread(settings, registry):
    stop = threading.Event()
    out = []
    t = threading.Thread(target=lambda: out.append(run_ingest(settings, "c", stop=stop, registry=registry)))
    t.start()
    return stop, t, out


@pytest.mark.timeout(90)
@pytest.mark.parametrize("aof", [False, True], ids=["no_aof", "aof"])
def test_redis_restart_that_lost_the_stream_is_counted(own_redis, tmp_path, aof):
    if aof:  # restart with the append-only file: nothing lost, nothing counted
        own_redis.args = ["--appendonly", "yes", "--appendfsync", "always"]
        own_redis.stop()
        own_redis.start()
    settings = _ingest_settings(own_redis.url, _images(tmp_path / "imgs"))
    keys = line_keys("loss", "L1")
    registry = CollectorRegistry()
    stop, t, out = _run_ingest_thread(settings, registry)
    try:
        client = redis.Redis.from_url(own_redis.url)
        wait_for(lambda: client.xlen(keys.frames) >= 20, 30, "a backlog of 20 frames")
        own_redis.stop()  # no worker: the whole backlog is queued, and lost without AOF
        before = registry.get_sample_value("lineinspect_frames_enqueued_total", {"line": "L1", "camera": "c"})
        own_redis.start()
        client = redis.Redis.from_url(own_redis.url)
        wait_for(lambda: client.exists(keys.frames) and client.xlen(keys.frames) >= 5, 30, "frames after restart")
    finally:
        stop.set()
        t.join(30)
    stats = out[0]
    queued = client.xlen(keys.frames)
    # a frame sent as Redis shut down may have been written (AOF) though no answer came: redis_unconfirmed
    ran_late = queued - (stats.frames_enqueued - stats.dropped_lost)
    assert 0 <= ran_late <= stats.dropped_unconfirmed
    if aof:
        assert stats.dropped_lost == 0 and _dropped(registry, "redis_lost") == 0
    else:
        assert stats.dropped_lost == before >= 20
        assert _dropped(registry, "redis_lost") == before
    # captured = results (none: no worker) + dead-lettered (none) + dropped{reason} + still queued
    assert stats.frames_captured == stats.frames_dropped + queued - ran_late


@pytest.mark.timeout(90)
def test_frozen_redis_unanswered_frames_have_their_own_reason(own_redis, tmp_path):
    settings = _ingest_settings(own_redis.url, _images(tmp_path / "imgs"))
    keys = line_keys("loss", "L1")
    registry = CollectorRegistry()
    stop, t, out = _run_ingest_thread(settings, registry)
    client = redis.Redis.from_url(own_redis.url)
    try:
        wait_for(lambda: client.xlen(keys.frames) >= 5, 30, "first frames")
        os.kill(own_redis.proc.pid, signal.SIGSTOP)  # frozen: connections open, no answers
        time.sleep(1.5)
        os.kill(own_redis.proc.pid, signal.SIGCONT)
        n = client.xlen(keys.frames)
        wait_for(lambda: client.xlen(keys.frames) >= n + 5, 30, "frames after the freeze")
    finally:
        os.kill(own_redis.proc.pid, signal.SIGCONT)
        stop.set()
        t.join(30)
    stats = out[0]
    assert stats.dropped_unconfirmed >= 1 and _dropped(registry, "redis_unconfirmed") == stats.dropped_unconfirmed
    assert stats.dropped_redis == _dropped(registry, "redis_error")
    # while ingest waited on the frozen Redis (socket timeout 0.3 s at 50 fps) camera frame slots passed
    assert stats.frames_missed >= 10 and registry.get_sample_value(
        "lineinspect_frames_missed_total", {"line": "L1", "camera": "c"}) == stats.frames_missed
    queued = client.xlen(keys.frames)
    # a timed-out XADD may have run once Redis thawed: the frame is then queued AND counted redis_unconfirmed
    ran_late = queued - stats.frames_enqueued
    assert 0 <= ran_late <= stats.dropped_unconfirmed
    assert stats.frames_captured == stats.frames_dropped + queued - ran_late


@pytest.mark.timeout(60)
def test_job_timeout_is_named_when_the_frame_is_dead_lettered(redis_url, key_prefix):
    settings = Settings.load(env={}, overrides={
        "redis.url": redis_url, "redis.key_prefix": key_prefix, "metrics.enabled": False,
        "queue.block_ms": 50, "queue.claim_interval_s": 0.05, "queue.claim_idle_ms": 100,
        "queue.job_timeout_s": 0.3, "queue.max_deliveries": 1})
    keys = line_keys(key_prefix, "L1")
    client = redis.Redis.from_url(redis_url)
    entry_id = client.xadd(keys.frames, {PAYLOAD_FIELD: _frame(1)}).decode()
    stuck = Worker(settings, "L1", "w1", "slow:3", CollectorRegistry(), _redis_client(settings))
    assert stuck.run(threading.Event()) == EXIT_STUCK
    registry = CollectorRegistry()
    worker = Worker(settings, "L1", "w2", "noop", registry, _redis_client(settings))
    stop = threading.Event()
    t = threading.Thread(target=worker.run, args=(stop,))
    t.start()
    try:
        wait_for(lambda: client.xlen(keys.dead_letter) == 1, 20, "the dead letter")
    finally:
        stop.set()
        t.join(20)
    (_, fields), = client.xrange(keys.dead_letter)
    assert fields[b"entry_id"].decode() == entry_id
    reason = fields[b"reason"].decode()
    assert reason.startswith("job_timeout: delivered 2 times") and "exceeded job_timeout_s=0.3" in reason, reason
    assert registry.get_sample_value("lineinspect_frames_dead_lettered_total",
                                     {"line": "L1", "reason": "job_timeout"}) == 1
    assert not client.hexists(keys.failures, entry_id)


@pytest.mark.timeout(90)
def test_result_inspected_before_a_restart_that_lost_the_stream_is_still_published(own_redis):
    settings = Settings.load(env={}, overrides={
        "redis.url": own_redis.url, "redis.key_prefix": "loss", "redis.socket_timeout_s": 0.5,
        "metrics.enabled": False, "queue.block_ms": 50, "queue.claim_interval_s": 0.1})
    keys = line_keys("loss", "L1")
    client = redis.Redis.from_url(own_redis.url)
    ensure_group(client, keys.frames, "workers")
    client.xadd(keys.frames, {PAYLOAD_FIELD: _frame(5)})
    registry = CollectorRegistry()
    worker = Worker(settings, "L1", "w1", "slow:1.5", registry, _redis_client(settings))
    stop = threading.Event()
    t = threading.Thread(target=worker.run, args=(stop,))
    t.start()
    try:
        wait_for(lambda: client.xpending(keys.frames, "workers")["pending"] == 1, 30, "the frame in the worker's hands")
        own_redis.stop()  # the worker's publish fails: it holds the result
        wait_for(lambda: len(worker.link.held or ()) == 1, 30, "the result held")
        own_redis.start()  # empty: stream, group and entry are gone
        client = redis.Redis.from_url(own_redis.url)
        wait_for(lambda: client.exists(keys.results) and client.xlen(keys.results) == 1, 10, "the held result")
    finally:
        stop.set()
        t.join(20)
    (_, fields), = client.xrange(keys.results)
    assert wire.decode_result(fields[PAYLOAD_FIELD]).seq == 5
    assert registry.get_sample_value("lineinspect_worker_orphan_results_total", {"line": "L1"}) == 1
