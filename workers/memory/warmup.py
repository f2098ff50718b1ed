"""Warm-up: a line with no stored memory and ``memory.fill`` online starts empty. Each frame is scored against
the other buffered frames (mutual scoring: the mean of the lowest ``mutual_fraction`` of its per-frame nearest
distances, so a defect seen in one frame stands out), with provisional thresholds from the buffered frames'
own maxima; once ``memory.warmup_frames`` frames are buffered they become the label-free memory
(:mod:`workers.memory.label_free`, :meth:`workers.memory.mapper.MemoryMapper.observe`)."""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from workers.interfaces import ImageEmbedding
from workers.memory.coreset import kcenter, random_projection
from workers.memory.params import MemoryParams
from workers.memory.search import torch_module as _torch


class Buffered(NamedTuple):
    feats: Any  # torch [gh*gw, C] patch features
    embedding: ImageEmbedding
    max: float  # provisional raw maximum of its mutual map
    quantile: float  # its pixel_quantile
    reference: Any  # its coreset: what the frames after it are compared with


class Warmup:
    def __init__(self, params: MemoryParams):
        self.params = params
        self.buffer: list[Buffered] = []

    def clear(self) -> None:
        self.buffer.clear()

    def references(self) -> list[Any]:
        """The buffered frames' coresets, what a frame is scored against during the warm-up."""
        return [b.reference for b in self.buffer]

    def add(self, feats, embedding: ImageEmbedding, raw: np.ndarray | None) -> bool:
        """Buffer a scored frame (``raw``: its mutual map, None for the first frame); True once enough frames
        are buffered to build the memory."""
        mx = float(raw.max()) if raw is not None else 0.0
        pq = float(np.quantile(raw, self.params.pixel_quantile)) if raw is not None else 0.0
        self.buffer.append(Buffered(feats, embedding, mx, pq, self._reference(feats)))
        return len(self.buffer) >= self.params.warmup_frames

    def _reference(self, feats):
        """A frame's coreset (2 x frame_ratio of its patches), what other frames are compared with in warm-up."""
        torch = _torch()
        proj = random_projection(feats.shape[1], self.params.projection_dim, self.params.seed)
        idx, _ = kcenter(feats, max(1, int(round(2 * self.params.frame_ratio * feats.shape[0]))), proj=proj,
                         seed=self.params.seed + len(self.buffer))
        return feats[torch.from_numpy(idx)]

    def thresholds(self) -> tuple[float, float] | None:
        """Provisional raw (image, pixel) thresholds from the buffered frames' own mutual maxima; None while
        fewer than three frames have a map."""
        maxima = [b.max for b in self.buffer if b.max > 0]
        if len(maxima) < 3:
            return None
        img = float(np.quantile(maxima, self.params.calibration_quantile))
        pix = float(np.median([b.quantile for b in self.buffer if b.quantile > 0]))
        return img, pix
