"""Reading image and mask files for the offline tools (predict, eval, memory add, training)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from stream.contracts import LineInspectError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


class ImageReadError(LineInspectError):
    """An image file is missing, truncated or not an image."""


def images_in(folder: Path) -> list[Path]:
    """Image files directly in ``folder`` (not recursive, sorted); none when it is not a folder."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def list_images(folder: Path, exclude: Sequence[Path] = ()) -> list[Path]:
    """Image files under ``folder`` (recursive, sorted), skipping anything inside ``exclude`` folders."""
    folder = Path(folder)
    skip = [Path(e).resolve() for e in exclude]
    found = []
    for p in sorted(folder.rglob("*")):
        if not p.is_file() or p.suffix.lower() not in IMAGE_EXTENSIONS:
            continue
        rp = p.resolve()
        if any(rp.is_relative_to(s) for s in skip):
            continue
        found.append(p)
    return found


def read_image(path: Path) -> np.ndarray:
    """BGR uint8 H x W x 3 (grey and 16-bit images converted); :class:`ImageReadError` if unreadable."""
    import cv2

    try:
        data = np.fromfile(str(path), dtype=np.uint8)
    except OSError as exc:
        raise ImageReadError(f"{path}: cannot read: {exc}") from None
    image = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    if image is None:
        raise ImageReadError(f"{path}: not a decodable image ({data.size} bytes)")
    return image


def read_mask(path: Path | None, shape: tuple[int, int]) -> np.ndarray:
    """A ground-truth mask as uint8 0/1 at ``shape`` (nearest-neighbour resize); zeros when ``path`` is None."""
    import cv2

    if path is None:
        return np.zeros(shape, np.uint8)
    m = cv2.imdecode(np.fromfile(str(path), dtype=np.uint8), cv2.IMREAD_GRAYSCALE)
    if m is None:
        raise ImageReadError(f"{path}: not a decodable mask")
    if m.shape != shape:
        m = cv2.resize(m, (shape[1], shape[0]), interpolation=cv2.INTER_NEAREST)
    return (m > 0).astype(np.uint8)
