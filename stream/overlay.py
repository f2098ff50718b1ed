"""Draw an inspection result over its frame: defect masks, contours, boxes, score, verdict, frames/s.

Shared by the WebRTC preview (:mod:`stream.preview`), ``lineinspect results --overlays`` and alerts. Only
OpenCV and NumPy: no torch, no aiortc.

Colours (BGR) are fixed so that tests and operators can rely on them:

- :data:`DEFECT_COLOUR` (magenta): translucent fill of each defect's mask and its contour,
- :data:`BOX_COLOUR` (yellow): each defect's box and its ``#label score`` tag,
- the head-up banner (top left, dark background): verdict in :data:`VERDICT_COLOURS`, image score and
  threshold, frames/s when given.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

import numpy as np

from stream.contracts import InspectionResult, Verdict
from stream.wire import result_mask

DEFECT_COLOUR: tuple[int, int, int] = (255, 0, 255)  # magenta
BOX_COLOUR: tuple[int, int, int] = (0, 255, 255)  # yellow
BANNER_BG: tuple[int, int, int] = (32, 32, 32)
TEXT_COLOUR: tuple[int, int, int] = (235, 235, 235)
VERDICT_COLOURS: Mapping[Verdict, tuple[int, int, int]] = MappingProxyType({
    Verdict.OK: (80, 200, 60),  # green
    Verdict.DEFECT: (40, 40, 230),  # red
})
FILL_ALPHA = 0.5


def _as_bgr(image: np.ndarray) -> np.ndarray:
    import cv2

    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    if image.ndim == 3 and image.shape[2] == 1:
        return cv2.cvtColor(image[:, :, 0], cv2.COLOR_GRAY2BGR)
    if image.ndim == 3 and image.shape[2] == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
    if image.ndim == 3 and image.shape[2] == 3:
        return image.copy()
    raise ValueError(f"draw_overlay: unsupported image shape {image.shape}")


def _clip_box(box: tuple[int, int, int, int], w: int, h: int) -> tuple[int, int, int, int] | None:
    x0, y0, x1, y1 = (int(v) for v in box)
    x0, x1 = max(0, min(x0, w)), max(0, min(x1, w))
    y0, y1 = max(0, min(y0, h)), max(0, min(y1, h))
    if x1 <= x0 or y1 <= y0:
        return None
    return x0, y0, x1, y1


def draw_overlay(image_bgr: np.ndarray, result: InspectionResult | None,
                 fps: float | None = None) -> np.ndarray:
    """A new BGR uint8 image: ``image_bgr`` with ``result`` drawn on it (the input is not modified).

    Per defect: its mask region (label ``defect.label`` in the result's label mask, resized to the image when
    the sizes differ) filled translucently and outlined in :data:`DEFECT_COLOUR`; its box in
    :data:`BOX_COLOUR` with a ``#label score`` tag. A banner at the top left gives the verdict, the image
    score against its threshold and ``fps`` (when not None). ``result=None`` draws only the banner
    ("no result yet"), so a preview can show frames before the first result arrives.
    """
    import cv2

    if image_bgr.dtype != np.uint8:
        raise ValueError(f"draw_overlay: expected a uint8 image, got {image_bgr.dtype}")
    out = _as_bgr(image_bgr)
    h, w = out.shape[:2]
    scale = max(0.35, min(h, w) / 900.0)
    thick = max(1, round(2 * scale))

    if result is not None and result.defects:
        labels = result_mask(result, (h, w))
        if labels is not None:
            for d in result.defects:
                region = (labels == d.label).astype(np.uint8)
                x, y, rw, rh = cv2.boundingRect(region)  # work inside the region's bounding box only
                if rw == 0 or rh == 0:
                    continue
                roi = out[y:y + rh, x:x + rw]
                inside = region[y:y + rh, x:x + rw].astype(bool)
                tint = cv2.addWeighted(roi, 1.0 - FILL_ALPHA, np.full_like(roi, DEFECT_COLOUR), FILL_ALPHA, 0.0)
                roi[inside] = tint[inside]
                contours, _ = cv2.findContours(region[y:y + rh, x:x + rw], cv2.RETR_LIST, cv2.CHAIN_APPROX_SIMPLE,
                                               offset=(x, y))
                cv2.drawContours(out, contours, -1, DEFECT_COLOUR, thick, cv2.LINE_8)
        for d in result.defects:
            box = _clip_box(d.box, w, h)
            if box is None:
                continue
            x0, y0, x1, y1 = box
            # the box is inclusive-exclusive: the last pixel row/column inside is x1-1, y1-1
            cv2.rectangle(out, (x0, y0), (x1 - 1, y1 - 1), BOX_COLOUR, thick, cv2.LINE_8)
            tag = f"#{d.label} {d.score:.2f}"
            (tw, th), base = cv2.getTextSize(tag, cv2.FONT_HERSHEY_SIMPLEX, 0.5 * scale, max(1, thick - 1))
            ty = y0 - 4 if y0 - th - base - 4 >= 0 else min(h - base, y1 + th + 4)
            cv2.putText(out, tag, (x0, ty), cv2.FONT_HERSHEY_SIMPLEX, 0.5 * scale, BOX_COLOUR,
                        max(1, thick - 1), cv2.LINE_AA)

    _draw_banner(out, result, fps, scale, thick)
    return out


def _draw_banner(out: np.ndarray, result: InspectionResult | None, fps: float | None, scale: float,
                 thick: int) -> None:
    import cv2

    font = cv2.FONT_HERSHEY_SIMPLEX
    fs = 0.6 * scale
    parts: list[tuple[str, tuple[int, int, int]]] = []
    if result is None:
        parts.append(("no result yet", TEXT_COLOUR))
    else:
        parts.append((result.verdict.value.upper(), VERDICT_COLOURS[result.verdict]))
        parts.append((f"score {result.image_score:.3f} / {result.threshold:.3f}", TEXT_COLOUR))
        if result.defects:
            parts.append((f"{len(result.defects)} defect{'s' if len(result.defects) != 1 else ''}", TEXT_COLOUR))
    if fps is not None:
        parts.append((f"{fps:.1f} fps", TEXT_COLOUR))

    pad = max(3, round(6 * scale))
    gap = max(6, round(12 * scale))
    sizes = [cv2.getTextSize(text, font, fs, thick) for text, _ in parts]
    text_h = max(s[0][1] + s[1] for s in sizes)
    width = sum(s[0][0] for s in sizes) + gap * (len(parts) - 1) + 2 * pad
    height = text_h + 2 * pad
    h, w = out.shape[:2]
    cv2.rectangle(out, (0, 0), (min(w, width) - 1, min(h, height) - 1), BANNER_BG, -1)
    x = pad
    baseline_y = pad + max(s[0][1] for s in sizes)
    for (text, colour), ((tw, _), _) in zip(parts, sizes, strict=True):
        cv2.putText(out, text, (x, baseline_y), font, fs, colour, thick, cv2.LINE_AA)
        x += tw + gap
