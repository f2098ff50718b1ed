"""Label-free memory: a line's normal memory from unlabeled frames, most of which may be defective.

Used by ``predict`` without ``--normal``, ``eval --mutual`` and the streaming worker's warm-up alike.

The rule: **no patch may vouch for itself or for its own defect, and only what was judged normal enters the
memory.** A memory built directly from unlabeled frames keeps their defect patches (greedy k-center picks the
most unusual patches first), and a defect then finds itself in the memory and scores as normal.

1. *References.* At most ``refs`` frames of the batch, evenly spread over it, each reduced to a coreset of
   ``2 x frame_ratio`` of its patches (k-center on a random projection). Cost is bounded by ``refs``, not by
   the batch: every other frame is only scored against the result.
2. *Suspicion.* Each reference patch is scored against the *other* references: per other frame its nearest
   distance, then the mean of the lowest ``mutual_fraction`` of those (MuSc-style interval average), so a
   defect present in one frame, or in a minority of frames at different places, stays far.
3. *Clean memory.* Patches whose suspicion is above ``median + suspect_z * 1.4826 * MAD`` (over all reference
   patches) are left out; of the rest each frame contributes its own k-center coreset, rows tagged with the
   frame they came from (``owner``).
4. *Calibration.* Each reference frame is scored against the memory *without its own rows* (leave-one-out).
   Both thresholds read those maps outside the frame's suspect *regions* (8-connected groups of at least
   ``suspect_region_cells`` patches above ``median + region_z * MAD``: a defect, not the odd noisy patch every
   good frame has): the pixel threshold their pixels, the image threshold the frame's image score, i.e. what
   the frame would score had its defect not been there, fitted with the false-alarm tail of
   :mod:`workers.memory.calibration`. The odd noisy patch stays in the pixel sample, as it does in a good frame's:
   leaving every suspect patch out cut the normal tail short (stage-0 maps, 60 test images: the label-free
   pixel threshold sat at 0.83x / 0.75x the level of best F1 on hazelnut_toy / commutator; with train/good
   at 0.99x / 0.97x).
5. *Inspection.* A frame that is one of the references is scored without its own rows
   (:meth:`workers.memory.mapper.MemoryMapper.map` looks its content key up: :class:`BatchFrames`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from workers.interfaces import ImageEmbedding
from workers.memory.calibration import pixel_grid
from workers.memory.coreset import build_memory, kcenter, random_projection
from workers.memory.features import grid_target_size, raw_to_image
from workers.memory.image_score import map_readings
from workers.memory.params import MemoryParams
from workers.memory.search import knn_distance
from workers.memory.search import torch_module as _torch


@dataclass(frozen=True)
class LabelFreeResult:
    feats: np.ndarray  # float16 [n, C] clean memory rows
    radius: np.ndarray  # float16 [n]
    owner: np.ndarray  # int32 [n]: index (into the reference frames) of the frame a row came from
    coverage: float
    loo_maps: tuple[np.ndarray, ...]  # raw leave-one-out maps of the reference frames
    normal_maxima: tuple[tuple[float, ...], ...]  # per reference frame: its image score readings outside its
    # suspect regions (smoothed maxima at params.score_sigmas, workers.memory.image_score)
    pixel_samples: np.ndarray  # raw LOO map values outside suspect regions (subsampled)
    suspect_patches: int
    suspect_frames: int  # frames with at least one suspect region


@dataclass(frozen=True)
class BatchFrames:
    """The frames a label-free memory was built from, known by content (step 5 of the module docstring)."""

    owner: np.ndarray  # int32 [n]: the frame each memory row came from
    keys: dict[str, int]  # the frames by content key (workers.sam.content_key)

    def frame_of(self, image_bgr: np.ndarray | None, size: int) -> int | None:
        """The batch frame this image is (by content), if its rows are still in the memory (of ``size`` rows)."""
        if not self.keys or image_bgr is None or len(self.owner) < size:
            return None
        from workers.sam import content_key

        return self.keys.get(content_key(image_bgr))


def pick_references(n: int, refs: int) -> list[int]:
    """``min(n, refs)`` indices evenly spread over ``range(n)`` (deterministic)."""
    if n <= refs:
        return list(range(n))
    return sorted({int(round(v)) for v in np.linspace(0, n - 1, refs)})


def interval_scores(query, refs: Sequence[Any], fraction: float):
    """Per query patch: the mean of the lowest ``fraction`` of its nearest distances to each of ``refs``
    (torch [Q]; also the worker's provisional map while it warms up)."""
    torch = _torch()
    d = torch.stack([knn_distance(query, r, 1) for r in refs])
    m = max(1, int(round(fraction * len(refs))))
    return torch.sort(d, dim=0).values[:m].mean(0)


def _robust_cut(values: np.ndarray, z: float) -> float:
    med = float(np.median(values))
    mad = 1.4826 * float(np.median(np.abs(values - med)))
    return med + z * max(mad, 1e-6 * max(abs(med), 1e-6))


def suspect_regions(mask: np.ndarray, min_cells: int) -> np.ndarray:
    """The 8-connected groups of at least ``min_cells`` cells of a bool grid mask."""
    n, lab, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    big = np.flatnonzero(stats[:, cv2.CC_STAT_AREA] >= min_cells)
    return np.isin(lab, big[big > 0])


def _grid_mask_to_image(mask: np.ndarray, embedding: ImageEmbedding, shape: tuple[int, int]) -> np.ndarray:
    """A bool patch-grid mask [gh, gw] -> bool at the map's size, each cell dilated by one cell."""
    oh, ow = embedding.original_size
    grown = cv2.dilate(mask.astype(np.uint8), np.ones((3, 3), np.uint8))
    th, tw = grid_target_size(mask.shape, embedding)
    up = cv2.resize(grown, (tw, th), interpolation=cv2.INTER_NEAREST)[:oh, :ow]
    if up.shape != tuple(shape):
        up = cv2.resize(up, (shape[1], shape[0]), interpolation=cv2.INTER_NEAREST)
    return up > 0


def build_label_free(frame_feats: Sequence[Any], shapes: Sequence[tuple[int, int]],
                     embeddings: Sequence[ImageEmbedding], params: MemoryParams) -> LabelFreeResult:
    """Steps 2-4 of the module docstring on the reference frames (``frame_feats``: torch [gh*gw, C] each,
    ``params``: the memory's options)."""
    torch = _torch()
    n = len(frame_feats)
    if n < 3:
        raise ValueError(f"label-free memory needs at least three frames, got {n}")
    proj = random_projection(frame_feats[0].shape[1], params.projection_dim, params.seed)
    cores = []
    for i, f in enumerate(frame_feats):
        idx, _ = kcenter(f, max(1, int(round(2 * params.frame_ratio * f.shape[0]))), proj=proj,
                         seed=params.seed + i)
        cores.append(f[torch.from_numpy(idx)])
    suspicion = [interval_scores(frame_feats[i], [cores[j] for j in range(n) if j != i],
                                 params.mutual_fraction).numpy() for i in range(n)]
    pooled = np.concatenate(suspicion)
    cut = _robust_cut(pooled, params.suspect_z)
    region_cut = _robust_cut(pooled, params.region_z)

    try:  # each frame's k-center coreset of its clean patches, rows tagged with their frame
        built = build_memory(frame_feats, params, keep=[sc <= cut for sc in suspicion])
    except ValueError:
        raise ValueError("label-free memory: every patch was suspect") from None
    mem = torch.from_numpy(built.feats.astype(np.float32))
    own = built.owner

    loo_maps, maxima, pixels = [], [], []
    region_frames = 0
    for i, f in enumerate(frame_feats):
        others = torch.from_numpy(own != i)
        if not bool(others.any()):
            continue
        grid = knn_distance(f, mem[others], params.k).numpy().reshape(shapes[i])
        raw = raw_to_image(grid, embeddings[i], params.smoothing_sigma)
        loo_maps.append(raw)
        regions = suspect_regions(suspicion[i].reshape(shapes[i]) > region_cut, params.suspect_region_cells)
        anomalous = _grid_mask_to_image(regions, embeddings[i], raw.shape)
        region_frames += bool(regions.any())
        maxima.append(map_readings(raw, embeddings[i], params.score_sigmas, params.wide_quantile,
                                   params.smoothing_sigma, exclude=anomalous, contrast=params.score_contrast))
        pixels.append(pixel_grid(raw)[~pixel_grid(anomalous)])
    return LabelFreeResult(
        feats=built.feats, radius=built.radius, owner=built.owner, coverage=built.coverage, loo_maps=tuple(loo_maps),
        normal_maxima=tuple(maxima), pixel_samples=np.concatenate(pixels) if pixels else np.zeros(0, np.float32),
        suspect_patches=int(sum(int((s > cut).sum()) for s in suspicion)),
        suspect_frames=region_frames)
