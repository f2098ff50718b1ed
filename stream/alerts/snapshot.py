"""The alert's snapshot: the result's mask and boxes drawn over its frame (JPEG), or the mask alone (PNG)."""

from __future__ import annotations

import numpy as np

from stream.contracts import InspectionResult
from stream.wire import result_mask

SNAPSHOT_MAX_SIDE = 1024


def render_snapshot(result: InspectionResult, image: np.ndarray | None,
                    max_side: int = SNAPSHOT_MAX_SIDE) -> tuple[bytes, str, str]:
    """(encoded image, mime, source) of an alert: mask + boxes over ``image`` (JPEG) or the mask alone (PNG)."""
    import cv2

    red = (0, 0, 255)
    if image is not None:
        canvas = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR) if image.ndim == 2 else image[..., :3].copy()
        mask = result_mask(result, canvas.shape[:2])
        if mask is not None:
            tint = canvas.copy()
            tint[mask > 0] = red
            canvas = cv2.addWeighted(canvas, 0.55, tint, 0.45, 0)
        source, ext, mime = "frame", ".jpg", "image/jpeg"
    else:
        mask = result_mask(result)
        if mask is not None:
            canvas = np.zeros((*mask.shape[:2], 3), np.uint8)
            canvas[mask > 0] = red
        elif result.defects:  # no mask and no frame: the boxes on a black canvas as large as they need
            h = max(d.box[3] for d in result.defects) + 1
            w = max(d.box[2] for d in result.defects) + 1
            canvas = np.zeros((h, w, 3), np.uint8)
        else:
            return b"", "", "none"
        source, ext, mime = "mask", ".png", "image/png"
    for d in result.defects:
        x0, y0, x1, y1 = d.box
        cv2.rectangle(canvas, (x0, y0), (max(x0, x1 - 1), max(y0, y1 - 1)), (0, 255, 255), 2)
    longest = max(canvas.shape[:2])
    if longest > max_side:
        f = max_side / longest
        canvas = cv2.resize(canvas, (round(canvas.shape[1] * f), round(canvas.shape[0] * f)),
                            interpolation=cv2.INTER_AREA)
    params = [cv2.IMWRITE_JPEG_QUALITY, 85] if ext == ".jpg" else []
    ok, buf = cv2.imencode(ext, canvas, params)
    if not ok:
        return b"", "", "none"
    return buf.tobytes(), mime, source
