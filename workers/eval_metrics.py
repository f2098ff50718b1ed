"""Anomaly-detection metrics on numpy arrays: image and pixel AUROC, AP, F1-max and AUPRO.

Definitions (as used in the MVTec AD / VisA literature, see docs/method.md section 4):

- **AUROC**: area under the ROC curve, trapezoidal over every distinct score (ties form one step),
  identical to ``sklearn.metrics.roc_auc_score``.
- **AP**: average precision with sklearn's step definition, ``sum_n (R_n - R_{n-1}) * P_n`` over the
  distinct thresholds in decreasing order (``sklearn.metrics.average_precision_score``; no interpolation).
- **F1-max**: the best ``2PR / (P + R)`` over every distinct threshold (the points of
  ``sklearn.metrics.precision_recall_curve``), with the threshold that reaches it (a pixel is positive when
  ``score >= threshold``).
- **AUPRO**: per-region overlap (Bergmann et al., MVTec AD, IJCV 2021). For a threshold ``t`` the PRO is the
  mean, over every connected ground-truth region of every image, of the fraction of that region's pixels with
  ``score >= t``; the false-positive rate is the fraction of *all* normal pixels (all images) with
  ``score >= t``. The PRO-vs-FPR curve is integrated (trapezoid, the point at the limit interpolated) from
  FPR 0 to ``fpr_limit`` (0.3) and divided by ``fpr_limit`` so that a perfect detector scores 1.0.

Pixel metrics pool all pixels of all test images of a category. Everything is computed **exactly** on the
sorted pooled scores (one ``argsort``, cumulative sums at the distinct thresholds), no threshold grid.
The memory cost is about 24 bytes per pooled pixel at computation time; :class:`PixelPool` therefore
optionally downscales every map and mask to a longest side of ``size`` pixels before pooling (maps with
area interpolation, masks with nearest neighbour; regions are labelled after the resize). ``size=None``
pools at full resolution. Published numbers are usually computed at 224-518 px, so the default 256 is in
that range; say which one you used when reporting.

Undefined values (a single class present, no normal pixel for AUPRO) are ``nan``, never an exception.
The functions here need numpy only; :class:`PixelPool` uses OpenCV for resizing and region labelling.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

NAN = float("nan")


# ------------------------------------------------------------------------------------------ results


@dataclass(frozen=True)
class BinaryMetrics:
    """Threshold-free metrics of one score/label set (an image-level or pooled pixel-level one)."""

    auroc: float
    ap: float
    f1_max: float
    f1_threshold: float  # score >= this is positive at the F1 maximum (nan if undefined)
    positives: int
    negatives: int


@dataclass(frozen=True)
class PixelMetrics:
    auroc: float
    ap: float
    f1_max: float
    f1_threshold: float
    aupro: float
    positives: int  # defect pixels pooled
    negatives: int  # normal pixels pooled
    regions: int  # connected ground-truth regions
    size: int | None  # longest side the maps were pooled at (None = native)


@dataclass(frozen=True)
class Curve:
    """A precision/recall curve (recall increasing), possibly thinned for plotting."""

    precision: tuple[float, ...]
    recall: tuple[float, ...]
    thresholds: tuple[float, ...]


# ------------------------------------------------------------------------------------------ core


@dataclass(frozen=True)
class _Counts:
    """Cumulative true/false positives at every distinct threshold, thresholds decreasing."""

    tps: np.ndarray  # float64
    fps: np.ndarray  # float64
    thresholds: np.ndarray
    positives: int
    negatives: int


def _flat_pair(scores: np.ndarray, other: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Both flattened; same size and finite scores, else ValueError naming ``what`` the other array is."""
    s = np.asarray(scores).ravel()
    o = np.asarray(other).ravel()
    if s.shape != o.shape:
        raise ValueError(f"scores and {what} differ in size: {s.shape} vs {o.shape}")
    if s.size and not np.all(np.isfinite(s)):
        raise ValueError("scores contain NaN or infinite values")
    return s, o


def _check(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    s, y = _flat_pair(scores, labels, "labels")
    return s, y.astype(bool, copy=False)


def _sorted_order(s: np.ndarray) -> np.ndarray:
    """Indices that sort ``s`` in decreasing order (order among ties is irrelevant: ties are grouped)."""
    return np.argsort(s)[::-1]


def _distinct_ends(sorted_scores: np.ndarray) -> np.ndarray:
    """Index of the last element of every run of equal scores in a sorted array."""
    n = sorted_scores.size
    change = np.flatnonzero(sorted_scores[1:] != sorted_scores[:-1])
    return np.concatenate([change, [n - 1]]) if n else np.zeros(0, dtype=np.int64)


def _counts(scores: np.ndarray, labels: np.ndarray) -> _Counts:
    s, y = _check(scores, labels)
    order = _sorted_order(s)
    s_sorted = s[order]
    y_sorted = y[order]
    del order
    ends = _distinct_ends(s_sorted)
    tps = np.cumsum(y_sorted, dtype=np.int64)[ends].astype(np.float64)
    fps = (ends + 1).astype(np.float64) - tps
    positives = int(tps[-1]) if tps.size else 0
    return _Counts(tps=tps, fps=fps, thresholds=s_sorted[ends], positives=positives,
                   negatives=int(s.size - positives))


def _auroc(c: _Counts) -> float:
    if c.positives == 0 or c.negatives == 0:
        return NAN
    tpr = np.concatenate([[0.0], c.tps / c.positives])
    fpr = np.concatenate([[0.0], c.fps / c.negatives])
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2.0))


def _precision_recall(c: _Counts) -> tuple[np.ndarray, np.ndarray]:
    precision = c.tps / (c.tps + c.fps)  # tps + fps >= 1 at every distinct threshold
    recall = c.tps / c.positives
    return precision, recall


def _ap(c: _Counts) -> float:
    if c.positives == 0:
        return NAN
    precision, recall = _precision_recall(c)
    return float(np.sum(np.diff(np.concatenate([[0.0], recall])) * precision))


def _f1(c: _Counts) -> tuple[float, float]:
    if c.positives == 0:
        return NAN, NAN
    precision, recall = _precision_recall(c)
    denom = precision + recall
    f1 = np.divide(2.0 * precision * recall, denom, out=np.zeros_like(denom), where=denom > 0)
    best = int(np.argmax(f1))
    return float(f1[best]), float(c.thresholds[best])


# ------------------------------------------------------------------------------------------ public


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """ROC AUC (as ``sklearn.metrics.roc_auc_score``); ``nan`` if only one class is present."""
    return _auroc(_counts(scores, labels))


def average_precision(scores: np.ndarray, labels: np.ndarray) -> float:
    """Average precision (as ``sklearn.metrics.average_precision_score``); ``nan`` without positives."""
    return _ap(_counts(scores, labels))


def f1_max(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """``(best F1, threshold)`` over all distinct thresholds; ``(nan, nan)`` without positives."""
    return _f1(_counts(scores, labels))


def binary_metrics(scores: np.ndarray, labels: np.ndarray) -> BinaryMetrics:
    """AUROC, AP and F1-max from one sort."""
    c = _counts(scores, labels)
    f1, thr = _f1(c)
    return BinaryMetrics(auroc=_auroc(c), ap=_ap(c), f1_max=f1, f1_threshold=thr,
                         positives=c.positives, negatives=c.negatives)


def pr_curve(scores: np.ndarray, labels: np.ndarray, max_points: int = 200) -> Curve:
    """Precision/recall at the distinct thresholds (recall increasing), thinned to ``max_points``."""
    c = _counts(scores, labels)
    if c.positives == 0:
        return Curve((), (), ())
    precision, recall = _precision_recall(c)
    idx = np.arange(precision.size)
    if precision.size > max_points:
        idx = np.unique(np.linspace(0, precision.size - 1, max_points).round().astype(np.int64))
    return Curve(tuple(float(v) for v in precision[idx]), tuple(float(v) for v in recall[idx]),
                 tuple(float(v) for v in c.thresholds[idx]))


def aupro(scores: np.ndarray, regions: np.ndarray, fpr_limit: float = 0.3) -> float:
    """Normalised area under the PRO curve up to ``fpr_limit``.

    ``scores``: pooled pixel scores; ``regions``: same size, int, 0 for a normal pixel and a region id > 0
    (unique over all pooled images) for a defect pixel. ``nan`` if there is no region or no normal pixel.
    """
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit {fpr_limit}: allowed 0 < limit <= 1")
    s, r = _flat_pair(scores, regions, "regions")
    if r.size and r.min() < 0:
        raise ValueError("region ids must be >= 0")
    areas = np.bincount(r.astype(np.int64, copy=False))
    areas[0] = 0
    ids = np.flatnonzero(areas)
    normal = int(r.size - areas.sum())
    if ids.size == 0 or normal == 0:
        return NAN
    # per-pixel step of each curve: a normal pixel moves the FPR by 1/normal, a pixel of region j moves the
    # PRO by 1/(regions * area_j); summing the steps down the sorted scores gives both curves exactly
    region_weight = np.zeros(areas.size, dtype=np.float64)
    region_weight[ids] = 1.0 / (ids.size * areas[ids])
    order = _sorted_order(s)
    s_sorted = s[order]
    r_sorted = r[order]
    del order
    ends = _distinct_ends(s_sorted)
    fpr = np.cumsum(r_sorted == 0, dtype=np.int64)[ends] / normal
    pro = np.cumsum(region_weight[r_sorted])[ends]
    fpr = np.concatenate([[0.0], fpr])
    pro = np.concatenate([[0.0], np.minimum(pro, 1.0)])
    # cut at the limit: keep the points below it and interpolate the curve at the limit itself
    k = int(np.searchsorted(fpr, fpr_limit, side="right"))  # fpr[:k] <= limit
    xs, ys = fpr[:k], pro[:k]
    if k < fpr.size and xs[-1] < fpr_limit:
        x0, x1, y0, y1 = fpr[k - 1], fpr[k], pro[k - 1], pro[k]
        y_lim = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
        xs = np.concatenate([xs, [fpr_limit]])
        ys = np.concatenate([ys, [y_lim]])
    area = float(np.sum(np.diff(xs) * (ys[1:] + ys[:-1]) / 2.0))
    return area / fpr_limit


# ------------------------------------------------------------------------------------------ pooling


class PixelPool:
    """Collects score maps and ground-truth masks of one category, then computes pooled pixel metrics.

    ``size``: longest side every map/mask is resized to before pooling (``None`` = keep native size). A
    mask is binarised (``> 0``), resized with nearest neighbour, and its 8-connected regions are labelled
    per image (ids unique over the pool) for AUPRO.
    """

    def __init__(self, size: int | None = 256, fpr_limit: float = 0.3):
        if size is not None and size < 8:
            raise ValueError(f"size {size}: must be >= 8 or None")
        self.size = size
        self.fpr_limit = fpr_limit
        self._scores: list[np.ndarray] = []
        self._regions: list[np.ndarray] = []
        self._next_region = 1

    def __len__(self) -> int:
        return len(self._scores)

    def _target(self, shape: tuple[int, int]) -> tuple[int, int]:
        h, w = shape
        if self.size is None or max(h, w) <= self.size:
            return h, w
        f = self.size / max(h, w)
        return max(1, int(round(h * f))), max(1, int(round(w * f)))

    def add(self, score_map: np.ndarray, mask: np.ndarray | None) -> None:
        """Add one image: ``score_map`` float HxW, ``mask`` HxW (> 0 = defect) or None for a good image."""
        import cv2

        score_map = np.asarray(score_map, dtype=np.float32)
        if score_map.ndim != 2:
            raise ValueError(f"score map must be 2-D, got shape {score_map.shape}")
        if mask is None:
            mask = np.zeros(score_map.shape, dtype=np.uint8)
        mask = (np.asarray(mask) > 0).astype(np.uint8)
        if mask.ndim != 2:
            raise ValueError(f"mask must be 2-D, got shape {mask.shape}")
        h, w = self._target(score_map.shape)
        if (h, w) != score_map.shape:
            score_map = cv2.resize(score_map, (w, h), interpolation=cv2.INTER_AREA)
        if mask.shape != (h, w):
            mask = cv2.resize(mask, (w, h), interpolation=cv2.INTER_NEAREST)
        n, labels = cv2.connectedComponents(mask, connectivity=8)
        regions = labels.astype(np.int32)
        if n > 1:
            regions[regions > 0] += self._next_region - 1
            self._next_region += n - 1
        self._scores.append(score_map.ravel())
        self._regions.append(regions.ravel())

    def compute(self) -> PixelMetrics:
        if not self._scores:
            raise ValueError("no image was added")
        s = np.concatenate(self._scores)
        r = np.concatenate(self._regions)
        b = binary_metrics(s, r > 0)
        pro = aupro(s, r, self.fpr_limit)
        return PixelMetrics(auroc=b.auroc, ap=b.ap, f1_max=b.f1_max, f1_threshold=b.f1_threshold, aupro=pro,
                            positives=b.positives, negatives=b.negatives, regions=self._next_region - 1,
                            size=self.size)

    def curve(self, max_points: int = 200) -> Curve:
        s = np.concatenate(self._scores)
        r = np.concatenate(self._regions)
        return pr_curve(s, r > 0, max_points)
