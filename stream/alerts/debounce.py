"""Debounce and cooldown: when defect results of a line become an alert (see :mod:`stream.alerts`)."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from enum import Enum

Clock = Callable[[], float]

class Decision(str, Enum):
    OK = "ok"  # not a defect
    DEBOUNCE = "debounce"  # a defect, but not yet enough of them within the window
    COOLDOWN = "cooldown"  # a defect while the line is in its cooldown after an alert
    RAISE = "raise"  # raise an alert now


class AlertDebouncer:
    """Pure debounce + per-line cooldown logic; ``clock`` (seconds, monotonic) is injectable for tests."""

    def __init__(self, debounce_count: int, window_s: float, cooldown_s: float, clock: Clock = time.monotonic):
        if debounce_count < 1:
            raise ValueError(f"debounce_count must be >= 1, got {debounce_count}")
        if window_s < 0 or cooldown_s < 0:
            raise ValueError("debounce window and cooldown must be >= 0")
        self.debounce_count = debounce_count
        self.window_s = window_s
        self.cooldown_s = cooldown_s
        self._clock = clock
        self._hits: dict[str, deque[float]] = {}
        self._last_alert: dict[str, float] = {}

    def observe(self, line: str, defective: bool, now: float | None = None) -> Decision:
        """Feed one result of ``line``; returns what to do with it."""
        if not defective:
            return Decision.OK
        t = self._clock() if now is None else now
        last = self._last_alert.get(line)
        if last is not None and t - last < self.cooldown_s:
            return Decision.COOLDOWN
        hits = self._hits.setdefault(line, deque())
        hits.append(t)
        while hits and t - hits[0] > self.window_s:
            hits.popleft()
        if len(hits) >= self.debounce_count:
            hits.clear()
            self._last_alert[line] = t
            return Decision.RAISE
        return Decision.DEBOUNCE

    def forget(self, line: str) -> None:
        """Drop the defective frames of ``line`` counted towards the next alert (its cooldown stays)."""
        self._hits.pop(line, None)

    def pending(self, line: str) -> int:
        """Defective frames of ``line`` counted towards the next alert (within the window, as of now)."""
        t = self._clock()
        return sum(1 for h in self._hits.get(line, ()) if t - h <= self.window_s)

    def cooldown_left(self, line: str) -> float:
        last = self._last_alert.get(line)
        return 0.0 if last is None else max(0.0, self.cooldown_s - (self._clock() - last))
