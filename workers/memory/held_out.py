"""The line's held-out window: the raw image scores of its most recent OK frames, each scored against a memory
that did not hold it (newest first, at most ``memory.held_out_frames``; in Redis beside the memory with a
store), and the image threshold they give together with the calibration frames
(:func:`workers.memory.calibration.image_threshold`). It lets the threshold follow a slow change of the line."""

from __future__ import annotations

import numpy as np

from workers.memory.calibration import ImageThreshold, image_threshold
from workers.memory.store import MemoryHeader, RedisMemoryStore


class HeldOutWindow:
    def __init__(self, store: RedisMemoryStore | None, capacity: int, false_alarm_rate: float):
        self.store = store
        self.capacity = capacity
        self.false_alarm_rate = false_alarm_rate
        self.values: list[float] = []  # newest first
        self._threshold: float | None = None  # what threshold() gives, until the values or the memory change

    def invalidate(self) -> None:
        """The memory changed: the threshold is estimated again when next asked for."""
        self._threshold = None

    def threshold(self, header: MemoryHeader) -> float:
        """The image threshold in force for the memory of ``header``."""
        if self._threshold is None:  # the calibration frames (+ held-out OK frames) at this false-alarm rate
            has_scores = self.values or header.calibration.get("image_maxima")
            self._threshold = self.estimate(header).value if has_scores else header.image_threshold
        return self._threshold

    def estimate(self, header: MemoryHeader) -> ImageThreshold:
        """The image threshold from the calibration frames' maxima plus the held-out normal frames' maxima
        (:func:`workers.memory.calibration.image_threshold`)."""
        maxima = [*header.calibration.get("image_maxima", ()), *self.values]
        return image_threshold(maxima or [header.image_threshold], self.false_alarm_rate)

    def offer(self, value: float) -> None:
        """A normal (OK) frame's raw maximum, scored against a memory that did not hold it."""
        if not np.isfinite(value):
            return
        self.values.insert(0, float(value))
        del self.values[self.capacity:]
        self._threshold = None
        if self.store is not None:
            self.store.push_held_out([value], self.capacity)

    def load(self) -> None:
        """The line's window as stored (with a store)."""
        self.values = self.store.held_out()

    def sync(self) -> None:
        """The line's window as stored, other workers' OK frames included (with a store)."""
        held = self.store.held_out()
        if held != self.values:
            self.values, self._threshold = held, None
