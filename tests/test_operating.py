"""The operating point: published-mask metrics (workers.operating) and the mask/map agreement rule (cps)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from workers.cps import MaskCheck
from workers.operating import MaskPool


def square(shape, y0, x0, side):
    m = np.zeros(shape, bool)
    m[y0:y0 + side, x0:x0 + side] = True
    return m


def test_mask_pool_counts_pixels_regions_and_false_regions():
    pool = MaskPool(size=None)
    gt = square((100, 100), 10, 10, 20) | square((100, 100), 60, 60, 10)  # two regions: 400 + 100 px
    pub = square((100, 100), 10, 10, 20)  # finds the first region exactly, misses the second
    pool.add(pub, gt)
    good_pub = square((100, 100), 0, 0, 5) | square((100, 100), 50, 50, 5)  # two false regions on a good image
    pool.add(good_pub, None)
    pool.add(np.zeros((100, 100), bool), None)  # an OK verdict: nothing published
    r = pool.result()
    assert (pool.tp, pool.fp, pool.fn) == (400, 50, 100)
    assert r.precision == pytest.approx(400 / 450) and r.recall == pytest.approx(400 / 500)
    assert r.f1 == pytest.approx(2 * 400 / (2 * 400 + 50 + 100))
    assert r.iou == pytest.approx(400 / 550)
    assert r.regions_found == pytest.approx(0.5) and r.gt_regions == 2
    assert r.false_regions_per_good == pytest.approx(1.0) and r.good_images == 2


def test_mask_pool_resizes_and_is_undefined_without_defects():
    pool = MaskPool(size=50)
    pool.add(np.ones((200, 100), np.uint8), None)
    r = pool.result()
    assert pool.fp == 50 * 25 and math.isnan(r.f1) and math.isnan(r.regions_found)
    assert r.false_regions_per_good == 1.0


def test_region_counts_as_found_from_ten_percent():
    pool = MaskPool(size=None)
    gt = square((50, 50), 0, 0, 10)  # 100 px
    pub = np.zeros((50, 50), bool)
    pub[0, :9] = True  # 9 px: not found
    pool.add(pub, gt)
    assert pool.result().regions_found == 0.0
    pool2 = MaskPool(size=None)
    pub[1, 0] = True  # 10 px: found
    pool2.add(pub, gt)
    assert pool2.result().regions_found == 1.0


def test_flagged_without_a_mask_counts_defect_verdicts_with_nothing_outlined():
    pool = MaskPool(size=None)
    gt = square((40, 40), 5, 5, 10)
    pool.add(square((40, 40), 5, 5, 10), gt, flagged=True)  # flagged and outlined
    pool.add(np.zeros((40, 40), bool), gt, flagged=True)  # flagged, nothing published
    pool.add(np.zeros((40, 40), bool), None, flagged=True)  # a false alarm with nothing published
    pool.add(np.zeros((40, 40), bool), gt, flagged=False)  # a miss: not a flagged image
    pool.add(np.zeros((40, 40), bool), gt)  # verdict unknown: not counted
    assert pool.result().flagged_without_mask == pytest.approx(2 / 3)
    empty = MaskPool(size=None)
    empty.add(np.zeros((40, 40), bool), gt, flagged=False)
    assert math.isnan(empty.result().flagged_without_mask)  # no flagged image: undefined


def test_mask_check_rejects_floods_and_masks_off_the_map():
    check = MaskCheck(max_area_ratio=4.0, min_support=0.5, support_level=0.5)
    pixel = np.zeros((100, 100), np.float32)
    pixel[40:60, 40:60] = 2.0  # the map's region: 400 px
    region_area = 400
    assert check.accepts(square((100, 100), 38, 38, 24), region_area, pixel)  # follows the region
    assert not check.accepts(np.ones((100, 100), bool), region_area, pixel)  # floods the frame
    assert not check.accepts(square((100, 100), 0, 0, 30), region_area, pixel)  # beside it, off the map
    assert not check.accepts(np.zeros((100, 100), bool), region_area, pixel)  # empty
    # bounded area but mostly outside the high map: rejected by support
    off = square((100, 100), 40, 40, 10) | square((100, 100), 0, 0, 25)
    assert not check.accepts(off, region_area, pixel)
