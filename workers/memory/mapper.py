"""The memory map: :class:`MemoryMapper` on a line's memory of normal patches, and a worker's mapper.

Filling (``memory.fill``):
- folder: ``lineinspect memory add LINE DIR`` (known-good images) -> :meth:`MemoryMapper.from_folder`;
- online: :meth:`MemoryMapper.observe` after each frame adds a frame whose image score is below
  ``memory.online_margin`` (normalised, i.e. margin x the image threshold), only its patches that are farther
  than the coverage radius from the memory. With an empty memory the mapper starts in *warm-up*: frames are
  scored against the other buffered frames (mutual scoring, the mean of the lowest 30 % of per-frame
  nearest distances, so a defect seen in one frame stands out) and, once ``memory.warmup_frames`` frames are
  buffered, they become the label-free memory (:mod:`workers.memory.label_free`: suspect patches stay out, however
  many of the frames are defective); :meth:`MemoryMapper.mutual` does the same on a list of images.
  Every OK frame's raw image score also joins the line's held-out window that re-estimates the image
  threshold.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from workers.interfaces import AnomalyMap, ImageEmbedding, SamBackend
from workers.memory.calibration import Calibration, ImageThreshold, calibrate, leave_one_out_maps
from workers.memory.coreset import BuiltMemory, bound_memory, build_memory
from workers.memory.features import (
    FeaturesFn,
    patch_features,
    raw_to_image,
    sam_source,
    torch_bool,
)
from workers.memory.folder import embed_all, load_images
from workers.memory.image_score import ImageScoreRule
from workers.memory.label_free import BatchFrames, build_label_free, interval_scores, pick_references
from workers.memory.online import OnlineFill
from workers.memory.params import MemoryParams
from workers.memory.rows import MemoryRows
from workers.memory.search import knn_distance
from workers.memory.store import (
    MemoryHeader,
    MemoryMismatchError,
    MemoryMissingError,
    RedisMemoryStore,
    StoredMemory,
)
from workers.memory.warmup import Warmup

if TYPE_CHECKING:
    from config.settings import MemorySettings, Settings

log = logging.getLogger(__name__)



class MemoryMapper:
    """:class:`workers.interfaces.AnomalyMapper` on a per-line memory of normal patches.

    Construction does not touch Redis or models; :func:`load_line_memory` / :meth:`from_folder` /
    :meth:`mutual` build usable mappers. Not thread-safe: one per worker process. The memory itself is
    :attr:`rows` (:class:`~workers.memory.rows.MemoryRows`, synced with the store, with the held-out window);
    :attr:`warmup` buffers frames while there is none; :attr:`online` adds normal frames' novel patches.
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
        # warm-up (empty memory, online fill): buffered frames and their provisional raw maxima
        self.warmup = Warmup(self.params)
        self.rows = MemoryRows(source, self.params, store, on_set=self.warmup.clear)
        self.online = OnlineFill(self.rows, self.params)
        # a label-free batch's frames, scored without their own rows (workers.memory.label_free)
        self.batch: BatchFrames | None = None
        self._last: tuple[str, Any, Any, tuple[int, int]] | None = None  # key, feats, nn dist, grid
        self._rule: tuple[MemoryHeader, ImageScoreRule] | None = None  # (header, its rule): see _score_rule

    # -------------------------------------------------------------------------------- state
    @property
    def header(self) -> MemoryHeader | None:
        return self.rows.header

    @property
    def frames(self) -> int:
        return self.rows.frames

    @property
    def size(self) -> int:
        return self.rows.size

    @property
    def warming_up(self) -> bool:
        return self.header is None

    @property
    def image_threshold(self) -> float:
        if self.image_threshold_override > 0:
            return self.image_threshold_override
        if self.header is None:
            return 0.0
        return self.rows.held_out.threshold(self.header)

    def threshold_estimate(self) -> ImageThreshold:
        """The image threshold from the calibration frames' maxima plus the held-out normal frames' maxima."""
        return self.rows.held_out.estimate(self.header)

    @property
    def pixel_threshold(self) -> float:
        if self.pixel_threshold_override > 0:
            return self.pixel_threshold_override
        return self.header.pixel_threshold if self.header else 0.0

    def memory_bytes(self) -> bytes:
        """The memory rows as stored (float16 bytes)."""
        return self.rows.memory_bytes()

    def adopt(self, stored: StoredMemory) -> None:
        """Use a stored memory (after checking that it was built from the same kind of features)."""
        self.rows.adopt(stored)

    def reload(self) -> bool:
        """Pick up other workers' additions or rewrites and the line's held-out maxima; True if it changed."""
        return self.rows.reload()

    def save(self) -> MemoryHeader:
        """Write the whole memory to the store (a new generation)."""
        return self.rows.save()

    def save_over(self, expect_generation: int | None) -> MemoryHeader:
        """Write the whole memory to the store over its generation ``expect_generation`` (None: only if the line
        has no memory); :class:`~workers.memory.store.MemoryConflict` when another one is stored now."""
        return self.rows.save_over(expect_generation)

    def _new_header(self, dim: int, coverage: float, cal: Calibration) -> MemoryHeader:
        return MemoryHeader(source=self.source, dim=int(dim), neighbourhood=self.params.neighbourhood,
                            norm=self.params.norm, policy=self.params.policy,
                            max_patches=self.params.max_patches, radius=float(coverage),
                            image_threshold=cal.image_threshold, pixel_threshold=cal.pixel_threshold,
                            calibration={"quantile": self.params.calibration_quantile,
                                         "pixel_quantile": self.params.pixel_quantile, "frames": cal.frames,
                                         "image_sigma": self.params.image_sigma,
                                         "image_score": cal.score_rule.as_dict(),
                                         "method": cal.method, "image_maxima": list(cal.image_maxima)})


    # -------------------------------------------------------------------------------- building
    def _features(self, image_bgr: np.ndarray | None, embedding: ImageEmbedding):
        if self.features_fn is not None:
            embedding = self.features_fn(image_bgr, embedding)
        return self._patch_features(embedding), embedding

    def _patch_features(self, embedding: ImageEmbedding):
        """The frame's patch features, computed where the memory is searched (``memory.device``)."""
        return patch_features(embedding, self.params.neighbourhood, self.params.norm, self.params.layers,
                              device=self.rows.search.device)


    def _features_of(self, image_bgr: np.ndarray | None, embedding: ImageEmbedding):
        """The frame's patch features and each patch's nearest-row distance as its last :meth:`map` left them
        (the distance None when that map had nothing to compare with), else its features computed now and
        None."""
        if self._last is not None and self._last[0] == embedding.key:
            return self._last[1], self._last[2]
        (feats, _), _ = self._features(image_bgr, embedding)
        return feats, None

    def nearest_rows(self, image_bgr: np.ndarray | None, embedding: ImageEmbedding):
        """The frame's patch features as the memory compares them (torch float32 [n, C]) and each patch's
        distance to its nearest memory row [n]. After :meth:`map` of the same frame both come from that call
        (with ``memory.k`` 1) instead of a second feature pass and search."""
        feats, nn = self._features_of(image_bgr, embedding)
        if nn is None or self.params.k != 1:
            nn = self.rows.search.knn_distance(feats, 1)
        return feats, nn

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
        maps, readings, region_level = (leave_one_out_maps(feats, embs, built, self.params) if len(feats) > 1
                                        else ([], [], 0.0))
        if not maps:
            raise ValueError("calibration needs at least two normal frames (leave-one-out)")
        cal = calibrate(maps, self.params, method, readings, region_level=region_level)
        f16, rad, _, coverage = bound_memory(built.feats, built.radius, built.owner, built.coverage, self.params)
        header = self._new_header(f16.shape[1], coverage, cal)
        self.rows.set(header, f16, rad, frames=len(feats) + (base.frames if base else 0),
                      seen=sum(int(f.shape[0]) for f in feats) + (base.seen if base else 0))
        return self


    @classmethod
    def from_embeddings(cls, source: str, embeddings: Sequence[ImageEmbedding], params: MemoryParams,
                        **kwargs: Any) -> MemoryMapper:
        return cls(source, params, **kwargs).build(embeddings)

    @classmethod
    def from_folder(cls, sam_backend: SamBackend, folder: str | Path, memory_settings: MemorySettings | None, progress: bool = True,
                    **kwargs: Any) -> MemoryMapper:
        """Memory from a folder of known-good images (every image file directly in ``folder``)."""
        images = load_images(folder)
        if len(images) < 2:
            raise ValueError(f"{folder}: need at least two known-good images, found {len(images)}")
        params = kwargs.pop("params", None) or MemoryParams.from_settings(memory_settings)
        mapper = cls(sam_source(sam_backend, params.layers), params, **kwargs)
        embs = embed_all(sam_backend, images, progress, f"memory add {Path(folder).name}")
        return mapper.build(embs, images=[im for _, im in images])

    @classmethod
    def mutual(cls, sam_backend: SamBackend, images_bgr: Sequence[np.ndarray], memory_settings: MemorySettings | None,
               **kwargs: Any) -> MemoryMapper:
        """Label-free (:mod:`workers.memory.label_free`): a clean memory from at most ``label_free_refs`` of the
        images, judged against each other; those images are later scored without their own rows."""
        params = kwargs.pop("params", None) or MemoryParams.from_settings(memory_settings)
        mapper = cls(sam_source(sam_backend, params.layers), params, **kwargs)
        picked = pick_references(len(images_bgr), params.label_free_refs)
        embs = [sam_backend.embed(images_bgr[i], f"mutual:{i}") for i in picked]
        mapper.build_label_free(embs, [images_bgr[i] for i in picked])
        return mapper

    def build_label_free(self, embeddings: Sequence[ImageEmbedding],
                         images: Sequence[np.ndarray | None] | None = None) -> MemoryMapper:
        """Build and calibrate the memory from unlabeled frames (:func:`workers.memory.label_free.build_label_free`).
        With ``images``, each is remembered by its content key so that it is later scored without its rows."""
        embs = [self.features_fn(images[i] if images else None, e) if self.features_fn else e
                for i, e in enumerate(embeddings)]
        return self._build_label_free(embs, images)

    def _build_label_free(self, embs: Sequence[ImageEmbedding],
                          images: Sequence[np.ndarray | None] | None) -> MemoryMapper:
        """:meth:`build_label_free` on embeddings already mapped by ``features_fn``."""
        from workers.sam import content_key

        if len(embs) < 3:
            raise ValueError("label-free memory needs at least three frames")
        feats, shapes = [], []
        for e in embs:
            f, shape = self._patch_features(e)
            feats.append(f)
            shapes.append(shape)
        # one reading only: the wide readings' normal references cannot be read off unlabeled frames (a wide
        # shallow defect escapes the suspect regions and lifts them; workers.memory.image_score)
        params = self.params.one_reading()
        res = build_label_free(feats, shapes, embs, params)
        cal = calibrate(res.loo_maps, params, "label-free leave-one-out", res.normal_maxima,
                        pixels=res.pixel_samples)
        header = self._new_header(res.feats.shape[1], res.coverage, cal)
        header = replace(header, calibration={**header.calibration, "label_free_frames": len(embs),
                                              "suspect_patches": res.suspect_patches,
                                              "suspect_frames": res.suspect_frames})
        self.rows.set(header, res.feats, res.radius, frames=len(embs), seen=sum(int(f.shape[0]) for f in feats))
        self.batch = BatchFrames(res.owner, {content_key(im): i for i, im in enumerate(images) if im is not None}
                                 if images else {})
        return self

    # -------------------------------------------------------------------------------- scoring
    def map(self, image_bgr: np.ndarray, embedding: ImageEmbedding) -> AnomalyMap:
        t0 = time.perf_counter()
        self.rows.maybe_reload()
        (feats, shape), emb = self._features(image_bgr, embedding)
        t1 = time.perf_counter()
        own = self.batch.frame_of(image_bgr, self.size) if self.batch is not None else None
        if own is not None:  # a frame the label-free memory was built from: never against its own rows
            others = torch_bool(self.batch.owner[: self.size] != own)
            nn = knn_distance(feats, self.rows.feats[others], self.params.k, memory_sq=self.rows.feats_sq[others])
        elif self.size:
            nn = self.rows.search.knn_distance(feats, self.params.k)
        elif self.warmup.buffer:
            nn = interval_scores(feats, self.warmup.references(), self.params.mutual_fraction)
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
        rule = self._score_rule()
        readings, (base, wide_base) = rule.readings_and_bases(raw, emb, self.params.smoothing_sigma)
        score = rule.combine(readings)
        t3 = time.perf_counter()
        if img_thr <= 0:  # warm-up with too few frames for provisional thresholds
            return AnomalyMap(pixel=np.zeros((h, w), np.float32), image_score=0.0, raw=raw,
                              timings={"memory_features": t1 - t0, "memory_knn": t2 - t1,
                                       "memory_upsample": t3 - t2})
        seed = rule.raw_level(img_thr, base)
        region_peak = rule.region_seed(raw, emb, readings, img_thr)  # a long thin defect's region: seeded too
        if region_peak > 0:
            seed = min(seed, region_peak)
        return AnomalyMap(pixel=raw / np.float32(pix_thr), image_score=score / img_thr, raw=raw,
                          timings={"memory_features": t1 - t0, "memory_knn": t2 - t1, "memory_upsample": t3 - t2},
                          seed_level=seed / pix_thr,
                          wide_level=rule.wide_level(readings, img_thr, wide_base) / pix_thr,
                          wide_alone=rule.wide_alone(readings, img_thr))

    def _score_rule(self) -> ImageScoreRule:
        """The image score rule the memory's threshold was calibrated with (:mod:`workers.memory.image_score`;
        an older header: the plain maximum at its recorded sigma), whatever ``memory.image_sigma`` /
        ``area_sigma`` say now (a new build takes the configured ones)."""
        if self.header is None:
            return ImageScoreRule((self.params.image_sigma,), (1.0,))
        if self._rule is None or self._rule[0] is not self.header:
            rule = ImageScoreRule.from_calibration(self.header.calibration)
            p = self.params
            configured = (p.score_sigmas, p.wide_quantile, p.region_quantile > 0)
            if (rule.sigmas, rule.quantile, rule.region_level > 0) not in (
                    configured, (p.score_sigmas[:1], 0.0, False)):  # [:1]: label-free
                log.warning("memory %s: image threshold calibrated with the image score readings %s, configured "
                            "%s: scoring with the stored rule until the memory is rebuilt", self.source,
                            _readings_text(rule.sigmas, rule.quantile, rule.region_level > 0),
                            _readings_text(*configured))
            elif rule.contrast != p.score_contrast:
                log.warning("memory %s: image threshold calibrated with %s readings, configured %s: scoring with "
                            "the stored rule until the memory is rebuilt", self.source,
                            *("contrast" if c else "absolute" for c in (rule.contrast, p.score_contrast)))
            self._rule = (self.header, rule)
        return self._rule[1]

    def _thresholds(self) -> tuple[float, float]:
        if self.header is not None:
            return self.image_threshold, self.pixel_threshold
        provisional = self.warmup.thresholds()  # from the buffered frames' own mutual maxima
        if provisional is None:
            return 0.0, 0.0
        img, pix = provisional
        return (self.image_threshold_override or img), (self.pixel_threshold_override or pix)

    # -------------------------------------------------------------------------------- online fill
    def observe(self, embedding: ImageEmbedding, anomaly_map: AnomalyMap) -> bool:
        """Online fill after a frame was scored. Warm-up: the frame is buffered (True) and the memory is built
        once enough frames pass the mutual outlier cut. Afterwards: a frame with ``image_score <
        online_margin`` (normalised) adds its patches farther than the coverage radius (True); others are
        refused (False). Additions are appended to Redis atomically."""
        if self.header is None:
            return self._observe_warmup(embedding, anomaly_map, self._features_of(None, embedding)[0])
        self._offer_held_out(anomaly_map)
        if anomaly_map.image_score >= self.params.online_margin:
            return False
        self.online.add(*self.nearest_rows(None, embedding))
        return True

    def _offer_held_out(self, anomaly_map: AnomalyMap) -> None:
        """An OK frame joins the held-out window when its raw score is under ``held_out_margin`` x the threshold
        the memory was built with. The reference is fixed: against the threshold in force, defects scoring just
        under it raised it, which let the next ones under it (the demo's colour defects fell from 1.1 to 0.7 x
        the threshold within 20 frames). A frame an operator confirms OK is offered directly
        (:mod:`workers.memory.teach`)."""
        if anomaly_map.raw is None or anomaly_map.image_score >= 1.0 or self.image_threshold_override > 0:
            return
        raw = float(anomaly_map.image_score) * self.image_threshold
        if raw < self.params.held_out_margin * self.header.image_threshold:
            self.rows.held_out.offer(raw)

    def _observe_warmup(self, embedding: ImageEmbedding, anomaly_map: AnomalyMap, feats) -> bool:
        if self.store is not None:  # another worker may have finished its warm-up already
            stored = self.store.load()
            if stored is not None:
                self.adopt(stored)
                return False
        if self.warmup.add(feats, embedding, anomaly_map.raw):
            self._finish_warmup()
        return True

    def _finish_warmup(self) -> None:
        """The buffered frames become the label-free memory (:mod:`workers.memory.label_free`): their suspect
        patches stay out, whatever share of them is defective."""
        if self.features_fn is not None:
            log.warning("warm-up with a features_fn uses the buffered features' embeddings")
        buffer = list(self.warmup.buffer)
        self._build_label_free([b.embedding for b in buffer], None)  # the buffered embeddings are already mapped
        self.batch = None  # buffered frames were answered already
        self.rows.save_first()
        cal = self.header.calibration
        log.info("memory warm-up done: %d frames (%d with a suspect region), %d patches, image threshold %.4g",
                 len(buffer), cal.get("suspect_frames", 0), self.size, self.image_threshold)


def load_line_memory(settings: Settings, line: str, redis_client: Any, sam_backend: SamBackend,
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


def _readings_text(sigmas: tuple[float, ...], quantile: float, region: bool = False) -> str:
    return ("/".join(f"{x:g}" for x in sigmas) + " px" + (f" + p{100 * quantile:g}" if quantile > 0 else "")
            + (" + region" if region else ""))
