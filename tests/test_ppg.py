"""PPG geometry on constructed maps and SAM-shaped features where the right answer is known."""

from __future__ import annotations

import itertools

import cv2
import numpy as np
import pytest

from config.settings import PpgSettings
from workers.interfaces import ImageEmbedding
from workers.ppg import dilation_kernel, generate_prompts, kernel_pixels

H, W = 300, 600  # non-square frame: the encoder input is 512 x 1024 inside the padded 1024 x 1024 frame
IN_H, IN_W = 512, 1024


def _embedding(features: np.ndarray, h: int = H, w: int = W) -> ImageEmbedding:
    return ImageEmbedding(key="t", features=features.astype(np.float32), input_size=(IN_H, IN_W),
                          original_size=(h, w))


def _blob(cx: float, cy: float, sigma: float, peak: float, h: int = H, w: int = W) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    return (peak * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * sigma**2))).astype(np.float32)


def _cell(x: int, y: int) -> tuple[int, int]:
    """The feature cell under original pixel (x, y), computed here from the encoder geometry."""
    return int((y + 0.5) * IN_H / H / 16), int((x + 0.5) * IN_W / W / 16)


def test_positives_are_spaced_top_scores_inside_the_region():
    settings = PpgSettings(threshold=0.5, top_k=4, min_spacing=0.05)
    amap = _blob(300, 150, 40, 2.0) + _blob(360, 170, 15, 0.6)
    rng = np.random.default_rng(1)
    emb = _embedding(rng.normal(size=(8, 64, 64)))
    (region,) = generate_prompts(amap, emb, settings)
    pos = region.positives
    assert len(pos) == 4 and (region.labels[:4] == 1).all()
    xs, ys = pos[:, 0].astype(int), pos[:, 1].astype(int)
    assert region.mask[ys, xs].all()
    min_dist = 0.05 * W
    for a, b in itertools.combinations(pos, 2):
        assert np.hypot(*(a - b)) >= min_dist
    # greedy optimum, checked by brute force: each point is the best region pixel far enough from the earlier ones
    ry, rx = np.nonzero(amap >= 0.5)
    allowed = np.ones(len(ry), bool)
    for x, y in zip(xs, ys, strict=True):
        best = np.argmax(np.where(allowed, amap[ry, rx], -np.inf))
        assert amap[y, x] == pytest.approx(amap[ry[best], rx[best]])
        allowed &= (rx - x) ** 2 + (ry - y) ** 2 >= min_dist**2
    assert region.box == (rx.min(), ry.min(), rx.max() + 1, ry.max() + 1)
    assert region.peak == pytest.approx(float(amap.max()))


def test_negatives_are_the_lowest_similarity_ring_locations():
    settings = PpgSettings(threshold=0.5, top_k=2, negatives=3, min_spacing=0.05, kernel_shape="ellipse",
                           kernel_size=25)
    yy, xx = np.mgrid[0:H, 0:W]
    amap = np.where((xx - 300) ** 2 + (yy - 150) ** 2 <= 40**2, 2.0, 0.0).astype(np.float32)
    region = amap >= 0.5
    k = kernel_pixels(25, (H, W))
    ring = cv2.dilate(region.astype(np.uint8), cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k))) > 0
    ring &= ~region

    e0, e1 = np.eye(4)[0], np.eye(4)[1]
    feats = np.zeros((4, 64, 64))
    feats[:, :, :] = e0[:, None, None]  # every valid cell looks like the anomaly ...
    feats[:, 32:, :] = -e0[:, None, None]  # ... the padding rows look least like it (must never be sampled)
    # three ring locations at 120 degrees: similarity -1, 0 and 0.71 to the region's mean feature
    targets = []
    for angle, f in ((0.0, -e0), (2.1, e1), (4.2, e0 + e1)):
        r = 44.0
        x, y = int(round(300 + r * np.cos(angle))), int(round(150 + r * np.sin(angle)))
        assert ring[y, x]
        cell = _cell(x, y)
        feats[:, cell[0], cell[1]] = f
        targets.append(cell)
    (rp,) = generate_prompts(amap, _embedding(feats), settings)
    neg = rp.negatives
    assert len(neg) == 3 and (rp.labels == 0).sum() == 3
    got = [_cell(int(x), int(y)) for x, y in neg]
    assert got == targets  # lowest similarity first, in order
    assert ring[neg[:, 1].astype(int), neg[:, 0].astype(int)].all()
    assert rp.ring.sum() == ring.sum() and (rp.ring == ring).all()


def test_negatives_lie_on_the_ring_only_and_never_on_another_anomaly():
    settings = PpgSettings(threshold=0.5, top_k=3, negatives=6, min_spacing=0.02, kernel_size=100)
    amap = _blob(250, 150, 15, 2.0) + _blob(320, 150, 15, 1.5)  # two regions whose rings overlap
    s_a = amap >= 0.5
    n, _ = cv2.connectedComponents(s_a.astype(np.uint8))
    assert n - 1 == 2
    rng = np.random.default_rng(2)
    regions = generate_prompts(amap, _embedding(rng.normal(size=(16, 64, 64))), settings)
    assert len(regions) == 2
    k = kernel_pixels(100, (H, W))
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k))
    for rp in regions:
        dilated = cv2.dilate(rp.mask.astype(np.uint8), kernel) > 0
        assert (dilated & s_a & ~rp.mask).any()  # the dilation reaches the other anomaly ...
        ring = dilated & ~s_a  # ... which is not part of the ring
        assert not (rp.ring & s_a).any() and (rp.ring == ring).all()
        neg = rp.negatives.astype(int)
        assert len(neg) >= 3
        assert ring[neg[:, 1], neg[:, 0]].all()
        assert not s_a[neg[:, 1], neg[:, 0]].any()
        pos = rp.positives.astype(int)
        assert rp.mask[pos[:, 1], pos[:, 0]].all()
        for a, b in itertools.combinations(neg, 2):
            assert np.hypot(*(a - b)) >= 0.02 * W


@pytest.mark.parametrize("shape,expected", [((1024, 1024), 25), ((512, 2048), 50), ((600, 300), 15),
                                            ((64, 64), 3)])
def test_kernel_scales_with_map_resolution(shape, expected):
    assert kernel_pixels(25, shape) == expected
    assert dilation_kernel("rect", 25, shape).shape == (expected, expected)


@pytest.mark.parametrize("side", [1024, 2048])
def test_ring_shape_and_size_follow_the_kernel(side):
    k = kernel_pixels(25, (side, side))
    emb = ImageEmbedding(key="t", features=np.ones((4, 64, 64), np.float32), input_size=(1024, 1024),
                         original_size=(side, side))
    amap = np.zeros((side, side), np.float32)
    amap[side // 2, side // 2] = 2.0
    areas = {}
    for shape in ("rect", "ellipse", "cross"):
        s = PpgSettings(threshold=1.0, kernel_shape=shape, kernel_size=25, min_region_area=0.0)
        (rp,) = generate_prompts(amap, emb, s)
        areas[shape] = int(rp.ring.sum())
        ys, xs = np.nonzero(rp.ring | rp.mask)
        assert xs.max() - xs.min() + 1 == k and ys.max() - ys.min() + 1 == k
    assert areas["rect"] == k * k - 1
    assert areas["cross"] == 2 * k - 2
    assert areas["cross"] < areas["ellipse"] < areas["rect"]


def test_several_regions_give_several_prompt_sets_sorted_and_filtered():
    amap = _blob(100, 100, 15, 1.5) + _blob(300, 200, 15, 3.0) + _blob(500, 80, 15, 2.0)
    amap[280:282, 50:52] = 5.0  # 4 pixels: below min_region_area, ignored although the highest
    rng = np.random.default_rng(3)
    emb = _embedding(rng.normal(size=(8, 64, 64)))
    regions = generate_prompts(amap, emb, PpgSettings(threshold=0.5, min_region_area=0.0005, max_regions=5))
    assert [round(r.peak, 2) for r in regions] == [3.0, 2.0, 1.5]
    assert [r.index for r in regions] == [0, 1, 2]
    centres = [(300, 200), (500, 80), (100, 100)]
    for rp, (cx, cy) in zip(regions, centres, strict=True):
        x0, y0, x1, y1 = rp.box
        assert x0 < cx < x1 and y0 < cy < y1
        pos = rp.positives.astype(int)
        assert rp.mask[pos[:, 1], pos[:, 0]].all() and rp.mask[cy, cx]
        p = rp.prompts()
        assert p.points.shape == (len(rp.labels), 2) and p.box is None and p.mask_logits is None
    assert not (regions[0].mask & regions[1].mask).any()
    capped = generate_prompts(amap, emb, PpgSettings(threshold=0.5, max_regions=2))
    assert [round(r.peak, 2) for r in capped] == [3.0, 2.0]
    assert generate_prompts(amap * 0.1, emb, PpgSettings(threshold=0.5)) == ()


def test_map_at_lower_resolution_gives_points_in_original_pixels():
    amap = _blob(150, 75, 10, 2.0, h=H // 2, w=W // 2)  # half-resolution map of a 300 x 600 frame
    rng = np.random.default_rng(4)
    (rp,) = generate_prompts(amap, _embedding(rng.normal(size=(8, 64, 64))), PpgSettings(threshold=0.5))
    assert rp.mask.shape == (H // 2, W // 2)
    assert rp.positives[0] == pytest.approx((300.0, 150.0), abs=2.0)
    x0, y0, x1, y1 = rp.box
    assert x0 < 300 < x1 <= W and y0 < 150 < y1 <= H
