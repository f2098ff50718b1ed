"""Stand-in detectors for tests and the overhead benchmark (no model, no torch).

- ``noop``: an OK :class:`~workers.interfaces.Detection` with an all-zero label mask, immediately;
- ``slow:SECONDS``: the same after sleeping SECONDS (a worker killed mid-frame, job timeouts, draining);
- ``fail``: raises on every frame (retries and the dead-letter path).

:func:`make_test_detector` builds one by name, as ``lineinspect worker --detector`` passes it.
"""

from __future__ import annotations

import time

import numpy as np

from stream.contracts import Verdict
from workers.interfaces import Detection


class DetectorFailure(RuntimeError):
    """Raised by :class:`FailingDetector` on purpose."""


class NoopDetector:
    name = "noop"

    @property
    def models(self) -> dict[str, str]:
        return {"detector": self.name}

    def inspect(self, image_bgr: np.ndarray, key: str) -> Detection:
        t0 = time.perf_counter()
        h, w = image_bgr.shape[:2]
        return Detection(
            image_score=0.0, verdict=Verdict.OK, score_map=np.zeros((h, w), np.float32),
            labels=np.zeros((h, w), np.uint8), defects=(), timings={"noop": time.perf_counter() - t0},
            models=self.models)


class SlowDetector(NoopDetector):
    def __init__(self, seconds: float):
        if seconds < 0:
            raise ValueError(f"slow detector: seconds must be >= 0, got {seconds}")
        self.seconds = seconds
        self.name = f"slow:{seconds:g}"

    def inspect(self, image_bgr: np.ndarray, key: str) -> Detection:
        t0 = time.perf_counter()
        time.sleep(self.seconds)
        det = super().inspect(image_bgr, key)
        return Detection(image_score=det.image_score, verdict=det.verdict, score_map=det.score_map,
                         labels=det.labels, defects=(), timings={"sleep": time.perf_counter() - t0},
                         models=self.models)


class FailingDetector(NoopDetector):
    name = "fail"

    def inspect(self, image_bgr: np.ndarray, key: str) -> Detection:
        raise DetectorFailure(f"fail detector refuses frame {key}")


def make_test_detector(name: str) -> NoopDetector:
    """``noop`` | ``slow:SECONDS`` | ``fail``; a ValueError names what is allowed."""
    if name == "noop":
        return NoopDetector()
    if name == "fail":
        return FailingDetector()
    if name.startswith("slow:"):
        try:
            seconds = float(name.split(":", 1)[1])
        except ValueError:
            raise ValueError(f"detector {name!r}: slow:SECONDS needs a number") from None
        return SlowDetector(seconds)
    raise ValueError(f"unknown test detector {name!r} (allowed: noop, slow:SECONDS, fail)")
