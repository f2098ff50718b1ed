"""CPS: cascaded prompts for SAM (cascade paper, section 3.2), for one region.

- pass 1: the PPG points                          -> (M1, logits1)
- pass 2: the points + logits1 as dense mask prompt -> (M2, logits2)
- pass 3: the points + box of M2 + logits2          -> M3

``stages`` (1..3) stops the cascade early (ablation). Only the decoder runs; the embedding is shared.

Agreement with the map: a pass's mask is accepted only when it is not empty and agrees with the anomaly map
that prompted it (:class:`MaskCheck`): its area is at most ``max_area_ratio`` times the region's, and at least
``min_support`` of its pixels lie where the normalised map is at least ``support_level``. SAM happily returns a
whole texture cell, the part, or the background for a point on a small defect; such a mask is rejected. A
rejected (or empty) pass keeps the previous accepted result and the next pass is prompted from it (pass 3 then
takes the box and logits of M1). If pass 1 is rejected, the region of the thresholded map stands in for it:
pass 2 (which would repeat pass 1 without logits) is skipped and pass 3 is prompted with the region's box.
Timings per pass are in seconds under "cps1", "cps2", "cps3".
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from workers.interfaces import ImageEmbedding, Prompts, SamBackend
from workers.ppg import RegionPrompts

PASS_KEYS = ("cps1", "cps2", "cps3")


@dataclass(frozen=True)
class MaskCheck:
    """When a decoder mask is accepted for a region (see the module docstring). ``None`` checks nothing."""

    max_area_ratio: float = 4.0  # mask area <= this x the region's area
    min_support: float = 0.5  # share of the mask's pixels where the map >= support_level
    support_level: float = 0.5  # on the normalised map (1.0 = the pixel threshold)

    def accepts(self, mask: np.ndarray, region_area: int, pixel_map: np.ndarray | None) -> bool:
        area = int(np.count_nonzero(mask))
        if area == 0:
            return False
        if area > self.max_area_ratio * max(1, region_area):
            return False
        if pixel_map is None or pixel_map.shape != mask.shape:
            return True
        supported = int(np.count_nonzero(pixel_map[mask] >= self.support_level))
        return supported >= self.min_support * area


@dataclass(frozen=True)
class CascadeResult:
    mask: np.ndarray  # bool [H, W] at the original image size
    logits: np.ndarray | None  # float32 [H, W] of the pass that produced ``mask`` (None: region fallback)
    iou: float  # the decoder's predicted IoU of that pass (0.0 for the region fallback)
    stage: int  # which pass produced ``mask`` (0 = the map region fallback)
    passes: int  # decoder calls made
    timings: dict[str, float] = field(default_factory=dict)


def mask_box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """x0, y0, x1, y1 (inclusive-exclusive) of a boolean mask; None when empty."""
    rows = np.flatnonzero(mask.any(axis=1))
    if len(rows) == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def _region_fallback(region: RegionPrompts, shape: tuple[int, int]) -> np.ndarray:
    mask = region.mask
    if mask.shape != shape:  # the map was at another resolution than the frame
        import cv2

        mask = cv2.resize(mask.astype(np.uint8), (shape[1], shape[0]), interpolation=cv2.INTER_NEAREST) > 0
    return mask


def cascade(backend: SamBackend, embedding: ImageEmbedding, region: RegionPrompts, stages: int = 3,
            pixel_map: np.ndarray | None = None, check: MaskCheck | None = None) -> CascadeResult:
    """Run ``stages`` (1..3) decoder passes for one region; see the module docstring. ``pixel_map``: the
    normalised anomaly map at the frame size that the masks must agree with (``check``)."""
    if stages not in (1, 2, 3):
        raise ValueError(f"stages must be 1, 2 or 3, got {stages}")
    region_area = int(np.count_nonzero(region.mask))

    def ok(m: np.ndarray) -> bool:
        return bool(m.any()) if check is None else check.accepts(m, region_area, pixel_map)

    timings = {k: 0.0 for k in PASS_KEYS[:stages]}
    points, labels = region.points, region.labels

    t0 = time.perf_counter()
    out = backend.decode(embedding, Prompts(points=points, labels=labels))
    timings["cps1"] = time.perf_counter() - t0
    passes = 1
    mask = out.mask_logits > 0
    if ok(mask):
        best_mask, best_logits, best_low, best_iou, stage = mask, out.mask_logits, out.low_res_logits, out.iou, 1
    else:
        best_mask, best_logits, best_low, best_iou, stage = (
            _region_fallback(region, embedding.original_size), None, None, 0.0, 0)

    if stages >= 2 and best_low is not None:
        t0 = time.perf_counter()
        out = backend.decode(embedding, Prompts(points=points, labels=labels, mask_logits=best_low))
        timings["cps2"] = time.perf_counter() - t0
        passes += 1
        mask = out.mask_logits > 0
        if ok(mask):
            best_mask, best_logits, best_low, best_iou, stage = mask, out.mask_logits, out.low_res_logits, out.iou, 2

    if stages >= 3:
        box = mask_box(best_mask)
        t0 = time.perf_counter()
        out = backend.decode(embedding, Prompts(points=points, labels=labels,
                                                box=None if box is None else tuple(float(v) for v in box),
                                                mask_logits=best_low))
        timings["cps3"] = time.perf_counter() - t0
        passes += 1
        mask = out.mask_logits > 0
        if ok(mask):
            best_mask, best_logits, best_low, best_iou, stage = mask, out.mask_logits, out.low_res_logits, out.iou, 3

    return CascadeResult(mask=best_mask, logits=best_logits, iou=float(best_iou), stage=stage, passes=passes,
                         timings=timings)
