"""The map-source registry: the one place that builds the anomaly mapper of ``detector.map_source``.

The streaming worker (:func:`workers.pipeline.build_detector`) and the offline tools
(:mod:`workers.offline`: ``predict``, ``eval``) build their mapper here; they differ only in where the
line's normal memory comes from (Redis, a folder, or the inputs themselves), which they hand in as
``memory``, a function that builds the memory mapper when the map source needs one.

| ``map_source`` | mapper |
|---|---|
| ``memory`` | ``memory()`` |
| ``clip`` | :func:`workers.clip.build_clip_mapper`, with the raw-unit threshold overrides of ``detector`` |
| ``fusion`` | :class:`FusionMapper` of both (CLIP keeps its own 0.5 probability thresholds: ``detector``'s
  overrides are memory's raw units there) |
| ``none`` | :class:`ZeroMapper` |
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import cv2
import numpy as np

from stream.contracts import ModelLoadError
from workers.interfaces import AnomalyMap, AnomalyMapper, ImageEmbedding

if TYPE_CHECKING:
    from config.settings import DetectorSettings, Settings

MAP_SOURCES = ("memory", "clip", "fusion", "none")


class ZeroMapper:
    """``map_source = none``: an all-zero map (tests, SAM plumbing checks). Never flags a frame."""

    name = "none"

    def map(self, image_bgr: np.ndarray, embedding: ImageEmbedding) -> AnomalyMap:
        h, w = image_bgr.shape[:2]
        return AnomalyMap(pixel=np.zeros((h, w), np.float32), image_score=0.0)


class FusionMapper:
    """``w * clip + (1 - w) * memory`` on normalised maps and image scores; either mapper alone works."""

    def __init__(self, clip: AnomalyMapper | None, memory: AnomalyMapper | None, weight_clip: float = 0.5):
        if clip is None and memory is None:
            raise ValueError("FusionMapper needs at least one of clip, memory")
        if not 0.0 <= weight_clip <= 1.0:
            raise ValueError("weight_clip must be in 0..1")
        self.clip, self.memory, self.weight_clip = clip, memory, weight_clip
        parts = [f"{weight_clip:g}*{clip.name}" if clip else "", f"{1 - weight_clip:g}*{memory.name}" if memory else ""]
        self.name = "fusion[" + "+".join(p for p in parts if p) + "]"
        self._last_memory_map: tuple[str, AnomalyMap] | None = None

    def observe(self, embedding: ImageEmbedding, anomaly_map: AnomalyMap) -> bool:
        """Online fill goes to the memory part (with the memory's own map when both parts run)."""
        observe = getattr(self.memory, "observe", None)
        if observe is None:
            return False
        last = self._last_memory_map
        if last is not None and last[0] == embedding.key:
            anomaly_map = last[1]
        return bool(observe(embedding, anomaly_map))

    def map(self, image_bgr: np.ndarray, embedding: ImageEmbedding) -> AnomalyMap:
        if self.clip is None or self.memory is None:
            only = self.clip or self.memory
            assert only is not None
            return only.map(image_bgr, embedding)
        a = self.clip.map(image_bgr, embedding)
        b = self.memory.map(image_bgr, embedding)
        self._last_memory_map = (embedding.key, b)
        w = self.weight_clip
        pb = b.pixel
        if pb.shape != a.pixel.shape:
            pb = cv2.resize(pb, (a.pixel.shape[1], a.pixel.shape[0]), interpolation=cv2.INTER_LINEAR)
        timings = {f"clip.{k}": v for k, v in a.timings.items()} | {f"memory.{k}": v for k, v in b.timings.items()}
        return AnomalyMap(pixel=(w * a.pixel + (1 - w) * pb).astype(np.float32),
                          image_score=float(w * a.image_score + (1 - w) * b.image_score), timings=timings)


def clip_thresholds(detector: DetectorSettings) -> dict[str, float]:
    """The raw-unit threshold overrides (``detector.image_threshold`` / ``pixel_threshold`` > 0) that the CLIP
    mapper takes: only when CLIP is the one map (with ``fusion`` they are the memory's units)."""
    if detector.map_source != "clip":
        return {}
    return {k: v for k, v in (("pixel_threshold", detector.pixel_threshold),
                              ("image_threshold", detector.image_threshold)) if v > 0}


def build_mapper(settings: Settings, memory: Callable[[], AnomalyMapper]) -> AnomalyMapper:
    """The anomaly mapper named by ``settings.detector.map_source``; ``memory()`` builds the memory mapper and is
    called only when the source uses it (memory, fusion). CLIP modules are imported only when used."""
    d = settings.detector
    if d.map_source not in MAP_SOURCES:
        raise ModelLoadError(f"unknown detector.map_source {d.map_source!r} (allowed: {', '.join(MAP_SOURCES)})")
    if d.map_source == "none":
        return ZeroMapper()
    memory_mapper = memory() if d.uses_memory else None
    clip_mapper = None
    if d.uses_clip:
        from workers.clip import build_clip_mapper

        clip_mapper = build_clip_mapper(settings.clip, **clip_thresholds(d))
    if d.map_source == "fusion":
        return FusionMapper(clip=clip_mapper, memory=memory_mapper, weight_clip=d.fusion_weight_clip)
    mapper = memory_mapper if d.uses_memory else clip_mapper
    assert mapper is not None
    return mapper
