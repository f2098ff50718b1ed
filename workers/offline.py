"""Detector construction for the offline tools (``lineinspect predict`` and ``lineinspect eval``).

Differences from the streaming worker (:func:`workers.pipeline.build_detector`):

- the normal memory comes from a folder (``--normal``, a category's ``train/good``) or from the inputs
  themselves (mutual, label-free scoring), not from the line's memory in Redis;
- eval runs several CPS settings on the same images. :class:`StageSession` builds one
  :class:`workers.pipeline.Detector` per setting, all sharing **one** SAM backend, **one** embedding cache and
  **one** memoising mapper (:class:`MapCache`), and :meth:`StageSession.prepare` computes the embedding and the
  anomaly map of an image once before the settings run, so those costs are paid and timed once.

``mapper_factory(settings, backend, normal_dir, images) -> AnomalyMapper`` replaces how the memory mapper is
built (tests, other memory kinds); the default is :func:`default_mapper_factory`.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from workers.interfaces import (
    AnomalyMap,
    AnomalyMapper,
    DecodeOutput,
    FrameDetector,
    ImageEmbedding,
    Prompts,
    SamBackend,
)

if TYPE_CHECKING:
    from config.settings import Settings
    from workers.sam import EmbeddingCache

MapperFactory = Callable[["Settings", SamBackend, "Path | None", Sequence[Path]], AnomalyMapper]


class MapCache:
    """An :class:`AnomalyMapper` that memoises ``inner.map`` by (embedding key, image size), LRU of ``capacity``.

    The key must identify the image content (eval and predict use the file path); ``seconds`` holds the time of
    the last real computation.
    """

    def __init__(self, inner: AnomalyMapper, capacity: int = 4):
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        self.inner = inner
        self.name = inner.name
        self.capacity = capacity
        self.hits = 0
        self.misses = 0
        self._items: OrderedDict[tuple[str, tuple[int, int]], AnomalyMap] = OrderedDict()
        self._lock = threading.Lock()

    def map(self, image_bgr: np.ndarray, embedding: ImageEmbedding) -> AnomalyMap:
        k = (embedding.key, tuple(image_bgr.shape[:2]))
        with self._lock:
            hit = self._items.get(k)
            if hit is not None:
                self._items.move_to_end(k)
                self.hits += 1
                return hit
        amap = self.inner.map(image_bgr, embedding)
        with self._lock:
            self.misses += 1
            self._items[k] = amap
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)
        return amap


class SharedEmbeddings:
    """A :class:`SamBackend` that computes each image's embedding once, whatever key it is asked under.

    Memory building (``memory:<name>``, ``mutual:<i>``) and inspection (the file path) use different keys
    for the same image; this cache is keyed by the image content (:func:`workers.sam.content_key`) and returns
    the cached embedding re-keyed to the caller's key (the feature array is shared, not copied).
    """

    def __init__(self, inner: SamBackend, capacity: int = 8):
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        self.inner = inner
        self.name = inner.name
        self.capacity = capacity
        self.computed = 0
        self.reused = 0
        self._items: OrderedDict[str, ImageEmbedding] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def weights(self) -> str:
        return str(getattr(self.inner, "weights", ""))

    def embed(self, image_bgr: np.ndarray, key: str) -> ImageEmbedding:
        from workers.sam import content_key

        ck = content_key(image_bgr)
        with self._lock:
            hit = self._items.get(ck)
            if hit is not None:
                self._items.move_to_end(ck)
                self.reused += 1
                return hit if hit.key == key else replace(hit, key=key)
        emb = self.inner.embed(image_bgr, key)
        with self._lock:
            self.computed += 1
            self._items[ck] = emb
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)
        return emb

    def decode(self, embedding: ImageEmbedding, prompts: Prompts) -> DecodeOutput:
        return self.inner.decode(embedding, prompts)


def build_backend(settings: Settings, embedding_cache: str = "") -> SamBackend:
    """The SAM backend of ``settings.sam``, loaded (raises :class:`stream.contracts.ModelLoadError`); with
    ``embedding_cache`` (a folder) its encoder outputs are kept on disk (:mod:`workers.disk_cache`)."""
    from workers.sam import build_sam_backend

    backend = build_sam_backend(settings.sam, taps=settings.sam_taps)
    if embedding_cache:
        from workers.disk_cache import DiskEmbeddings

        return DiskEmbeddings(backend, embedding_cache)
    return backend


def default_mapper_factory(settings: Settings, backend: SamBackend, normal_dir: Path | None,
                           images: Sequence[Path]) -> AnomalyMapper:
    """The memory mapper (:class:`workers.memory.MemoryMapper`): from the known-good images directly in
    ``normal_dir`` when given, else label-free from at most ``memory.label_free_refs`` of ``images`` spread
    over them (:mod:`workers.memory.label_free`; unreadable ones are left out here and reported when inspected)."""
    from tqdm import tqdm

    from workers.imageio import ImageReadError, read_image
    from workers.memory.label_free import pick_references
    from workers.memory.mapper import MemoryMapper
    from workers.memory.params import MemoryParams

    params = MemoryParams.from_settings(settings.memory, settings.detector.false_alarm_rate)
    overrides = {"image_threshold_override": settings.detector.image_threshold,
                 "pixel_threshold_override": settings.detector.pixel_threshold, "params": params}
    if normal_dir is not None:
        return MemoryMapper.from_folder(backend, normal_dir, settings.memory, **overrides)
    arrays = []
    for i in tqdm(pick_references(len(images), params.label_free_refs), desc="memory (label-free): references",
                  unit="img"):
        try:
            arrays.append(read_image(images[i]))
        except ImageReadError:
            continue
    params = replace(params, label_free_refs=max(len(arrays), 1))
    mapper = MemoryMapper.mutual(backend, arrays, settings.memory, **(overrides | {"params": params}))
    release_freed_memory("label-free memory built")
    return mapper


def _rss_mb() -> float:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def release_freed_memory(what: str) -> None:
    """Hand memory freed by a large transient computation back to the OS (glibc ``malloc_trim``).

    The label-free build allocates ~1.5 GB of patch features and distance matrices for its references and frees
    them, but glibc keeps most of the freed heap mapped: without this, predict's resident set stays ~1.2 GB above
    what it uses for the rest of the run. No-op where glibc is not the allocator."""
    import ctypes
    import logging

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    before = _rss_mb()
    libc.malloc_trim(0)
    logging.getLogger(__name__).info("%s: resident %.0f MB -> %.0f MB after malloc_trim", what, before, _rss_mb())


def build_mapper(settings: Settings, backend: SamBackend, normal_dir: Path | None, images: Sequence[Path],
                 mapper_factory: MapperFactory | None = None) -> AnomalyMapper:
    """The mapper of ``settings.detector.map_source`` (:func:`workers.mappers.build_mapper`) with the memory from
    a folder or mutual scoring."""
    from workers.mappers import build_mapper as build

    factory = mapper_factory or default_mapper_factory
    return build(settings, lambda: factory(settings, backend, normal_dir, images))


@dataclass
class StageSession:
    """Detectors for several CPS settings over one shared backend, embedding cache and map cache."""

    backend: SamBackend
    mapper: MapCache
    detectors: dict[int, FrameDetector]
    cache: EmbeddingCache | None
    models: dict[str, str] = field(default_factory=dict)

    @classmethod
    def build(cls, settings: Settings, stages: Sequence[int], backend: SamBackend | None = None,
              normal_dir: Path | None = None, mutual_images: Sequence[Path] = (), line: str = "offline",
              mapper_factory: MapperFactory | None = None, mapper: AnomalyMapper | None = None) -> StageSession:
        from workers.pipeline import Detector, DetectorConfig
        from workers.sam import EmbeddingCache

        backend = backend if backend is not None else build_backend(settings)
        if not isinstance(backend, SharedEmbeddings):
            # label-free: the reference images are embedded for the memory, then inspected: keep them
            n = min(len(mutual_images), settings.memory.label_free_refs) if normal_dir is None else 0
            backend = SharedEmbeddings(backend, capacity=max(settings.sam.cache_size, n + 2))
        if mapper is None:
            mapper = build_mapper(settings, backend, normal_dir, mutual_images, mapper_factory)
        cached = mapper if isinstance(mapper, MapCache) else MapCache(mapper)
        cache = EmbeddingCache(max(2, settings.sam.cache_size))
        detectors: dict[int, FrameDetector] = {}
        for s in stages:
            cfg = DetectorConfig.from_settings(settings.with_overrides(**{"detector.cps_stages": int(s)}))
            detectors[int(s)] = Detector(backend, cached, cfg, cache=cache)
        models = {"sam": backend.name, "map": mapper.name}
        weights = getattr(backend, "weights", None)
        if weights:
            models["sam_weights"] = str(weights)
        return cls(backend=backend, mapper=cached, detectors=detectors, cache=cache, models=models)

    def prepare(self, image_bgr: np.ndarray, key: str) -> float:
        """Compute (and cache) the image's embedding and anomaly map; returns the seconds it took."""
        t0 = time.perf_counter()
        emb = self.cache.get_or_embed(self.backend, image_bgr, key)
        self.mapper.map(image_bgr, emb)
        return time.perf_counter() - t0

    def close(self) -> None:
        """Drop the detectors and their cached embeddings and maps (the backend stays loaded for reuse)."""
        self.detectors.clear()
        self.cache = None


@dataclass(frozen=True)
class OfflineDetector:
    detector: FrameDetector
    backend: SamBackend
    mapper: AnomalyMapper


def build_offline_detector(settings: Settings, line: str = "offline", normal_dir: Path | None = None,
                           mutual_images: Sequence[Path] = (), mapper_factory: MapperFactory | None = None,
                           backend: SamBackend | None = None) -> OfflineDetector:
    """One detector at ``settings.detector.cps_stages`` (predict)."""
    stage = settings.detector.cps_stages
    session = StageSession.build(settings, (stage,), backend=backend, normal_dir=normal_dir,
                                 mutual_images=mutual_images, line=line, mapper_factory=mapper_factory)
    return OfflineDetector(detector=session.detectors[stage], backend=session.backend, mapper=session.mapper.inner)
