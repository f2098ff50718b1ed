"""Stand-in detectors for tests and the overhead benchmark (no model, no torch).

- ``noop``: an OK :class:`~workers.interfaces.Detection` with an all-zero label mask, immediately;
- ``slow:SECONDS``: the same after sleeping SECONDS (a worker killed mid-frame, job timeouts, draining);
- ``fail``: raises on every frame (retries and the dead-letter path);
- ``box:X0,Y0,X1,Y1``: a DEFECT with the ellipse inscribed in that box (consumers of results: preview, alerts).

:func:`make_test_detector` builds one by name, as ``lineinspect worker --detector`` passes it.
"""

from __future__ import annotations

import time

import numpy as np

from stream.contracts import Defect, Verdict
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


class BoxDetector(NoopDetector):
    """Reports one defect on every frame: the ellipse inscribed in a fixed box (clipped to the frame).

    For end-to-end tests of what consumes results (preview, alerts, overlays) with a real worker process and a
    defect whose place is known in advance.
    """

    def __init__(self, box: tuple[int, int, int, int]):
        x0, y0, x1, y1 = box
        if x1 <= x0 or y1 <= y0 or min(box) < 0:
            raise ValueError(f"box detector: need 0 <= x0 < x1 and 0 <= y0 < y1, got {box}")
        self.box = box
        self.name = "box:" + ",".join(str(v) for v in box)

    def inspect(self, image_bgr: np.ndarray, key: str) -> Detection:
        import cv2

        t0 = time.perf_counter()
        h, w = image_bgr.shape[:2]
        labels = np.zeros((h, w), np.uint8)
        x0, y0, x1, y1 = self.box
        cv2.ellipse(labels, ((x0 + x1 - 1) // 2, (y0 + y1 - 1) // 2), ((x1 - x0) // 2, (y1 - y0) // 2), 0, 0, 360,
                    1, -1)
        area = int(labels.sum())
        if area == 0:  # the box lies outside this frame
            return super().inspect(image_bgr, key)
        clipped = (min(x0, w), min(y0, h), min(x1, w), min(y1, h))
        return Detection(
            image_score=2.0, verdict=Verdict.DEFECT, score_map=labels.astype(np.float32) * 2.0, labels=labels,
            defects=(Defect(label=1, box=clipped, area=area, score=2.0),),
            timings={"box": time.perf_counter() - t0}, models=self.models)


def make_test_detector(name: str) -> NoopDetector:
    """``noop`` | ``slow:SECONDS`` | ``fail`` | ``box:X0,Y0,X1,Y1``; a ValueError names what is allowed."""
    if name == "noop":
        return NoopDetector()
    if name.startswith("box:"):
        try:
            x0, y0, x1, y1 = (int(v) for v in name.split(":", 1)[1].split(","))
        except ValueError:
            raise ValueError(f"detector {name!r}: box:X0,Y0,X1,Y1 needs four integers") from None
        return BoxDetector((x0, y0, x1, y1))
    if name == "fail":
        return FailingDetector()
    if name.startswith("slow:"):
        try:
            seconds = float(name.split(":", 1)[1])
        except ValueError:
            raise ValueError(f"detector {name!r}: slow:SECONDS needs a number") from None
        return SlowDetector(seconds)
    raise ValueError(f"unknown test detector {name!r} (allowed: noop, slow:SECONDS, fail, box:X0,Y0,X1,Y1)")
