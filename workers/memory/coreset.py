"""The memory's rows: greedy k-center selection and a memory built frame by frame.

Memory: greedy k-center selection on a random projection, frame by frame (a frame's coreset when built
from a folder, a normal frame's patches that are new to the memory when filled online; every kept patch
records its distance to the selected set when it was picked, its *radius*). Bounded by
``memory.max_patches``: the coreset policy drops the most redundant rows (smallest radius), the reservoir
policy keeps a uniform sample. Stored per line in Redis (:mod:`workers.memory.store`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from workers.memory.params import MemoryParams
from workers.memory.search import torch_module as _torch

RADIUS_MAX = 60000.0  # float16-safe stand-in for "infinitely novel" (first patch of an empty memory)


def random_projection(dim: int, out_dim: int, seed: int):
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
    proj = random_projection(dim, params.projection_dim, params.seed)
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


