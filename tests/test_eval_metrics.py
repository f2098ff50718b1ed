"""workers.eval_metrics against scikit-learn and hand-made cases with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

from workers import eval_metrics as M


def _sk_f1max(y, s):
    p, r, _ = precision_recall_curve(y, s)
    denom = p + r
    f1 = np.divide(2 * p * r, denom, out=np.zeros_like(denom), where=denom > 0)
    return float(f1.max())


@pytest.mark.parametrize("seed", range(6))
def test_matches_sklearn_on_random_data(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(20, 3000))
    y = rng.random(n) < rng.uniform(0.05, 0.6)
    y[0], y[1] = True, False
    s = rng.normal(size=n) + y * rng.uniform(0.0, 2.0)
    if seed % 2:  # coarse scores: many ties
        s = np.round(s, 1)
    b = M.binary_metrics(s.astype(np.float32), y)
    s32 = s.astype(np.float32)
    assert b.auroc == pytest.approx(roc_auc_score(y, s32), abs=1e-12)
    assert b.ap == pytest.approx(average_precision_score(y, s32), abs=1e-12)
    assert b.f1_max == pytest.approx(_sk_f1max(y, s32), abs=1e-12)
    assert b.positives == int(y.sum()) and b.negatives == int(n - y.sum())
    # the reported threshold reproduces the F1 maximum
    pred = s32 >= b.f1_threshold
    tp = np.sum(pred & y)
    f1 = 2 * tp / (pred.sum() + y.sum())
    assert f1 == pytest.approx(b.f1_max, abs=1e-12)
    assert M.auroc(s32, y) == b.auroc and M.average_precision(s32, y) == b.ap


def test_perfect_inverted_and_constant():
    y = np.array([0, 0, 0, 1, 1], dtype=bool)
    s = np.array([0.1, 0.2, 0.3, 0.8, 0.9])
    b = M.binary_metrics(s, y)
    assert (b.auroc, b.ap, b.f1_max) == (1.0, 1.0, 1.0)
    assert b.f1_threshold == pytest.approx(0.8)
    inv = M.binary_metrics(-s, y)
    assert inv.auroc == 0.0
    # inverted: positives come last; the best F1 is predicting everything positive: 2*0.4/1.4
    assert inv.f1_max == pytest.approx(2 * 0.4 / 1.4)
    assert inv.ap == pytest.approx(average_precision_score(y, -s))
    const = M.binary_metrics(np.zeros(5), y)  # all tied: one threshold
    assert const.auroc == 0.5
    assert const.ap == pytest.approx(0.4)


def test_ties_between_classes_count_half():
    # one positive tied with one negative, the rest separated: AUROC = (3 + 0.5) / 4
    y = np.array([1, 1, 0, 0], dtype=bool)
    s = np.array([0.9, 0.5, 0.5, 0.1])
    assert M.auroc(s, y) == pytest.approx(0.875)
    assert M.auroc(s, y) == pytest.approx(roc_auc_score(y, s))


def test_single_class_is_nan_not_error():
    assert math.isnan(M.auroc(np.array([0.1, 0.2]), np.array([0, 0])))
    assert math.isnan(M.average_precision(np.array([0.1, 0.2]), np.array([0, 0])))
    assert math.isnan(M.auroc(np.array([0.1, 0.2]), np.array([1, 1])))
    with pytest.raises(ValueError):
        M.auroc(np.array([0.1, np.nan]), np.array([0, 1]))


def test_aupro_hand_made():
    # 10 normal pixels scored 0.1..1.0 (distinct, in the middle), region 1 (2 px) above all of them,
    # region 2 (3 px) below all of them. PRO = 0.5 from FPR 0 up to FPR 1 -> AUPRO@0.3 = 0.5
    normal = np.linspace(0.1, 1.0, 10)
    scores = np.concatenate([normal, [2.0, 2.0], [-1.0, -1.0, -1.0]])
    regions = np.array([0] * 10 + [1, 1] + [2, 2, 2])
    assert M.aupro(scores, regions) == pytest.approx(0.5)
    # perfect separation -> 1.0
    assert M.aupro(np.concatenate([normal, [2.0] * 5]), regions) == pytest.approx(1.0)
    # region 2 (0.85) found after 2 of 10 normal pixels (FPR 0.2), region 1 from the start: PRO 0.5 on
    # [0, 0.2], then a vertical step to 1.0 -> area 0.2*0.5 + 0.1*1.0
    scores3 = np.concatenate([normal, [2.0, 2.0], [0.85, 0.85, 0.85]])
    assert M.aupro(scores3, regions) == pytest.approx((0.2 * 0.5 + 0.1 * 1.0) / 0.3)
    # region 2 tied with the normal pixel 0.9: one threshold moves both curves, from (0.1, 0.5) straight to
    # (0.2, 1.0), so that segment is a ramp: area 0.1*0.5 + 0.1*0.75 + 0.1*1.0
    scores4 = np.concatenate([normal, [2.0, 2.0], [0.9, 0.9, 0.9]])
    assert M.aupro(scores4, regions) == pytest.approx((0.05 + 0.075 + 0.1) / 0.3)
    # the limit falls inside a ramp and is interpolated: region 2 tied with the normal pixel 0.8 gives the
    # points (0.2, 0.5) -> (0.3, 1.0); at limit 0.25 the curve is at 0.75: area 0.2*0.5 + 0.05*(0.5+0.75)/2
    scores5 = np.concatenate([normal, [2.0, 2.0], [0.8] * 3])
    assert M.aupro(scores5, regions, fpr_limit=0.25) == pytest.approx((0.1 + 0.03125) / 0.25)


def test_aupro_region_weighting_is_per_region_not_per_pixel():
    # big region (8 px) found, small region (1 px) missed: PRO 0.5 (pixel recall would be 8/9)
    normal = np.linspace(0.0, 1.0, 20)
    scores = np.concatenate([normal, [5.0] * 8, [-5.0]])
    regions = np.array([0] * 20 + [1] * 8 + [2])
    assert M.aupro(scores, regions) == pytest.approx(0.5)
    assert math.isnan(M.aupro(normal, np.zeros(20, dtype=int)))


def test_pixel_pool_pools_images_and_labels_regions():
    rng = np.random.default_rng(3)
    maps, masks = [], []
    for i in range(4):
        m = np.zeros((40, 60), np.uint8)
        if i < 3:
            m[5 + i:12 + i, 10:20] = 255
            m[30:35, 40 + i:50] = 255  # a second region
        s = rng.random((40, 60)).astype(np.float32) + (m > 0) * 0.7
        maps.append(s)
        masks.append(m if i < 3 else None)
    pool = M.PixelPool(size=None)
    for s, m in zip(maps, masks, strict=True):
        pool.add(s, m)
    pm = pool.compute()
    y = np.concatenate([(m if m is not None else np.zeros((40, 60))).ravel() > 0 for m in masks])
    s = np.concatenate([x.ravel() for x in maps])
    assert pm.regions == 6
    assert pm.auroc == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert pm.ap == pytest.approx(average_precision_score(y, s), abs=1e-12)
    assert pm.f1_max == pytest.approx(_sk_f1max(y, s), abs=1e-12)
    assert 0.0 < pm.aupro <= 1.0
    curve = pool.curve(max_points=50)
    assert len(curve.recall) <= 50 and curve.recall[-1] == pytest.approx(1.0)
    assert all(a <= b for a, b in zip(curve.recall, curve.recall[1:], strict=False))


def test_pixel_pool_downscales_to_fixed_size():
    big = np.zeros((1000, 500), np.float32)
    big[100:300, 100:200] = 1.0
    mask = (big > 0).astype(np.uint8)
    pool = M.PixelPool(size=100)
    pool.add(big, mask)
    pm = pool.compute()
    assert pm.positives + pm.negatives == 100 * 50  # pooled at 100 x 50
    assert pm.auroc == 1.0 and pm.aupro == pytest.approx(1.0) and pm.size == 100
