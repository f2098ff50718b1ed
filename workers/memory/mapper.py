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
from typing import Any

import numpy as np

from workers.interfaces import AnomalyMap, ImageEmbedding
from workers.memory.calibration import Calibration, calibrate, image_threshold, leave_one_out_maps
from workers.memory.coreset import BuiltMemory, bound_memory, build_memory, kcenter, random_projection
from workers.memory.features import (
    FeaturesFn,
    image_raw_score,
    patch_features,
    raw_to_image,
    sam_source,
    torch_bool,
)
from workers.memory.folder import embed_all, load_images
from workers.memory.label_free import build_label_free, interval_scores, pick_references
from workers.memory.params import MemoryParams
from workers.memory.search import knn_distance, make_search
from workers.memory.search import torch_module as _torch
from workers.memory.store import (
    MemoryConflict,
    MemoryHeader,
    MemoryMismatchError,
    MemoryMissingError,
    RedisMemoryStore,
    StoredMemory,
)

log = logging.getLogger(__name__)


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
        # label-free batches: the frame each row came from, and the frames by content key (workers.memory.label_free)
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
        (:func:`workers.memory.calibration.image_threshold`)."""
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
        embs = embed_all(sam_backend, images, progress, f"memory add {Path(folder).name}")
        return mapper.build(embs, images=[im for _, im in images])

    @classmethod
    def mutual(cls, sam_backend: Any, images_bgr: Sequence[np.ndarray], memory_settings: Any,
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
        proj = random_projection(feats.shape[1], self.params.projection_dim, self.params.seed)
        idx, _ = kcenter(feats, max(1, int(round(2 * self.params.frame_ratio * feats.shape[0]))), proj=proj,
                         seed=self.params.seed + len(self._buffer))
        return feats[torch.from_numpy(idx)]

    def _finish_warmup(self) -> None:
        """The buffered frames become the label-free memory (:mod:`workers.memory.label_free`): their suspect patches
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
        proj = random_projection(feats.shape[1], p.projection_dim, p.seed)
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

