"""SAM's input geometry, shared by every backend: the longest image side is resized to 1024, RGB is normalised
with SAM's mean/std, the image is zero-padded bottom/right to 1024 x 1024. Prompts arrive in original image
pixels and are moved into that 1024 frame here (x and y scaled separately, as segment-anything does)."""

from __future__ import annotations

import math

import cv2
import numpy as np

from workers.interfaces import ImageEmbedding, Prompts

ENCODER_SIZE = 1024
LOW_RES = 256
PIXEL_MEAN = np.array([123.675, 116.28, 103.53], dtype=np.float32)
PIXEL_STD = np.array([58.395, 57.12, 57.375], dtype=np.float32)


def resized_shape(h: int, w: int, long_side: int = ENCODER_SIZE) -> tuple[int, int]:
    """(h, w) of an (h, w) image whose longest side is resized to ``long_side`` (rounded like SAM)."""
    scale = long_side / max(h, w)
    return int(h * scale + 0.5), int(w * scale + 0.5)


def preprocess(image_bgr: np.ndarray) -> tuple[np.ndarray, tuple[int, int]]:
    """BGR uint8 (H x W x 3, or H x W grey) -> (float32 [1,3,1024,1024] encoder input, resized (h, w))."""
    if image_bgr.ndim == 2:
        image_bgr = cv2.cvtColor(image_bgr, cv2.COLOR_GRAY2BGR)
    if image_bgr.ndim != 3 or image_bgr.shape[2] != 3:
        raise ValueError(f"expected an H x W x 3 BGR image, got shape {image_bgr.shape}")
    h, w = image_bgr.shape[:2]
    nh, nw = resized_shape(h, w)
    rgb = cv2.cvtColor(image_bgr, cv2.COLOR_BGR2RGB)
    if (nh, nw) != (h, w):
        interp = cv2.INTER_AREA if nh < h else cv2.INTER_LINEAR
        rgb = cv2.resize(rgb, (nw, nh), interpolation=interp)
    x = np.zeros((ENCODER_SIZE, ENCODER_SIZE, 3), dtype=np.float32)  # zero after normalisation = padding
    x[:nh, :nw] = (rgb.astype(np.float32) - PIXEL_MEAN) / PIXEL_STD
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None]), (nh, nw)


def to_input_coords(points_xy: np.ndarray, embedding: ImageEmbedding) -> np.ndarray:
    """Original pixel (x, y) -> the 1024 encoder frame (x scaled by w'/W, y by h'/H)."""
    (ih, iw), (oh, ow) = embedding.input_size, embedding.original_size
    out = np.asarray(points_xy, dtype=np.float32).reshape(-1, 2).copy()
    out[:, 0] *= iw / ow
    out[:, 1] *= ih / oh
    return out


def from_input_coords(points_xy: np.ndarray, embedding: ImageEmbedding) -> np.ndarray:
    """Inverse of :func:`to_input_coords`."""
    (ih, iw), (oh, ow) = embedding.input_size, embedding.original_size
    out = np.asarray(points_xy, dtype=np.float32).reshape(-1, 2).copy()
    out[:, 0] *= ow / iw
    out[:, 1] *= oh / ih
    return out


def tap_grid(array: np.ndarray, name: str) -> np.ndarray:
    """One tap output of a batch of one -> float32 [C, h, w]: tokens [1, N, C] (square grid), or [1, C, h, w]."""
    a = np.asarray(array)[0]
    if a.ndim == 2:
        side = math.isqrt(a.shape[0])
        if side * side != a.shape[0]:
            raise ValueError(f"tap {name}: {a.shape[0]} tokens do not form a square grid")
        a = a.reshape(side, side, a.shape[1]).transpose(2, 0, 1)
    elif a.ndim != 3:
        raise ValueError(f"tap {name}: unexpected shape {np.shape(array)}")
    return np.ascontiguousarray(a, dtype=np.float32)


def check_prompts(prompts: Prompts) -> tuple[np.ndarray, np.ndarray]:
    points = np.asarray(prompts.points, dtype=np.float32).reshape(-1, 2)
    labels = np.asarray(prompts.labels, dtype=np.float32).reshape(-1)
    if len(points) != len(labels):
        raise ValueError(f"{len(points)} points but {len(labels)} labels")
    if len(points) == 0 and prompts.box is None:
        raise ValueError("a decoder call needs at least one point or a box")
    if prompts.mask_logits is not None and np.shape(prompts.mask_logits) != (LOW_RES, LOW_RES):
        raise ValueError(f"mask_logits must be {LOW_RES}x{LOW_RES}, got {np.shape(prompts.mask_logits)}")
    return points, labels
