"""A preview frame: decoded, scaled, drawn with its result, converted once to yuv420p for every viewer."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from stream.contracts import Frame, InspectionResult
from stream.wire import frame_to_image

VIDEO_CLOCK = 90000  # RTP video clock rate: pts units per second


class FpsMeter:
    """Frames per second from capture timestamps (exponential moving average of the intervals)."""

    def __init__(self, alpha: float = 0.2):
        self.alpha = alpha
        self._last: float | None = None
        self._dt: float | None = None

    def update(self, ts: float) -> float | None:
        if self._last is not None and ts > self._last:
            dt = ts - self._last
            self._dt = dt if self._dt is None else (1 - self.alpha) * self._dt + self.alpha * dt
        self._last = ts
        return 1.0 / self._dt if self._dt else None


def render_frame(frame: Frame, result: InspectionResult | None, fps: float | None, max_side: int):
    """Decode ``frame``, scale it to even sizes with the longer side <= ``max_side`` (0 = keep), then draw
    ``result`` on it (boxes scaled along; the mask is resized by the overlay). Returns a BGR image."""
    import math

    import cv2

    from stream.overlay import draw_overlay

    img = frame_to_image(frame)
    h, w = img.shape[:2]
    scale = min(1.0, max_side / max(h, w)) if max_side else 1.0
    nw, nh = max(2, int(w * scale) // 2 * 2), max(2, int(h * scale) // 2 * 2)  # yuv420p needs even sizes
    if (nw, nh) != (w, h):
        img = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_AREA)
        if result is not None and result.defects:
            sx, sy = nw / w, nh / h
            result = dataclasses.replace(result, defects=tuple(
                dataclasses.replace(d, box=(int(d.box[0] * sx), int(d.box[1] * sy), math.ceil(d.box[2] * sx),
                                            math.ceil(d.box[3] * sy))) for d in result.defects))
    return draw_overlay(img, result, fps)


@dataclass(frozen=True)
class RenderedFrame:
    """One rendered preview frame, shared by all viewers of a source: planar yuv420p pixels (converted once)
    and its pts in :data:`VIDEO_CLOCK` units. Each viewer wraps it in its own ``av.VideoFrame``
    (:meth:`to_video_frame`): aiortc's encoders, running in threads, modify the frame they are given."""

    yuv: Any = field(repr=False)  # numpy uint8 array (H * 3 / 2, W)
    pts: int
    width: int
    height: int
    frame_id: str = ""

    def to_video_frame(self):
        import fractions

        import av

        video = av.VideoFrame.from_ndarray(self.yuv, format="yuv420p")
        video.pts = self.pts
        video.time_base = fractions.Fraction(1, VIDEO_CLOCK)
        return video


def to_yuv420p(img_bgr):
    import av

    return av.VideoFrame.from_ndarray(img_bgr, format="bgr24").reformat(format="yuv420p").to_ndarray()


def render_yuv(frame: Frame, result: InspectionResult | None, fps: float | None, max_side: int):
    """:func:`render_frame`, as yuv420p pixels with the (height, width) of the rendered image."""
    img = render_frame(frame, result, fps, max_side)
    return to_yuv420p(img), img.shape[:2]


class PtsClock:
    """Presentation times in :data:`VIDEO_CLOCK` units from capture times: the first frame is 0, and pts only
    ever increase (clocks of several cameras, or a restarted ingest, may go back)."""

    def __init__(self) -> None:
        self._t0: float | None = None
        self._last = -1

    def pts(self, capture_ts: float) -> int:
        if self._t0 is None:
            self._t0 = capture_ts
        pts = int(round((capture_ts - self._t0) * VIDEO_CLOCK))
        if pts <= self._last:
            pts = self._last + 1
        self._last = pts
        return pts
