"""Thresholds from normal frames: the image threshold from a false-alarm budget, and the pixel threshold.

Calibration: thresholds from leave-one-out raw maps of normal frames (each frame scored against the memory
without its own rows, :func:`leave_one_out_maps`; label-free: :mod:`workers.memory.label_free`). Image score:
the larger of the map's smoothed maxima in units of the normal frames' (:mod:`workers.memory.image_score`). Pixel
threshold: the ``1 - (1 - q) / 10`` quantile of their pixels (``memory.calibration_quantile`` q; plenty of
samples). ``settings.detector.image_threshold`` / ``pixel_threshold`` > 0 override them (raw units, as shown by
``lineinspect memory show LINE``).

Image threshold (:func:`image_threshold`): the ``1 - detector.false_alarm_rate`` quantile of a GEV tail fitted
to the normal frames' image scores and, in a worker, to the line's most recent OK frames.

A frame's image score is the maximum of its (smoothed) anomaly map, and maxima follow an extreme-value law.
The normal frames' scores (leave-one-out maps of the memory's own frames, then held-out normal frames from
the stream: the line's most recent ``memory.held_out_frames`` OK verdicts, kept in Redis beside the memory)
are fitted with a generalised extreme value (GEV) law by L-moments, which are efficient with 10-60 frames and
far less swayed by one odd frame than the standard deviation. The shape ``k`` is read from the L-skewness and
bounded to [-0.2, 0.5]: ``k`` = 0 is the Gumbel law of maxima of many independent values; the leave-one-out
scores measured on the shared sets are lighter-tailed than Gumbel (``k`` > 0: a distance to a memory of the same
product cannot grow without bound), and a Gumbel tail there put the threshold far above every good part
(hazelnut_toy: 0.81 against good parts at most 0.57 and defects from 0.70). The threshold is the model's
``1 - false_alarm_rate`` quantile, kept at or above the median and, while there are fewer than
``1 / rate`` frames, at or above the largest normal score seen (a tail fitted to a few dozen frames must not
flag a frame the line knows is good); with fewer than 8 frames no tail is fitted and the threshold is the
largest normal score. The expected false-alarm rate of a threshold is the model's exceedance
probability, shown by ``lineinspect memory show``.

The held-out scores are truncated at the threshold (a frame over it is a defect verdict and is not added); the
L-moment fit reads the bulk of the distribution, so cutting off the top ``rate`` share moves it little. A
recent window (not a sample of all time) lets the threshold follow a slow change of the line.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from workers.interfaces import ImageEmbedding
from workers.memory.coreset import BuiltMemory
from workers.memory.features import raw_to_image, valid_grid
from workers.memory.image_score import ImageScoreRule, map_readings
from workers.memory.params import MemoryParams
from workers.memory.search import knn_distance
from workers.memory.search import torch_module as _torch

EULER_GAMMA = 0.5772156649
MIN_FIT_FRAMES = 8  # fewer normal frames: the threshold is the largest of their scores, no tail is fitted


def l_moments(values: Sequence[float]) -> tuple[float, float, float]:
    """Sample L-moments l1, l2 and the L-skewness t3 (unbiased probability-weighted moments)."""
    x = np.sort(np.asarray(values, np.float64))
    n = len(x)
    if n < 3:
        raise ValueError("L-moments need at least three values")
    i = np.arange(n)
    b0 = float(x.mean())
    b1 = float(np.sum(i * x) / (n * (n - 1)))
    b2 = float(np.sum(i * (i - 1) * x) / (n * (n - 1) * (n - 2)))
    l2 = 2 * b1 - b0
    l3 = 6 * b2 - 6 * b1 + b0
    return b0, l2, (l3 / l2 if l2 > 0 else 0.0)


@dataclass(frozen=True)
class Gev:
    """Generalised extreme value law (Hosking's parametrisation: ``k`` = 0 is Gumbel, ``k`` > 0 has a bounded
    upper tail, ``k`` < 0 a heavy one), fitted by L-moments (Hosking, Wallis & Wood 1985)."""

    xi: float
    alpha: float
    k: float

    K_RANGE = (-0.2, 0.5)  # with 10-60 frames the shape is uncertain: no heavier or lighter tails than this

    @classmethod
    def fit(cls, values: Sequence[float]) -> Gev:
        l1, l2, t3 = l_moments(values)
        if l2 <= 0:
            return cls(l1, 0.0, 0.0)
        c = 2.0 / (3.0 + t3) - math.log(2.0) / math.log(3.0)
        k = float(np.clip(7.8590 * c + 2.9554 * c * c, *cls.K_RANGE))
        if abs(k) < 1e-6:
            alpha = l2 / math.log(2.0)
            return cls(l1 - EULER_GAMMA * alpha, alpha, 0.0)
        g = math.gamma(1.0 + k)
        alpha = l2 * k / ((1.0 - 2.0 ** (-k)) * g)
        return cls(l1 - alpha * (1.0 - g) / k, alpha, k)

    def quantile(self, p: float) -> float:
        y = -math.log(p)
        if self.k == 0.0:
            return self.xi - self.alpha * math.log(y)
        return self.xi + self.alpha * (1.0 - y ** self.k) / self.k

    def exceedance(self, x: float) -> float:
        """P(score > x) under the model."""
        if self.alpha <= 0:
            return 0.0 if x >= self.xi else 1.0
        z = (x - self.xi) / self.alpha
        if self.k == 0.0:
            return float(1.0 - math.exp(-math.exp(-z)))
        inner = 1.0 - self.k * z
        if inner <= 0:
            return 0.0 if self.k > 0 else 1.0
        return float(1.0 - math.exp(-(inner ** (1.0 / self.k))))


@dataclass(frozen=True)
class ImageThreshold:
    value: float
    rule: str
    frames: int
    expected_false_alarm_rate: float


def image_threshold(maxima: Sequence[float], false_alarm_rate: float) -> ImageThreshold:
    """The image threshold for ``false_alarm_rate`` from normal frames' scores (see the module doc). Scores
    beyond Tukey's far-out fence (Q3 + 3 IQR) are left out of the fit and counted in the rule: an odd or
    mislabelled part in a good folder must not set the line's threshold."""
    m = np.asarray([v for v in maxima if np.isfinite(v)], np.float64)
    if len(m) == 0:
        raise ValueError("calibration needs at least one normal frame")
    if not 0.0 < false_alarm_rate < 1.0:
        raise ValueError(f"false_alarm_rate {false_alarm_rate}: allowed 0 < rate < 1")
    if len(m) < MIN_FIT_FRAMES:
        return ImageThreshold(float(m.max()), f"largest normal score (fewer than {MIN_FIT_FRAMES} frames)",
                              int(len(m)), float("nan"))
    q1, q3 = np.quantile(m, [0.25, 0.75])
    inliers = m[m <= q3 + 3.0 * (q3 - q1)]
    dropped = len(m) - len(inliers)
    g = Gev.fit(inliers)
    if g.alpha <= 0:
        value, rule = float(inliers.max()), "max (no spread)"
    else:
        value, rule = g.quantile(1.0 - false_alarm_rate), f"GEV tail (L-moments, k={g.k:.2f})"
        value = max(value, float(np.median(inliers)))
        if len(inliers) * false_alarm_rate < 1.0 and value < inliers.max():
            value, rule = float(inliers.max()), "largest normal score (too few frames for the tail)"
    if dropped:
        rule += f", {dropped} far-out frame{'s' if dropped > 1 else ''} left out"
    return ImageThreshold(float(value), rule, int(len(m)), round(g.exceedance(value), 6))


@dataclass(frozen=True)
class Calibration:
    image_threshold: float
    pixel_threshold: float
    frames: int
    method: str
    image_maxima: tuple[float, ...]  # the normal frames' image scores under ``score_rule``
    score_rule: ImageScoreRule


def pixel_grid(a: np.ndarray) -> np.ndarray:
    """Every n-th row and column of a map (or of a mask of it): a grid of about 256 x 256, the pixel sample
    the pixel levels are read from (good-folder and label-free calibration alike)."""
    return a[:: max(1, a.shape[0] // 256), :: max(1, a.shape[1] // 256)]


def normal_pixels(raw_maps: Sequence[np.ndarray]) -> np.ndarray:
    """A sample of normal frames' map pixels (:func:`pixel_grid` of each map) for the pixel levels."""
    return np.concatenate([pixel_grid(m).ravel() for m in raw_maps])


def region_level(raw_maps: Sequence[np.ndarray], quantile: float) -> float:
    """The raw level that ``quantile`` of normal frames' pixels stay under: the region reading's level."""
    return float(np.quantile(normal_pixels(raw_maps), quantile))


def calibrate(raw_maps: Sequence[np.ndarray], params: MemoryParams, method: str,
              readings: Sequence[Sequence[float]], pixels: np.ndarray | None = None,
              region_level: float = 0.0) -> Calibration:
    """Thresholds from normal frames that were not in the memory they were scored against: their image score
    readings (``readings``: per frame, :func:`map_readings` at ``params.score_sigmas``, ``wide_quantile`` and,
    when > 0, ``region_level``, as :func:`leave_one_out_maps` gives them; the rule's references are fitted to
    them, :class:`ImageScoreRule`) and raw maps (``pixels`` replaces the maps' pixels when given: label-free
    calibration)."""
    if len(readings) == 0:
        raise ValueError("calibration needs at least one normal frame")
    if pixels is None:
        pixels = normal_pixels(raw_maps)
    rule = ImageScoreRule.fit(params.score_sigmas, readings, params.wide_quantile, params.score_contrast,
                              region_level)
    maxima = [rule.combine(r) for r in readings]
    thr = image_threshold(maxima, params.false_alarm_rate)
    pixel_thr = float(np.quantile(pixels, params.pixel_quantile))
    return Calibration(max(thr.value, 1e-6), max(pixel_thr, 1e-6), len(maxima), f"{method}, {thr.rule}",
                       tuple(round(float(v), 5) for v in maxima), rule)


def _grid_scores(feats, mem, mem_sq, k: int, shape: tuple[int, int]) -> np.ndarray:
    return knn_distance(feats, mem, k, memory_sq=mem_sq).numpy().reshape(shape)


def leave_one_out_maps(frame_feats: Sequence[Any], embeddings: Sequence[ImageEmbedding], built: BuiltMemory,
                       params: MemoryParams) -> tuple[list[np.ndarray], list[tuple[float, ...]], float]:
    """Raw maps of (up to ``calibration_frames``) build frames, each against the memory without its rows, their
    image score readings (:func:`map_readings` at ``params.score_sigmas`` and ``params.wide_quantile``, and the
    region reading above the raw level that ``params.region_quantile`` of their pixels stay under), and that
    level (0.0 when ``region_quantile`` is 0)."""
    torch = _torch()
    mem = torch.from_numpy(built.feats.astype(np.float32))
    pick = np.arange(len(frame_feats))
    n = len(pick)
    if n > params.calibration_frames:
        pick = np.sort(np.random.default_rng(params.seed).choice(pick, params.calibration_frames, replace=False))
    maps, embs = [], []
    for i in pick:
        others = torch.from_numpy(built.owner != i)
        if not bool(others.any()):
            continue
        m = mem[others]
        grid = _grid_scores(frame_feats[i], m, None, params.k, valid_grid(embeddings[i]))
        maps.append(raw_to_image(grid, embeddings[i], params.smoothing_sigma))
        embs.append(embeddings[i])
    level = region_level(maps, params.region_quantile) if maps and params.region_quantile > 0 else 0.0
    scores = [map_readings(m, e, params.score_sigmas, params.wide_quantile, params.smoothing_sigma,
                           contrast=params.score_contrast, region_level=level) for m, e in zip(maps, embs, strict=True)]
    return maps, scores, level
