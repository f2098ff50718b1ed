"""Online fill (``memory.fill`` online): after a frame was judged normal, its patches that are new to the memory
join it (:class:`OnlineFill`), within the bound ``memory.max_patches``."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from workers.memory.coreset import bound_memory, kcenter, random_projection
from workers.memory.params import MemoryParams
from workers.memory.rows import MemoryRows
from workers.memory.search import torch_module as _torch


class OnlineFill:
    """Adds normal frames' novel patches to ``rows``: with the coreset policy those farther than the coverage
    radius (k-center on a random projection; the memory is compacted to 90 % of the bound when over it), with
    the reservoir policy a uniform sample of all patches offered."""

    def __init__(self, rows: MemoryRows, params: MemoryParams):
        self.rows = rows
        self.params = params

    def add(self, feats, nn) -> int:
        """Add a normal frame's novel patches; returns how many rows were added."""
        torch = _torch()
        p = self.params
        n_max = max(1, int(round(p.frame_ratio * feats.shape[0])))
        if p.policy == "reservoir":
            rng = np.random.default_rng(p.seed + self.rows.seen)
            cand = rng.choice(feats.shape[0], n_max, replace=False)
            rows = feats[torch.from_numpy(np.sort(cand))].numpy()
            radius = nn[torch.from_numpy(np.sort(cand))].numpy()
            return self._reservoir_add(rows, radius, seen=feats.shape[0])
        proj = random_projection(feats.shape[1], p.projection_dim, p.seed)
        idx, radius = kcenter(feats, n_max, init_dist=nn, min_radius=self.rows.header.radius, proj=proj)
        rows = feats[torch.from_numpy(idx)].numpy() if len(idx) else np.zeros((0, feats.shape[1]), np.float32)
        self.rows.persist_append(rows, radius, seen=feats.shape[0])
        if self.rows.size > p.max_patches:
            self._compact()
        return len(idx)

    def _reservoir_add(self, rows: np.ndarray, radius: np.ndarray, seen: int) -> int:
        p, m = self.params, self.rows
        free = max(0, p.max_patches - m.size)
        head, rest = rows[:free], rows[free:]
        if len(head):
            m.persist_append(head, radius[:free], seen=len(head))
        if not len(rest):
            return len(head)
        rng = np.random.default_rng(p.seed + m.seen + 1)
        feats = m.feats.numpy().astype(np.float16)
        rad = m.radius.copy()
        replaced = 0
        for j in range(len(rest)):
            m.seen += 1
            slot = int(rng.integers(0, m.seen))
            if slot < p.max_patches:
                feats[slot] = rest[j]
                rad[slot] = radius[free + j]
                replaced += 1
        m.frames += 1
        m.rewrite(feats, rad, m.header)
        return len(head) + replaced

    def bound(self) -> None:
        """Compact the memory when rows added outside :meth:`add` (a taught frame) took it over the bound."""
        if self.rows.size > self.params.max_patches:
            self._compact()

    def _compact(self) -> None:
        p, m = self.params, self.rows
        target = int(0.9 * p.max_patches)
        feats = m.feats.numpy().astype(np.float16)
        owner = np.zeros(len(feats), np.int32)
        f, r, _, coverage = bound_memory(feats, m.radius, owner, m.header.radius, p, target=target)
        m.rewrite(f, r, replace(m.header, radius=coverage))
