"""The labelled folder that operator reviews grow, per line, in MVTec layout (``lineinspect eval`` reads it):

::

    <labelled_dir>/<line>/test/good/<frame>.png                      "OK - false alarm"
    <labelled_dir>/<line>/test/confirmed/<frame>.png                 "Defect confirmed"
    <labelled_dir>/<line>/ground_truth/confirmed/<frame>_mask.png    its mask (the published one, 0/255)

``<frame>`` is the frame id with every character outside ``[A-Za-z0-9._-]`` replaced by ``_``
(``cam0:1700000000000:42`` -> ``cam0_1700000000000_42``). Files are written to a temporary name and renamed,
so a reader never sees half a PNG.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
CONFIRMED = "confirmed"


class LabelledWriteError(OSError):
    """A labelled image or mask could not be written."""


def safe_stem(frame_id: str) -> str:
    stem = _UNSAFE.sub("_", frame_id).strip(".")
    return stem or "frame"


@dataclass(frozen=True)
class LabelledFolder:
    root: Path

    def line_root(self, line: str) -> Path:
        return Path(self.root) / line

    def good_path(self, line: str, frame_id: str) -> Path:
        return self.line_root(line) / "test" / "good" / f"{safe_stem(frame_id)}.png"

    def confirmed_paths(self, line: str, frame_id: str) -> tuple[Path, Path]:
        stem = safe_stem(frame_id)
        root = self.line_root(line)
        return root / "test" / CONFIRMED / f"{stem}.png", root / "ground_truth" / CONFIRMED / f"{stem}_mask.png"

    def write_good(self, line: str, frame_id: str, image_bgr: np.ndarray) -> Path:
        path = self.good_path(line, frame_id)
        _write_png(path, image_bgr)
        return path

    def write_confirmed(self, line: str, frame_id: str, image_bgr: np.ndarray,
                        labels: np.ndarray | None) -> tuple[Path, Path]:
        """The image and its mask (``labels`` > 0 -> 255; all 0 when the result carried no mask)."""
        img_path, mask_path = self.confirmed_paths(line, frame_id)
        h, w = image_bgr.shape[:2]
        mask = np.zeros((h, w), np.uint8) if labels is None else np.where(labels > 0, 255, 0).astype(np.uint8)
        if mask.shape != (h, w):
            raise LabelledWriteError(f"mask {mask.shape} does not match the frame {(h, w)}")
        _write_png(img_path, image_bgr)
        _write_png(mask_path, mask)
        return img_path, mask_path


def _write_png(path: Path, image: np.ndarray) -> None:
    import cv2

    ok, buf = cv2.imencode(".png", image)
    if not ok:
        raise LabelledWriteError(f"{path}: PNG encoding failed")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(buf.tobytes())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise LabelledWriteError(f"{path}: {exc}") from exc
