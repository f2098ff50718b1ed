"""Drift: a rolling view of one line's scores against its calibration, and when it says that the line's
appearance changed (lighting, camera, product) rather than that parts are defective.

The calibration (``detector.false_alarm_rate``, default 0.01) says how often a good frame scores over the image
threshold. A :class:`DriftMonitor` keeps the line's most recent results (``alerts.drift.window_frames``, no
older than ``window_s``) and compares them with that:

* **flagged share**: the share of frames over the threshold (verdict defect), against ``expected_share``;
* **p-value**: how likely at least that many flagged frames are when each good frame is flagged with
  probability ``expected_share`` (binomial upper tail): a small window cannot prove much, this says how much;
* **median ratio**: the median of ``image_score / threshold``; a healthy line sits well below 1, a few defective
  parts do not move it, a changed appearance moves most frames and with them the median.

Drift **starts** when the window holds at least ``min_frames`` frames and either rule holds:

* ``flagged_share`` (a flood over the threshold): flagged share >= ``start_share``, p-value <= ``max_p_value``
  and median ratio >= ``start_median_ratio``. A burst of real defects raises the share but not the median
  (most parts are still good), so it stays a matter for the per-frame defect alerts;
* ``median_rise`` (the line looks different, however few frames cross the threshold): the median ratio is
  at least ``start_median_rise`` above the line's **reference median**, the window's median a window earlier
  (``window_frames`` calm windows back) while the line matched its calibration (p-value > ``max_p_value``).
  The lag makes a change within about a window visible (a rise slower than that is followed, not reported);
  while drift lasts, the reference stays the one from before it.

Drift **ends** when the window (again >= ``min_frames`` frames) is calm by both rules: flagged share <=
``end_share`` and the median at most half of ``start_median_rise`` above the reference (hysteresis: a window
that was mostly flagged takes nearly a window of good frames). A window that empties (the line stopped) ends
nothing. The rule and its defaults are explained for plant engineers in docs/operations.md, "Drift".
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections import deque
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING

from stream.contracts import InspectionResult, Verdict

if TYPE_CHECKING:
    from config.settings import DriftSettings

REFERENCE_WINDOWS = 4  # the reference median is taken over up to this many windows of calm frames


def binomial_tail(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p), in log space (no overflow for large n)."""
    if k <= 0:
        return 1.0
    if k > n:
        return 0.0
    if p <= 0.0:
        return 0.0
    if p >= 1.0:
        return 1.0
    log_p, log_q = math.log(p), math.log1p(-p)
    logs = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * log_p + (n - i) * log_q
            for i in range(k, n + 1)]
    top = max(logs)
    return min(1.0, math.exp(top) * sum(math.exp(v - top) for v in logs))


class DriftChange(str, Enum):
    STARTED = "started"  # "line appearance changed"
    ENDED = "ended"  # "line appearance restored"


class DriftReason(str, Enum):
    """Which start rule fired."""

    FLAGGED_SHARE = "flagged_share"  # most frames over the threshold, improbably many for the calibration
    MEDIAN_RISE = "median_rise"  # the median ratio rose start_median_rise above the reference median


@dataclass(frozen=True)
class DriftFigures:
    """The window as of one result."""

    frames: int  # results in the window
    flagged: int  # of those, over the threshold (verdict defect)
    expected_share: float  # the calibrated false-alarm rate
    p_value: float  # P(>= flagged of frames flagged | expected_share)
    median_ratio: float  # median image_score / threshold
    reference_median_ratio: float | None  # the window's median a window earlier, when it matched its calibration
    window_s: float  # time the window spans (newest - oldest processed_ts)

    @property
    def flagged_share(self) -> float:
        return self.flagged / self.frames if self.frames else 0.0

    @property
    def median_rise(self) -> float | None:
        """The median ratio above the reference (None: no reference yet)."""
        ref = self.reference_median_ratio
        return None if ref is None else self.median_ratio - ref


@dataclass(frozen=True)
class DriftEpisode:
    """One drift, from its start to now (or its end)."""

    started_ts: float  # processed_ts of the result that started it
    frames: int  # results seen while it lasted (the starting one included)
    flagged: int  # of those, defects (their per-frame alerts were suppressed)
    reason: DriftReason  # the rule that started it


@dataclass(frozen=True)
class DriftUpdate:
    """What one result did to the line's drift state."""

    active: bool  # drift is on after this result
    change: DriftChange | None = None
    figures: DriftFigures | None = None  # None: the result had no usable threshold (not counted)
    episode: DriftEpisode | None = None  # the current (or, on ENDED, the finished) drift


@dataclass(frozen=True)
class _Sample:
    ts: float
    ratio: float
    flagged: bool


class DriftMonitor:
    """One line's drift state, fed every result of the line in order (pure: no I/O, no clock)."""

    def __init__(self, line: str, settings: DriftSettings, expected_share: float):
        if not 0.0 < expected_share < 1.0:
            raise ValueError(f"expected_share must be in (0, 1), got {expected_share}")
        self.line = line
        self.settings = settings
        self.expected_share = expected_share
        self._window: deque[_Sample] = deque(maxlen=settings.window_frames)
        self._newest_ts = -math.inf
        # ratios of frames that arrived while the line matched its calibration: the newest window_frames of them
        # are the lag, the REFERENCE_WINDOWS x window_frames before those the reference
        self._calm: deque[float] = deque(maxlen=(REFERENCE_WINDOWS + 1) * settings.window_frames)
        self._episode: DriftEpisode | None = None
        self._ended: DriftEpisode | None = None  # the last finished drift
        # the reference median the drift started against, held while it lasts (the calm frames of the lag are
        # forgotten at the start, which can leave too few for a reference: the end rule must not read that as calm)
        self._held_reference: float | None = None

    @property
    def active(self) -> bool:
        return self._episode is not None

    def observe(self, result: InspectionResult) -> DriftUpdate:
        """Add one result to the window and decide; results without a positive, finite threshold are skipped."""
        score, threshold = result.image_score, result.threshold
        if not (math.isfinite(score) and math.isfinite(threshold) and threshold > 0):
            return DriftUpdate(self.active, episode=self._episode)
        ts = result.processed_ts or result.capture_ts
        self._newest_ts = max(self._newest_ts, ts)
        self._window.append(_Sample(ts, float(score) / float(threshold), result.verdict is Verdict.DEFECT))
        while self._window and self._newest_ts - self._window[0].ts > self.settings.window_s:
            self._window.popleft()
        figures = self.figures()
        change = self._decide(figures, ts)
        if self._episode is not None and change is None:
            e = self._episode
            self._episode = DriftEpisode(e.started_ts, e.frames + 1, e.flagged + self._window[-1].flagged, e.reason)
        if change is DriftChange.ENDED:
            return DriftUpdate(False, change, figures, self._ended)
        return DriftUpdate(self.active, change, figures, self._episode)

    def _decide(self, f: DriftFigures, ts: float) -> DriftChange | None:
        s = self.settings
        if f.frames < s.min_frames:
            return None
        if self._episode is None:
            reason = self.start_reason(f)
            if reason is not None:
                self._episode = DriftEpisode(ts, 1, int(self._window[-1].flagged), reason)
                self._held_reference = f.reference_median_ratio
                self._forget_lag()  # frames of the change itself never become the reference
                return DriftChange.STARTED
            if f.p_value > s.max_p_value:  # the line matches its calibration: the frame may become the reference
                self._calm.append(self._window[-1].ratio)
            return None
        if self.calm(f):
            self._ended, self._episode, self._held_reference = self._episode, None, None
            return DriftChange.ENDED
        return None

    def _reference(self) -> float | None:
        """The median ratio of the calm frames older than the lag (None: fewer than ``min_frames`` of them)."""
        lag = self.settings.window_frames
        if len(self._calm) - lag < self.settings.min_frames:
            return None
        return statistics.median(itertools.islice(self._calm, 0, len(self._calm) - lag))

    def _forget_lag(self) -> None:
        for _ in range(min(self.settings.window_frames, len(self._calm))):
            self._calm.pop()

    def start_reason(self, f: DriftFigures) -> DriftReason | None:
        """The start rule on a window's figures (``min_frames`` aside): which part fired, or None."""
        s = self.settings
        if (f.flagged_share >= s.start_share and f.p_value <= s.max_p_value
                and f.median_ratio >= s.start_median_ratio):
            return DriftReason.FLAGGED_SHARE
        rise = f.median_rise
        if rise is not None and rise >= s.start_median_rise:
            return DriftReason.MEDIAN_RISE
        return None

    def calm(self, f: DriftFigures) -> bool:
        """The end rule (``min_frames`` aside): few frames over the threshold and the median near the reference."""
        rise = f.median_rise
        return f.flagged_share <= self.settings.end_share and (
            rise is None or rise <= self.settings.start_median_rise / 2)

    def figures(self) -> DriftFigures:
        n = len(self._window)
        flagged = sum(1 for x in self._window if x.flagged)
        return DriftFigures(
            frames=n, flagged=flagged, expected_share=self.expected_share,
            p_value=binomial_tail(flagged, n, self.expected_share),
            median_ratio=statistics.median(x.ratio for x in self._window) if n else 0.0,
            reference_median_ratio=self._held_reference if self._episode is not None else self._reference(),
            window_s=(self._window[-1].ts - self._window[0].ts) if n else 0.0)
