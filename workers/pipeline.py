"""The detector: SAM embedding -> anomaly map -> PPG -> CPS per region -> fusion -> Detection.

``Detector.inspect(image_bgr, key)`` for one frame:

1. ``sam_encode``: the SAM embedding, through an :class:`workers.sam.EmbeddingCache` keyed by the frame id
   (or the image's content hash when ``key`` is empty): the encoder runs once per frame, however many regions
   and decoder passes follow, and a frame inspected again (redelivery, eval passes) is not re-encoded.
2. ``map``: ``mapper.map(image, embedding)`` -> normalised pixel map (1.0 = pixel threshold) and image score.
3. ``ppg``: point prompts per anomalous region (:mod:`workers.ppg`). A region is the connected part of the map
   above the pixel threshold (1.0); it is prompted only when its peak reaches the map's ``seed_level`` (the
   memory map: image threshold / pixel threshold, i.e. the region alone could make the frame defective), so
   that texture noise just over the pixel threshold is never published.
4. ``cps1..3``: the cascade per region (:mod:`workers.cps`); a decoder mask is accepted only when it agrees
   with the map (``detector.mask``: bounded area, mostly where the map is high), else an earlier pass or the
   map region stands; the masks are unioned into ``sam_mask``. With ``detector.cps_stages = 0`` no decoder
   runs and ``sam_mask`` is the seeded map regions. A frame made defective by the memory map's wide reading
   alone (a change over a large share of the frame, ``AnomalyMap.wide_alone``) adds that share of the frame
   (:func:`wide_region`): no prompt set outlines it, and a DEFECT verdict must show what made it. With
   ``detector.mask.extent = area`` the share is added whenever that reading is over the threshold
   (``AnomalyMap.wide_level`` > 0), also beside compact regions: a product whose defects are surfaces. A
   DEFECT frame none of whose regions crosses the pixel threshold (a thin crack on a textured surface) has its
   hottest region prompted once more, cut at :data:`OUTLINE_PEAK_SHARE` of the map's peak
   (:func:`outline_level`).
5. ``fuse``: the fused score map, the labels and the verdict.
6. ``memory_update`` (streaming worker with ``memory.fill`` containing ``online`` only): the frame is offered
   to the memory mapper's ``observe(embedding, anomaly_map)`` (online fill / warm-up; the memory module
   decides whether to keep it). A failure there is logged and does not fail the frame.

Timings (seconds): always "sam_encode", "map", "ppg", "cps1", "cps2", "cps3", "fuse" (0.0 for a stage that did
not run; the cps keys are summed over regions); the mapper's own sub-stages as "map.<name>"; "memory_update"
when online fill runs.

Fusion rule (kept monotone in the anomaly map so pixel AUROC / AP stay meaningful)::

    score_map = map * (1 + mask_boost * sam_mask)

``map`` is the normalised anomaly map (>= 0), ``sam_mask`` in {0, 1}: inside a SAM mask a pixel's score is
raised by the factor ``1 + mask_boost``, outside it is the map unchanged. Ranking within and outside the masks
follows the map, SAM only lifts the pixels it segmented; with ``mask_boost = 0`` the map is returned as is.

Image score and verdict: the image score is the mapper's image score (``AnomalyMap.image_score``, already
normalised so that 1.0 is the image threshold) and the verdict is DEFECT when it is > 1.0. The threshold
overrides ``detector.image_threshold`` / ``pixel_threshold`` (> 0, in the mapper's raw units) are applied by
the mappers, not here, so nothing is normalised twice: the memory mapper reads them from the settings,
:func:`workers.mappers.build_mapper` passes them to the CLIP mapper when ``map_source = clip`` (with ``fusion``
they are memory's raw units and CLIP keeps its own 0.5 probability thresholds). The mask boost never moves the image
decision, since boosted values have no calibrated threshold.

Labels: the connected components of the union mask (components smaller than ``ppg.min_region_area`` of the
image are dropped), numbered 1..n by decreasing score; each is a :class:`stream.contracts.Defect` with its
box (inclusive-exclusive), area and the max fused score inside. Labels and defects are reported only for a
DEFECT verdict (an OK frame has an empty label mask); the score map is always returned.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

from stream.contracts import Defect, Verdict
from workers.cps import PASS_KEYS, MaskCheck, cascade
from workers.interfaces import AnomalyMap, AnomalyMapper, Detection, ImageEmbedding, SamBackend
from workers.mappers import build_mapper
from workers.ppg import RegionPrompts, generate_prompts, min_area_pixels
from workers.sam import EmbeddingCache, build_sam_backend, content_key

if TYPE_CHECKING:
    from config.settings import PpgSettings, Settings

log = logging.getLogger(__name__)

TIMING_KEYS = ("sam_encode", "map", "ppg", *PASS_KEYS, "fuse")


# ------------------------------------------------------------------------------------------ detector


@dataclass(frozen=True)
class DetectorConfig:
    """The detector's knobs, taken from ``settings.detector`` (see config/settings.py)."""

    ppg: PpgSettings
    cps_stages: int = 3
    mask_boost: float = 1.0
    mask_check: MaskCheck | None = MaskCheck()  # when a decoder mask is published (None: any non-empty mask)
    online_fill: bool = False  # offer each frame to mapper.observe (set by build_detector for the worker)
    extent: str = "auto"  # detector.mask.extent: when the wide reading's area is published (wide_region)

    def __post_init__(self) -> None:
        if self.cps_stages not in (0, 1, 2, 3):
            raise ValueError(f"cps_stages must be 0..3, got {self.cps_stages}")
        if self.mask_boost < 0:
            raise ValueError(f"mask_boost must be >= 0, got {self.mask_boost}")

    @classmethod
    def from_settings(cls, settings: Settings) -> DetectorConfig:
        d = settings.detector
        check = MaskCheck(max_area_ratio=d.mask.max_area_ratio, min_support=d.mask.min_support,
                          support_level=d.mask.support_level)
        return cls(ppg=d.ppg, cps_stages=d.cps_stages, mask_boost=d.mask_boost, mask_check=check,
                   extent=d.mask.extent)


@dataclass
class _Trace:
    """Intermediate results of the last ``inspect`` (for diagnostics and tests; not thread-shared)."""

    regions: tuple[RegionPrompts, ...] = ()
    stages_used: tuple[int, ...] = ()
    passes: tuple[int, ...] = ()  # decoder calls per region
    anomaly_map: AnomalyMap | None = None


class Detector:
    """Implements :class:`workers.interfaces.FrameDetector`. Build it with :func:`build_detector`."""

    def __init__(self, sam: SamBackend, mapper: AnomalyMapper, config: DetectorConfig,
                 cache: EmbeddingCache | None = None):
        self.sam = sam
        self.mapper = mapper
        self.config = config
        self.cache = cache if cache is not None else EmbeddingCache(8)
        self.last = _Trace()

    @property
    def models(self) -> dict[str, str]:
        return {"sam": self.sam.name, "map": self.mapper.name}

    def embed(self, image_bgr: np.ndarray, key: str = "") -> ImageEmbedding:
        """The frame's SAM embedding through the cache (memory filling can share it)."""
        return self.cache.get_or_embed(self.sam, image_bgr, key)

    def embed_batch(self, images_bgr: list[np.ndarray], keys: list[str]) -> int:
        """Embed several frames in one encoder call (:meth:`workers.sam.EmbeddingCache.embed_missing`) so that
        their :meth:`inspect` calls find them cached; the number embedded. The worker calls it with
        ``worker.encoder_batch`` frames when the encoder runs on a GPU."""
        keys = [key or content_key(im) for im, key in zip(images_bgr, keys, strict=True)]
        return self.cache.embed_missing(self.sam, images_bgr, keys)

    def inspect(self, image_bgr: np.ndarray, key: str) -> Detection:
        timings = dict.fromkeys(TIMING_KEYS, 0.0)
        h, w = image_bgr.shape[:2]

        t0 = time.perf_counter()
        embedding = self.embed(image_bgr, key)
        timings["sam_encode"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        amap = self.mapper.map(image_bgr, embedding)
        timings["map"] = time.perf_counter() - t0
        timings.update({f"map.{k}": float(v) for k, v in amap.timings.items()})  # sub-stages of "map"
        pixel = np.asarray(amap.pixel, dtype=np.float32)
        if pixel.shape != (h, w):
            pixel = cv2.resize(pixel, (w, h), interpolation=cv2.INTER_LINEAR)
        pixel = np.maximum(np.nan_to_num(pixel, nan=0.0, posinf=np.finfo(np.float32).max, neginf=0.0), 0.0)

        image_score = float(amap.image_score)
        verdict = Verdict.DEFECT if image_score > 1.0 else Verdict.OK
        union, trace = self._outline(pixel, embedding, self.config.ppg, amap.seed_level, timings)
        if verdict is Verdict.DEFECT and not union.any() and not amap.wide_alone:
            # the region that made the verdict stays under the pixel threshold: outline it at its own level
            level = outline_level(pixel, amap.seed_level)
            if 0 < level < self.config.ppg.threshold:
                union, trace = self._outline(pixel, embedding, replace(self.config.ppg, threshold=level),
                                             amap.seed_level, timings, max_regions=1)

        t0 = time.perf_counter()
        if verdict is Verdict.DEFECT and amap.wide_level > 0 and (amap.wide_alone or self.config.extent == "area"):
            union |= wide_region(pixel, amap.wide_level, self.config.ppg.min_region_area)
        boost = float(self.config.mask_boost)
        score_map = pixel * (1.0 + boost * union.astype(np.float32)) if boost else pixel
        if verdict is Verdict.DEFECT:
            labels, defects = label_defects(union, score_map, self.config.ppg.min_region_area)
        else:
            labels, defects = np.zeros((h, w), dtype=np.uint8), ()
        timings["fuse"] = time.perf_counter() - t0

        if self.config.online_fill:
            t0 = time.perf_counter()
            self._observe(embedding, amap)
            timings["memory_update"] = time.perf_counter() - t0

        self.last = replace(trace, anomaly_map=amap)
        return Detection(image_score=image_score, verdict=verdict, score_map=score_map.astype(np.float32),
                         labels=labels, defects=defects, timings=timings, models=self.models)

    def _outline(self, pixel: np.ndarray, embedding: ImageEmbedding, ppg: PpgSettings, seed_level: float,
                 timings: dict[str, float], max_regions: int | None = None) -> tuple[np.ndarray, _Trace]:
        """Steps 3-4: the union of the seeded regions' masks (the map regions with ``cps_stages`` 0, else the
        cascade's) and its trace (prompts, passes); the decoder's timings are added to ``timings``.
        ``max_regions``: at most this many regions (default: ``ppg.max_regions`` prompted, every seeded map
        region without the decoder)."""
        if self.config.cps_stages == 0:
            return map_regions(pixel, ppg, seed_level, max_regions or MAP_REGIONS), _Trace()
        t0 = time.perf_counter()
        regions = generate_prompts(pixel, embedding, ppg if max_regions is None else replace(ppg, max_regions=max_regions),
                                   seed_level)
        timings["ppg"] += time.perf_counter() - t0
        union = np.zeros(pixel.shape, dtype=bool)
        stages_used, passes = [], []
        for region in regions:
            res = cascade(self.sam, embedding, region, self.config.cps_stages, pixel, self.config.mask_check)
            union |= res.mask
            stages_used.append(res.stage)
            passes.append(res.passes)
            for k, v in res.timings.items():
                timings[k] += v
        return union, _Trace(regions=regions, stages_used=tuple(stages_used), passes=tuple(passes))

    def _observe(self, embedding: ImageEmbedding, amap: AnomalyMap) -> None:
        observe = getattr(self.mapper, "observe", None)
        if observe is None:
            return
        try:
            observe(embedding, amap)
        except Exception as exc:  # the frame's result stands; a memory update failing must not drop it
            log.warning("online memory update failed for %s: %s: %s", embedding.key, type(exc).__name__, exc)


# a DEFECT frame whose regions all stay under the pixel threshold is outlined where the map reaches this share of
# its peak: near the peak, so that a thin crack on a textured surface gives its own outline, not the texture's
# (commutator, train/good, 60 images, CPS stage 3: at 0.9 of the peak mask F1 34.6 -> 41.0, flagged defects
# without a mask 38.1 -> 0 %; at 0.8 mask F1 24.7 and at the seed level 15.8, the masks spread over the texture;
# docs/method.md, 3c)
OUTLINE_PEAK_SHARE = 0.9


def outline_level(pixel: np.ndarray, seed_level: float) -> float:
    """The level a DEFECT frame's hottest region is outlined at when no region crosses the pixel threshold:
    :data:`OUTLINE_PEAK_SHARE` of the map's peak, at least the seed level (0.0 on an empty map)."""
    peak = float(pixel.max()) if pixel.size else 0.0
    return max(OUTLINE_PEAK_SHARE * peak, float(seed_level)) if peak > 0 else 0.0


MAP_REGIONS = 100  # the map's own mask (no decoder) keeps up to this many seeded regions


def map_regions(pixel: np.ndarray, ppg: PpgSettings, seed_level: float, max_regions: int = MAP_REGIONS
                ) -> np.ndarray:
    """The map's own mask (no decoder): its (up to ``max_regions``, highest peak first) regions above
    ``ppg.threshold`` whose peak reaches ``seed_level``."""
    from workers.ppg import extreme_regions

    mask = np.zeros(pixel.shape, dtype=bool)
    for region in extreme_regions(pixel, replace(ppg, max_regions=max_regions), seed_level)[1]:
        mask |= region
    return mask


WIDE_COHERENT_SHARE = 0.5  # a wide region is published when its largest part holds at least this share of it


def wide_region(pixel: np.ndarray, level: float, min_area_frac: float) -> np.ndarray:
    """The share of the frame that made it defective by the wide reading: the pixels at or above ``level``
    (:attr:`AnomalyMap.wide_level`) in connected parts of at least ``min_area_frac`` of the frame, when they
    form a coherent area (the largest part holds :data:`WIDE_COHERENT_SHARE` of them: rust over a plate, a
    stain); pixels scattered over a textured surface outline nothing and are not published (the verdict
    stands). Measured on the shared sets (`docs/method.md`, 3c): the wide-only defects' largest parts held
    0.61-0.90 of their wide area, a good commutator frame's 0.35 in 13 parts."""
    n, lab, stats, _ = cv2.connectedComponentsWithStats((pixel >= level).astype(np.uint8), connectivity=8)
    area = stats[:, cv2.CC_STAT_AREA].astype(np.int64)
    keep = np.zeros(n, dtype=bool)
    keep[1:] = area[1:] >= min_area_pixels(min_area_frac, pixel.size)
    if not keep.any() or area[keep].max() < WIDE_COHERENT_SHARE * area[keep].sum():
        return np.zeros(pixel.shape, dtype=bool)
    return keep[lab]


def label_defects(mask: np.ndarray, score_map: np.ndarray,
                  min_area_frac: float = 0.0) -> tuple[np.ndarray, tuple[Defect, ...]]:
    """Connected components of ``mask`` -> (label image, defects numbered 1..n by decreasing max score)."""
    n, lab, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    min_area = min_area_pixels(min_area_frac, mask.size)
    found = []
    for i in range(1, n):
        x, y, bw, bh, area = (int(v) for v in stats[i])
        if area < min_area:
            continue
        window = (slice(y, y + bh), slice(x, x + bw))
        found.append((float(score_map[window][lab[window] == i].max()), i, (x, y, x + bw, y + bh), area))
    found.sort(key=lambda f: -f[0])
    dtype = np.uint8 if len(found) <= 255 else np.uint16
    lut = np.zeros(n, dtype=dtype)
    defects = []
    for new, (score, old, box, area) in enumerate(found, start=1):
        lut[old] = new
        defects.append(Defect(label=new, box=box, area=area, score=score))
    return lut[lab], tuple(defects)


# ------------------------------------------------------------------------------------------ factory


def build_detector(settings: Settings, line: str, redis_client: Any = None,
                   mapper: AnomalyMapper | None = None) -> Detector:
    """Load SAM (``settings.sam``) and the mapper (``settings.detector.map_source`` with the line's memory from
    Redis, or ``mapper``)."""
    sam = build_sam_backend(settings.sam, taps=settings.sam_taps)

    def line_memory() -> AnomalyMapper:
        from workers.memory.mapper import load_line_memory

        return load_line_memory(settings, line, redis_client, sam)

    injected = mapper is not None
    if mapper is None:
        mapper = build_mapper(settings, line_memory)
    log.info("detector for line %s: map source=%s (%s), SAM %s backend=%s weights=%s, cps_stages=%d",
             line, "injected" if injected else settings.detector.map_source, mapper.name, sam.name,
             settings.sam.backend,
             getattr(sam, "weights", "?"), settings.detector.cps_stages)
    config = DetectorConfig.from_settings(settings)
    online = "online" in settings.memory.fill and not injected and settings.detector.uses_memory
    config = replace(config, online_fill=online)
    return Detector(sam, mapper, config, cache=EmbeddingCache(settings.sam.cache_size))

