"""A frame's image score: the rule that turns its anomaly map into the one number the verdict compares.

A defect is a region, not a pixel, and regions come in two kinds: a compact mark (a crack, a spot, a cut) and
a wide patch of changed surface (rust, a stain, a worn area) whose every patch is only mildly unusual. The map
smoothed to ``memory.image_sigma`` (24 px at 1024) finds the first kind; smoothing to ``memory.area_sigma``
(64 px) finds the second, which a narrow smoothing reads as a handful of unremarkable peaks.

The score is the largest of the readings (these two, and the wide one below), each divided by its
*reference*: the 90th percentile of the same reading over the normal frames the memory was calibrated with
(leave-one-out). In those units a normal frame sits near 1.0 on every reading whatever the product, so no
reading swamps another, and
the image threshold (:func:`workers.memory.calibration.image_threshold`) is fitted to the combined score of
the same normal frames: the false-alarm budget is spent once, on the combination, not once per reading.

Measured with ``python -m workers.bench.image_scores --dump`` (train/good memory, 60 test images per set,
false-alarm rate 0.01) against the 24 px maximum alone, defects / good images flagged:
hazelnut_toy 88.9 / 0 -> 88.9 / 0, commutator 66.7 / 3.3 -> 63.3 / 3.3, metal_plate 36.7 / 0 -> 70.0 / 0
(the metal plate's defects are wide, shallow patches).

A third reading covers a change over a large share of the frame that is compact nowhere, or too large and
shallow even for 64 px (the whole plate rusted, a discoloured part): the map's ``memory.wide_quantile``
(0.9: the level a tenth of the frame reaches), over its own normal reference like the others. When it alone
makes the frame defective, :meth:`ImageScoreRule.wide_level` gives the level whose pixels made the verdict, and
the detector publishes them when they form a coherent area (:func:`workers.pipeline.wide_region`); the seed
level of the prompted regions reads the smoothed maxima only. Measured with ``python -m
workers.bench.image_scores --dump`` (percentiles 90-99.9 added to the candidates) and then ``lineinspect eval``
(``docs/method.md``, 3c): defects / good images flagged hazelnut_toy 88.9 / 0 -> 100 / 0, commutator 63.3 / 3.3
-> 60.0 / 3.3, metal_plate 70.0 / 0 -> 96.7 / 0. Of the percentiles, 95 and above flagged 13-17 % of
commutator's good images (its texture lifts them); 90 did not.

A label-free memory (no good folder: ``predict`` without ``--normal``, ``eval --mutual``, a worker's warm-up)
keeps the single 24 px reading. Its normal frames are unlabeled and may be mostly defective: a wide shallow
defect does not stand out as a suspect region (:mod:`workers.memory.label_free`), so it would stay in the
wide readings' references and lift them. Measured label-free with both readings (``lineinspect eval
../shared/data --modes mutual --cps-stages 0,3 --max-images 60 --pixel-size 512``): metal_plate stayed at
20 % of defects flagged, and hazelnut_toy flagged one of its six good images; mean good flagged went 4.4 ->
10.0 %.

Contrast readings (``memory.score_contrast``, on by default): each reading above the frame's own level (the
smoothed maxima above the map's median, the wide quantile above its 25th percentile,
:func:`contrast_bases`), so that a level shift of the whole map moves none. They rank a textured product whose
items differ in overall texture better (commutator image AUROC 91.4 -> 95.4); on the earlier default layers
they lost hazelnut_toy's colour spots against the nut's bright body, with the stage-1 tap they do not;
figures in docs/method.md.

A fourth reading covers long thin defects (``memory.region_quantile``, 0.998; 0 = off): a scratch or a chipped
edge a few pixels wide is clear on the map, but smoothing to 24 or 64 px spreads it below a good part's hot
spot. The region reading takes the map's connected regions above a raw level (the ``region_quantile`` of the
calibration frames' pixels, :func:`region_reading`) and reads the largest region's excess over that level,
summed over its area (square root, areas in pixels of a 1024 px frame): a region's evidence whatever its shape.
Its reference is the normal frames' 95th percentile (:data:`REGION_REFERENCE_QUANTILE`: most read 0 or little),
at least :func:`region_floor`. When it alone makes the verdict, the mapper's seed level is at most that region's
peak (:meth:`ImageScoreRule.region_seed`), so the region is prompted and published. Memories from good frames only
(label-free ones keep one reading). Measured in docs/method.md ("Fourth reading").

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
# the region reading's reference: most normal frames read 0 or little on it and a few read much, so its 90th
# percentile sits in that bulk and its tail lifts the combined score's fitted threshold, and with it the seed
# level of every region (hazelnut_toy 1.319 -> 1.459; at the 95th 1.322: docs/method.md, "Fourth reading"), so
# the 95th percentile of its normal readings is its unit ...
REGION_REFERENCE_QUANTILE = 0.95
# ... at least that of one 16 px cell (at 1024) this share over its level: normal frames whose maps rarely
# cross the level must not make any crossing a defect
REGION_FLOOR_CELL_PX = 16.0
REGION_FLOOR_EXCESS = 0.025
CONTRAST_BASE = 0.5  # contrast readings: the smoothed maxima above this quantile of the frame's map ...
CONTRAST_WIDE_BASE = 0.25  # ... and the wide quantile above this one
LEGACY_IMAGE_SIGMA = 16.0  # the image sigma of memories whose header records neither rule nor sigma


def _reduced(raw: np.ndarray, embedding: ImageEmbedding, exclude: np.ndarray | None) -> tuple[np.ndarray, float]:
    """The raw map with ``exclude`` set to its median, reduced to at most 256 px on its longer side, and that
    reduction factor (the readings are wide anyway)."""
    oh, ow = embedding.original_size
    m = raw
    if exclude is not None and exclude.any():
        m = raw.copy()
        m[exclude] = float(np.median(raw))
    f = min(1.0, 256.0 / max(oh, ow))
    if f < 1.0:
        m = cv2.resize(m, (max(1, round(ow * f)), max(1, round(oh * f))), interpolation=cv2.INTER_AREA)
    return m, f


def smoothed_maxima(raw: np.ndarray, embedding: ImageEmbedding, sigmas: Sequence[float], smoothing_sigma: float,
                    exclude: np.ndarray | None = None) -> tuple[float, ...]:
    """Per sigma (pixels of a 1024 px frame, >= the map's own ``smoothing_sigma``): the maximum of the raw map
    smoothed further to that sigma. ``exclude``: pixels left out (set to the map's median) first. The map is
    reduced to at most 256 px on its longer side once (the blurs are wide anyway)."""
    return map_readings(raw, embedding, sigmas, 0.0, smoothing_sigma, exclude)


def contrast_bases(raw: np.ndarray, embedding: ImageEmbedding) -> tuple[float, float]:
    """The levels contrast readings are taken above: the map's :data:`CONTRAST_BASE` and
    :data:`CONTRAST_WIDE_BASE` quantiles, read off the same reduced map as the readings."""
    m, _ = _reduced(raw, embedding, None)
    return _bases(m)


def _bases(m: np.ndarray) -> tuple[float, float]:
    b, w = np.quantile(m, (CONTRAST_BASE, CONTRAST_WIDE_BASE))
    return float(b), float(w)


def map_readings(raw: np.ndarray, embedding: ImageEmbedding, sigmas: Sequence[float], quantile: float,
                 smoothing_sigma: float, exclude: np.ndarray | None = None, contrast: bool = False,
                 region_level: float = 0.0) -> tuple[float, ...]:
    """The image score's readings of a raw map: the smoothed maxima at ``sigmas`` (:func:`smoothed_maxima`),
    when ``quantile`` > 0 the map's ``quantile`` (the level that ``1 - quantile`` of the frame reaches), and when
    ``region_level`` > 0 the region reading above that raw level (:func:`region_reading`), all read off the same
    reduced map. ``contrast``: the first two kinds taken above the frame's own level (:func:`contrast_bases`;
    never below 0); the region reading stays above its absolute level."""
    return _readings_and_bases(raw, embedding, sigmas, quantile, smoothing_sigma, exclude, contrast, region_level)[0]


def _readings_and_bases(raw: np.ndarray, embedding: ImageEmbedding, sigmas: Sequence[float], quantile: float,
                        smoothing_sigma: float, exclude: np.ndarray | None, contrast: bool, region_level: float = 0.0
                        ) -> tuple[tuple[float, ...], tuple[float, float]]:
    """:func:`map_readings` and the levels they were taken above ((0, 0) unless ``contrast``), from one
    reduction of the map."""
    m, f = _reduced(raw, embedding, exclude)
    base, wide_base = _bases(m) if contrast else (0.0, 0.0)
    (ih, _), (oh, _) = embedding.input_size, embedding.original_size
    out = []
    for sigma in sigmas:
        extra = math.sqrt(max(sigma ** 2 - smoothing_sigma ** 2, 0.0)) * oh / ih * f
        s = cv2.GaussianBlur(m, (0, 0), sigmaX=extra, sigmaY=extra, borderType=cv2.BORDER_REFLECT) if extra > 0 else m
        out.append(max(float(s.max()) - base, 0.0))
    if quantile > 0:
        out.append(max(float(np.quantile(m, quantile)) - wide_base, 0.0))
    if region_level > 0:
        out.append(region_reading(m, f * oh / ih, region_level))
    return tuple(out), (base, wide_base)


def region_floor(level: float) -> float:
    """The least reference of the region reading above raw ``level`` (see :data:`REGION_FLOOR_EXCESS`)."""
    return math.sqrt(REGION_FLOOR_CELL_PX ** 2 * REGION_FLOOR_EXCESS * level)


def region_reference(values: Sequence[float], level: float) -> float:
    """The region reading's reference from normal frames' ``values`` above raw ``level``: their
    :data:`REGION_REFERENCE_QUANTILE`, at least :func:`region_floor`."""
    return max(float(np.quantile(np.asarray(values, np.float64), REGION_REFERENCE_QUANTILE)), region_floor(level))


def _readings_count(sigmas: Sequence[float], quantile: float, region_level: float = 0.0) -> int:
    return len(sigmas) + (1 if quantile > 0 else 0) + (1 if region_level > 0 else 0)


def _largest_region(m: np.ndarray, level: float) -> tuple[float, float]:
    """Over the 8-connected regions of ``m`` above ``level``: the largest excess summed over a region (in
    ``m``'s pixels x map units) and that region's peak. (0, 0) when nothing is above ``level``."""
    over = m > level
    if not over.any():
        return 0.0, 0.0
    n, labels = cv2.connectedComponents(over.astype(np.uint8), connectivity=8)
    sums = np.bincount(labels.ravel(), weights=np.where(over, m - level, 0.0).ravel(), minlength=n)[1:]
    best = int(np.argmax(sums))
    return float(sums[best]), float(m[labels == best + 1].max())


def region_reading(m: np.ndarray, px_per_1024: float, level: float) -> float:
    """The region reading of a (reduced) map: the square root of the largest excess over ``level`` summed over
    one connected region, with areas in pixels of a 1024 px frame (``px_per_1024``: the map's pixels per such
    pixel). A region's evidence whatever its shape: a long thin scratch counts like a blob of the same area."""
    excess, _ = _largest_region(m, level)
    return math.sqrt(excess) / px_per_1024


@dataclass(frozen=True)
class ImageScoreRule:
    """Readings (smoothed maxima at ``sigmas``, then the map's ``quantile`` when > 0) and their references, one
    per reading in that order; score = max(reading / reference)."""

    sigmas: tuple[float, ...]
    refs: tuple[float, ...]
    quantile: float = 0.0  # the wide reading: the map's quantile (0 = not taken)
    contrast: bool = False  # readings above the frame's own levels (contrast_bases)
    region_level: float = 0.0  # the region reading's raw level (0 = not taken; region_reading)

    def __post_init__(self) -> None:
        n = _readings_count(self.sigmas, self.quantile, self.region_level)
        if not self.sigmas or len(self.refs) != n:
            raise ValueError(f"image score rule: {n} readings, {len(self.refs)} references")
        if not 0.0 <= self.quantile < 1.0:
            raise ValueError(f"image score rule: quantile {self.quantile}: allowed 0 (none) or 0 < q < 1")
        if not (self.region_level >= 0 and math.isfinite(self.region_level)):
            raise ValueError(f"image score rule: region level {self.region_level}: allowed 0 (none) or > 0")
        if not all(r > 0 and math.isfinite(r) for r in self.refs):
            raise ValueError(f"image score rule: references must be positive, got {self.refs}")

    @staticmethod
    def sigmas_for(image_sigma: float, area_sigma: float) -> tuple[float, ...]:
        """The smoothed maxima a new memory takes: ``image_sigma``, and ``area_sigma`` when > 0 (off: 0)."""
        return (float(image_sigma), float(area_sigma)) if area_sigma > 0 else (float(image_sigma),)

    @classmethod
    def fit(cls, sigmas: Sequence[float], readings: Sequence[Sequence[float]], quantile: float = 0.0,
            contrast: bool = False, region_level: float = 0.0) -> ImageScoreRule:
        """The rule whose references are the :data:`REFERENCE_QUANTILE` of normal frames' ``readings`` (one row
        per frame, as :func:`map_readings` gives them); the region reading's is their
        :func:`region_reference`. A single reading keeps reference 1 (the plain maximum, in raw units)."""
        sigmas = tuple(float(s) for s in sigmas)
        n = _readings_count(sigmas, quantile, region_level)
        if n == 1:
            return cls(sigmas, (1.0,), contrast=contrast)
        r = np.asarray(readings, np.float64).reshape(-1, n)
        if not len(r):
            raise ValueError("image score rule: no normal frames to fit the references to")
        refs = np.maximum(np.quantile(r, REFERENCE_QUANTILE, axis=0), 1e-6)
        if region_level > 0:
            refs[-1] = region_reference(r[:, -1], region_level)
        return cls(sigmas, tuple(float(v) for v in refs), float(quantile), contrast, float(region_level))

    @classmethod
    def from_calibration(cls, calibration: Mapping[str, Any]) -> ImageScoreRule:
        """The rule a memory header's ``calibration`` records (see the module doc for older headers)."""
        rule = calibration.get("image_score")
        if rule:
            return cls(tuple(float(s) for s in rule["sigmas"]), tuple(float(r) for r in rule["refs"]),
                       float(rule.get("quantile", 0.0)), bool(rule.get("contrast", False)),
                       float(rule.get("region_level", 0.0)))
        return cls((float(calibration.get("image_sigma", LEGACY_IMAGE_SIGMA)),), (1.0,))

    def readings(self, raw: np.ndarray, embedding: ImageEmbedding, smoothing_sigma: float,
                 exclude: np.ndarray | None = None) -> tuple[float, ...]:
        return map_readings(raw, embedding, self.sigmas, self.quantile, smoothing_sigma, exclude, self.contrast,
                            self.region_level)

    def readings_and_bases(self, raw: np.ndarray, embedding: ImageEmbedding, smoothing_sigma: float
                           ) -> tuple[tuple[float, ...], tuple[float, float]]:
        """:meth:`readings` of the whole frame and :meth:`bases`, from one reduction of the map (the mapper's
        per-frame path)."""
        return _readings_and_bases(raw, embedding, self.sigmas, self.quantile, smoothing_sigma, None, self.contrast,
                                   self.region_level)

    def bases(self, raw: np.ndarray, embedding: ImageEmbedding) -> tuple[float, float]:
        """The frame's levels the readings are taken above (:func:`contrast_bases`); (0, 0) for absolute ones."""
        return contrast_bases(raw, embedding) if self.contrast else (0.0, 0.0)

    def combine(self, readings: Sequence[float]) -> float:
        return max(float(v) / r for v, r in zip(readings, self.refs, strict=True))

    def score(self, raw: np.ndarray, embedding: ImageEmbedding, smoothing_sigma: float,
              exclude: np.ndarray | None = None) -> float:
        return self.combine(self.readings(raw, embedding, smoothing_sigma, exclude))

    def raw_level(self, threshold: float, base: float = 0.0) -> float:
        """The lowest raw map level at which one region can make a frame's score reach ``threshold`` through a
        smoothed maximum: a smoothed maximum never exceeds the map's own, so a region under ``base + threshold x
        reference`` of every such reading cannot (the seed level of :mod:`workers.ppg`). ``base``: the frame's
        first level from :meth:`bases` (contrast readings)."""
        return float(base) + float(threshold) * min(self.refs[: len(self.sigmas)])

    def wide_level(self, readings: Sequence[float], threshold: float, wide_base: float = 0.0) -> float:
        """The raw level of the wide region when the wide reading makes the score exceed ``threshold``: the level
        that more than ``1 - quantile`` of the frame reaches then, i.e. the pixels that make the verdict by
        that reading. 0.0 otherwise (or without a wide reading). ``wide_base``: the frame's second level from
        :meth:`bases` (contrast readings)."""
        if self.quantile <= 0:
            return 0.0
        k = len(self.sigmas)
        over = float(readings[k]) / self.refs[k] > threshold
        return float(wide_base) + float(threshold) * self.refs[k] if over else 0.0

    def wide_alone(self, readings: Sequence[float], threshold: float) -> bool:
        """True when the wide reading makes the score exceed ``threshold`` and no smoothed maximum does (the
        region reading may: its region is seeded, :meth:`region_seed`, and the wide pixels are published too)."""
        return self.wide_level(readings, threshold) > 0 and not self._smoothed_max_over(readings, threshold)

    def region_seed(self, raw: np.ndarray, embedding: ImageEmbedding, readings: Sequence[float],
                    threshold: float) -> float:
        """The raw peak of the region the region reading read when that reading makes the score exceed
        ``threshold`` and no smoothed maximum does: a seed level low enough for that region to be prompted and
        published (a long thin region may peak under :meth:`raw_level`). 0.0 otherwise (or without the
        reading): where a smoothed maximum makes the verdict, :meth:`raw_level` already seeds its region, and a
        lower seed would prompt the frame's lesser regions too."""
        if (self.region_level <= 0 or float(readings[-1]) / self.refs[-1] <= threshold
                or self._smoothed_max_over(readings, threshold)):
            return 0.0
        m, _ = _reduced(raw, embedding, None)
        return _largest_region(m, self.region_level)[1]

    def _smoothed_max_over(self, readings: Sequence[float], threshold: float) -> bool:
        """Whether one of the smoothed maxima (the first readings) makes the score exceed ``threshold``."""
        k = len(self.sigmas)
        return any(float(v) / r > threshold for v, r in zip(readings[:k], self.refs[:k], strict=True))

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"sigmas": list(self.sigmas), "refs": [round(r, 6) for r in self.refs]}
        if self.quantile > 0:
            out["quantile"] = self.quantile
        if self.contrast:
            out["contrast"] = True
        if self.region_level > 0:
            out["region_level"] = round(self.region_level, 6)
        return out

    def describe(self) -> str:
        above = " above the frame's median" if self.contrast else ""
        if len(self.refs) == 1:
            return f"max of the map smoothed to {self.sigmas[0]:g} px{above}"
        parts = [f"{s:g} px / {r:.4g}" for s, r in zip(self.sigmas, self.refs[: len(self.sigmas)], strict=True)]
        if self.quantile > 0:
            wide_above = f" above p{100 * CONTRAST_WIDE_BASE:g}" if self.contrast else ""
            parts.append(f"map p{100 * self.quantile:g}{wide_above} / {self.refs[len(self.sigmas)]:.4g}")
        if self.region_level > 0:
            parts.append(f"largest region's excess over {self.region_level:.4g} / {self.refs[-1]:.4g} (its normal "
                         f"p{100 * REGION_REFERENCE_QUANTILE:g} or the floor)")
        return (f"max over readings (each / its normal p{100 * REFERENCE_QUANTILE:g}): smoothed max{above} at "
                f"{', '.join(parts)}")
