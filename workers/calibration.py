"""Thresholds from normal frames: the image threshold from a false-alarm budget, the pixel threshold for masks.

Image threshold. A frame's image score is the maximum of its anomaly map, and maxima of many weakly dependent
values follow a Gumbel law. The normal frames' maxima (leave-one-out maps of the memory's own frames, then
held-out normal frames from the stream: :class:`ScoreReservoir`) are fitted with a Gumbel distribution by
L-moments (mean and half the Gini mean difference: efficient with 10-30 frames and far less swayed by one
odd frame than the standard deviation), and the threshold is its ``1 - false_alarm_rate`` quantile::

    beta = l2 / ln 2,  mu = l1 - 0.5772 * beta,  threshold = mu - beta * ln(-ln(1 - rate))

It is kept at or above the largest normal maximum seen when there are fewer than ``1 / rate`` frames (a
tail fitted to a handful of frames must not flag a frame the line knows is good) and at or above the
median. The expected false-alarm rate of a threshold is the model's exceedance probability, reported by
``lineinspect memory show``.

The held-out maxima are truncated at the threshold (a frame over it is a defect verdict and is not added); the
L-moment fit reads the bulk of the distribution, so cutting off the top ``rate`` share moves it little. A
recent window (not a sample of all time) lets the threshold follow a slow change of the line.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

EULER_GAMMA = 0.5772156649


@dataclass(frozen=True)
class Gumbel:
    mu: float
    beta: float

    @classmethod
    def fit(cls, values: Sequence[float]) -> Gumbel:
        """L-moment fit; needs at least two distinct values (else beta = 0)."""
        x = np.sort(np.asarray(values, np.float64))
        n = len(x)
        if n == 0:
            raise ValueError("no values to fit")
        l1 = float(x.mean())
        if n < 2:
            return cls(l1, 0.0)
        b1 = float(np.sum(np.arange(n) * x) / (n * (n - 1)))
        l2 = 2.0 * b1 - l1
        beta = max(l2, 0.0) / math.log(2.0)
        return cls(l1 - EULER_GAMMA * beta, beta)

    def quantile(self, p: float) -> float:
        return self.mu - self.beta * math.log(-math.log(p))

    def exceedance(self, x: float) -> float:
        """P(max > x) under the model."""
        if self.beta <= 0:
            return 0.0 if x >= self.mu else 1.0
        return float(1.0 - math.exp(-math.exp(-(x - self.mu) / self.beta)))


@dataclass(frozen=True)
class ImageThreshold:
    value: float
    rule: str
    frames: int
    expected_false_alarm_rate: float


def image_threshold(maxima: Sequence[float], false_alarm_rate: float) -> ImageThreshold:
    """The image threshold for ``false_alarm_rate`` from normal frames' map maxima (see the module doc)."""
    m = np.asarray([v for v in maxima if np.isfinite(v)], np.float64)
    if len(m) == 0:
        raise ValueError("calibration needs at least one normal frame")
    if not 0.0 < false_alarm_rate < 1.0:
        raise ValueError(f"false_alarm_rate {false_alarm_rate}: allowed 0 < rate < 1")
    g = Gumbel.fit(m)
    if g.beta <= 0:
        value, rule = float(m.max()), "max (no spread)"
    else:
        value, rule = g.quantile(1.0 - false_alarm_rate), "gumbel tail (L-moments)"
        value = max(value, float(np.median(m)))
        if len(m) * false_alarm_rate < 1.0 and value < m.max():
            value, rule = float(m.max()), "largest normal maximum (too few frames for the tail)"
    return ImageThreshold(float(value), rule, int(len(m)), round(g.exceedance(value), 6))
