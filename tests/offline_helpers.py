"""Helpers for the predict/eval tests: a small but real anomaly mapper on real SAM embeddings.

:class:`NearestEmbeddingMapper` is a tiny memory: for each location of the 64 x 64 SAM embedding grid, the
distance of the test feature to the nearest normal feature at the same location, upsampled to the image and
normalised by the largest such distance seen between the normal images themselves (leave-one-out), so 1.0
is "as far as the most unusual normal patch". It stands in for workers.memory (cheap: a handful of normal
images) so that the offline tools can be tested without waiting for a full memory build.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from workers.imageio import ImageReadError, read_image
from workers.interfaces import AnomalyMap, ImageEmbedding, SamBackend


def _grid(emb: ImageEmbedding) -> np.ndarray:
    """The valid (non-padding) part of the embedding grid, L2-normalised per location: [h, w, C]."""
    h, w = emb.input_size
    gh, gw = max(1, int(np.ceil(h / 16))), max(1, int(np.ceil(w / 16)))
    f = emb.features[:, :gh, :gw].transpose(1, 2, 0)
    return f / (np.linalg.norm(f, axis=2, keepdims=True) + 1e-6)


class NearestEmbeddingMapper:
    name = "test-nearest-embedding"

    def __init__(self, normal_grids: Sequence[np.ndarray]):
        if len(normal_grids) < 2:
            raise ValueError("need at least two normal images")
        self.normals = list(normal_grids)
        loo = []
        for i, g in enumerate(self.normals):
            others = [n for j, n in enumerate(self.normals) if j != i]
            if others:
                loo.append(self._dist(g, others).max())
        self.scale = float(max(loo)) if loo else 1.0

    @staticmethod
    def _dist(g: np.ndarray, normals: Sequence[np.ndarray]) -> np.ndarray:
        h, w = g.shape[:2]
        d = [np.linalg.norm(g - (n if n.shape == g.shape else cv2.resize(n, (w, h))), axis=2) for n in normals]
        return np.min(np.stack(d), axis=0)

    @classmethod
    def from_paths(cls, backend: SamBackend, paths: Sequence[Path]) -> NearestEmbeddingMapper:
        return cls([_grid(backend.embed(read_image(p), f"normal:{p}")) for p in paths])

    def map(self, image_bgr: np.ndarray, embedding: ImageEmbedding) -> AnomalyMap:
        d = self._dist(_grid(embedding), self.normals) / self.scale
        h, w = image_bgr.shape[:2]
        pixel = cv2.resize(d.astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR)
        return AnomalyMap(pixel=pixel, image_score=float(d.max()), raw=d.astype(np.float32))


class CountingBackend:
    """Delegates to a real backend and counts the calls (to check that embeddings are computed once)."""

    def __init__(self, inner: SamBackend):
        self.inner = inner
        self.name = inner.name
        self.embeds: list[str] = []
        self.decodes = 0

    def embed(self, image_bgr, key):
        self.embeds.append(key)
        return self.inner.embed(image_bgr, key)

    def decode(self, embedding, prompts):
        self.decodes += 1
        return self.inner.decode(embedding, prompts)


def nearest_factory(n_normal: int = 2, calls: list | None = None):
    """A mapper_factory for workers.offline: the first ``n_normal`` normal images (or inputs when mutual)."""

    def factory(settings, backend, normal_dir, images):
        if calls is not None:
            calls.append((normal_dir, len(images)))
        if normal_dir is not None:
            paths = sorted(p for p in Path(normal_dir).iterdir() if p.suffix.lower() in (".png", ".jpg"))
        else:  # mutual: the inputs themselves, unreadable ones left out
            paths = []
            for p in images:
                try:
                    read_image(p)
                except ImageReadError:
                    continue
                paths.append(p)
        return NearestEmbeddingMapper.from_paths(backend, paths[:n_normal])

    return factory
