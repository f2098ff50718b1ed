"""A frame's image score: the rule that turns its anomaly map into the one number the verdict compares.

A defect is a region, not a pixel, and regions come in two kinds: a compact mark (a crack, a spot, a cut) and
a wide patch of changed surface (rust, a stain, a worn area) whose every patch is only mildly unusual. The map
smoothed to ``memory.image_sigma`` (24 px at 1024) finds the first kind; smoothing to ``memory.area_sigma``
(64 px) finds the second, which a narrow smoothing reads as a handful of unremarkable peaks.

The score is the larger of the two smoothed maxima, each divided by its *reference*: the 90th percentile of
the same reading over the normal frames the memory was calibrated with (leave-one-out). In those units a
normal frame sits near 1.0 on both readings whatever the product, so neither reading swamps the other, and
the image threshold (:func:`workers.memory.calibration.image_threshold`) is fitted to the combined score of
the same normal frames: the false-alarm budget is spent once, on the combination, not once per reading.

Measured with ``python -m workers.bench.image_scores --dump`` (train/good memory, 60 test images per set,
false-alarm rate 0.01) against the 24 px maximum alone, defects / good images flagged:
hazelnut_toy 88.9 / 0 -> 88.9 / 0, commutator 66.7 / 3.3 -> 63.3 / 3.3, metal_plate 36.7 / 0 -> 70.0 / 0
(the metal plate's defects are wide, shallow patches).

A label-free memory (no good folder: ``predict`` without ``--normal``, ``eval --mutual``, a worker's warm-up)
keeps the single 24 px reading. Its normal frames are unlabeled and may be mostly defective: a wide shallow
defect does not stand out as a suspect region (:mod:`workers.memory.label_free`), so it would stay in the
area reading's reference and lift it. Measured label-free with both readings (``lineinspect eval
../shared/data --modes mutual --cps-stages 0,3 --max-images 60 --pixel-size 512``): metal_plate stayed at
20 % of defects flagged, and hazelnut_toy flagged one of its six good images; mean good flagged went 4.4 ->
10.0 %.

The rule is stored in the memory header (``calibration.image_score``); a worker scores with the stored rule
until the memory is rebuilt, so a changed setting never mis-scores a stored threshold. A header without it
(built before) holds a single reading at ``calibration.image_sigma`` with reference 1: the plain maximum.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from workers.interfaces import ImageEmbedding

REFERENCE_QUANTILE = 0.9  # of the normal frames' readings: each reading's unit
LEGACY_IMAGE_SIGMA = 16.0  # the image sigma of memories whose header records neither rule nor sigma


def smoothed_maxima(raw: np.ndarray, embedding: ImageEmbedding, sigmas: Sequence[float], smoothing_sigma: float,
                    exclude: np.ndarray | None = None) -> tuple[float, ...]:
    """Per sigma (pixels of a 1024 px frame, >= the map's own ``smoothing_sigma``): the maximum of the raw map
    smoothed further to that sigma. ``exclude``: pixels left out (set to the map's median) first. The map is
    reduced to at most 256 px on its longer side once (the blurs are wide anyway)."""
    (ih, _), (oh, ow) = embedding.input_size, embedding.original_size
    m = raw
    if exclude is not None and exclude.any():
        m = raw.copy()
        m[exclude] = float(np.median(raw))
    f = min(1.0, 256.0 / max(oh, ow))
    if f < 1.0:
        m = cv2.resize(m, (max(1, round(ow * f)), max(1, round(oh * f))), interpolation=cv2.INTER_AREA)
    out = []
    for sigma in sigmas:
        extra = math.sqrt(max(sigma ** 2 - smoothing_sigma ** 2, 0.0)) * oh / ih * f
        s = cv2.GaussianBlur(m, (0, 0), sigmaX=extra, sigmaY=extra, borderType=cv2.BORDER_REFLECT) if extra > 0 else m
        out.append(float(s.max()))
    return tuple(out)


@dataclass(frozen=True)
class ImageScoreRule:
    """Readings (smoothed maxima at ``sigmas``) and their references; score = max(reading / reference)."""

    sigmas: tuple[float, ...]
    refs: tuple[float, ...]

    def __post_init__(self) -> None:
        if not self.sigmas or len(self.sigmas) != len(self.refs):
            raise ValueError(f"image score rule: {len(self.sigmas)} sigmas, {len(self.refs)} references")
        if not all(r > 0 and math.isfinite(r) for r in self.refs):
            raise ValueError(f"image score rule: references must be positive, got {self.refs}")

    @staticmethod
    def sigmas_for(image_sigma: float, area_sigma: float) -> tuple[float, ...]:
        """The readings a new memory takes: ``image_sigma``, and ``area_sigma`` when > 0 (off: 0)."""
        return (float(image_sigma), float(area_sigma)) if area_sigma > 0 else (float(image_sigma),)

    @classmethod
    def fit(cls, sigmas: Sequence[float], readings: Sequence[Sequence[float]]) -> ImageScoreRule:
        """The rule whose references are the :data:`REFERENCE_QUANTILE` of normal frames' ``readings`` (one row
        per frame). A single reading keeps reference 1 (the plain maximum, in raw units)."""
        sigmas = tuple(float(s) for s in sigmas)
        if len(sigmas) == 1:
            return cls(sigmas, (1.0,))
        r = np.asarray(readings, np.float64).reshape(-1, len(sigmas))
        if not len(r):
            raise ValueError("image score rule: no normal frames to fit the references to")
        refs = np.quantile(r, REFERENCE_QUANTILE, axis=0)
        return cls(sigmas, tuple(float(max(v, 1e-6)) for v in refs))

    @classmethod
    def from_calibration(cls, calibration: Mapping[str, Any]) -> ImageScoreRule:
        """The rule a memory header's ``calibration`` records (see the module doc for older headers)."""
        rule = calibration.get("image_score")
        if rule:
            return cls(tuple(float(s) for s in rule["sigmas"]), tuple(float(r) for r in rule["refs"]))
        return cls((float(calibration.get("image_sigma", LEGACY_IMAGE_SIGMA)),), (1.0,))

    def readings(self, raw: np.ndarray, embedding: ImageEmbedding, smoothing_sigma: float,
                 exclude: np.ndarray | None = None) -> tuple[float, ...]:
        return smoothed_maxima(raw, embedding, self.sigmas, smoothing_sigma, exclude)

    def combine(self, readings: Sequence[float]) -> float:
        return max(float(v) / r for v, r in zip(readings, self.refs, strict=True))

    def score(self, raw: np.ndarray, embedding: ImageEmbedding, smoothing_sigma: float,
              exclude: np.ndarray | None = None) -> float:
        return self.combine(self.readings(raw, embedding, smoothing_sigma, exclude))

    def raw_level(self, threshold: float) -> float:
        """The lowest raw map level at which one region can make a frame's score reach ``threshold``: a
        smoothed maximum never exceeds the map's own, so a region under ``threshold x reference`` of every
        reading cannot (the seed level of :mod:`workers.ppg`)."""
        return float(threshold) * min(self.refs)

    def as_dict(self) -> dict[str, list[float]]:
        return {"sigmas": list(self.sigmas), "refs": [round(r, 6) for r in self.refs]}

    def describe(self) -> str:
        if len(self.sigmas) == 1:
            return f"max of the map smoothed to {self.sigmas[0]:g} px"
        parts = ", ".join(f"{s:g} px / {r:.4g}" for s, r in zip(self.sigmas, self.refs, strict=True))
        return f"max over readings (smoothed max / normal p{100 * REFERENCE_QUANTILE:g}): {parts}"
