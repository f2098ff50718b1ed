"""What a line gets at its operating point: the published binary masks and the verdicts, not the ranking.

:class:`MaskPool` pools, over a category's test images, the published defect mask (the result's labels, empty
for an OK verdict) against the ground truth:

- pixel precision / recall / F1 / IoU of the published masks (all pixels of all images pooled, at the same
  resolution as the threshold-free pixel metrics);
- *regions found*: the share of ground-truth regions (8-connected) of which at least
  :data:`REGION_HIT_FRACTION` of the pixels are covered by the published mask;
- *false regions per good image*: published connected regions on defect-free images, per such image;
- *flagged without a mask*: the share of flagged images (DEFECT verdicts) that publish no mask pixel, i.e.
  verdicts an operator gets with nothing outlined.

Verdict shares (defective and good images flagged at the calibrated image threshold) are counted beside it in
:mod:`workers.evaluate`.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

REGION_HIT_FRACTION = 0.1  # a ground-truth region counts as found when this share of it is masked


@dataclass(frozen=True)
class OperatingPoint:
    """Pooled quality of the published masks (fractions in [0, 1]; nan where undefined)."""

    precision: float
    recall: float
    f1: float
    iou: float
    regions_found: float  # share of ground-truth regions found
    false_regions_per_good: float  # published regions per defect-free image
    gt_regions: int
    good_images: int
    flagged_without_mask: float = float("nan")  # share of flagged images whose published mask is empty

    @classmethod
    def empty(cls) -> OperatingPoint:
        nan = float("nan")
        return cls(nan, nan, nan, nan, nan, nan, 0, 0)


def _target(shape: tuple[int, int], size: int | None) -> tuple[int, int]:
    h, w = shape
    if size is None or max(h, w) <= size:
        return h, w
    f = size / max(h, w)
    return max(1, int(round(h * f))), max(1, int(round(w * f)))


class MaskPool:
    """Accumulates published masks against ground truth; ``size`` as in :class:`workers.eval_metrics.PixelPool`."""

    def __init__(self, size: int | None = 256):
        self.size = size
        self.tp = self.fp = self.fn = 0
        self.gt_regions = 0
        self.found_regions = 0
        self.good_images = 0
        self.false_regions_good = 0
        self.flagged = 0
        self.flagged_empty = 0

    def add(self, published: np.ndarray, gt: np.ndarray | None, flagged: bool | None = None) -> None:
        """``published``: HxW (> 0 = flagged); ``gt``: HxW (> 0 = defect) or None for a good image;
        ``flagged``: the image's verdict (None: not counted in *flagged without a mask*)."""
        pub = (np.asarray(published) > 0).astype(np.uint8)
        if pub.ndim != 2:
            raise ValueError(f"published mask must be 2-D, got {pub.shape}")
        if flagged:
            self.flagged += 1
            self.flagged_empty += int(not pub.any())
        h, w = _target(pub.shape, self.size)
        if pub.shape != (h, w):
            pub = cv2.resize(pub, (w, h), interpolation=cv2.INTER_NEAREST)
        truth = np.zeros((h, w), np.uint8) if gt is None else (np.asarray(gt) > 0).astype(np.uint8)
        if truth.shape != (h, w):
            truth = cv2.resize(truth, (w, h), interpolation=cv2.INTER_NEAREST)
        p, t = pub.astype(bool), truth.astype(bool)
        self.tp += int(np.count_nonzero(p & t))
        self.fp += int(np.count_nonzero(p & ~t))
        self.fn += int(np.count_nonzero(~p & t))
        if not t.any():
            self.good_images += 1
            self.false_regions_good += cv2.connectedComponents(pub, connectivity=8)[0] - 1
            return
        n, lab = cv2.connectedComponents(truth, connectivity=8)
        if n > 1:
            area = np.bincount(lab.ravel(), minlength=n)
            hit = np.bincount(lab[p], minlength=n)
            self.gt_regions += n - 1
            self.found_regions += int(np.count_nonzero(hit[1:] >= REGION_HIT_FRACTION * area[1:]))

    def result(self) -> OperatingPoint:
        nan = float("nan")
        tp, fp, fn = self.tp, self.fp, self.fn
        precision = tp / (tp + fp) if tp + fp else nan
        recall = tp / (tp + fn) if tp + fn else nan
        f1 = 2 * tp / (2 * tp + fp + fn) if tp + fn else nan
        iou = tp / (tp + fp + fn) if tp + fn else nan
        return OperatingPoint(
            precision=precision, recall=recall, f1=f1, iou=iou,
            regions_found=self.found_regions / self.gt_regions if self.gt_regions else nan,
            false_regions_per_good=self.false_regions_good / self.good_images if self.good_images else nan,
            gt_regions=self.gt_regions, good_images=self.good_images,
            flagged_without_mask=self.flagged_empty / self.flagged if self.flagged else nan)
