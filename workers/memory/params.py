"""The memory's options: :class:`MemoryParams`, read from ``settings.memory``."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from workers.memory.image_score import ImageScoreRule
from workers.memory.search import SearchSpec

if TYPE_CHECKING:
    from config.settings import MemorySettings


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
    image_sigma: float = 24.0  # the image score is the max of the map smoothed to this sigma (1024-frame px) ...
    area_sigma: float = 64.0  # ... or to this one, for wide shallow defects (0 = off; workers.memory.image_score)
    wide_quantile: float = 0.9  # ... or the map's quantile, for a change over much of the frame (0 = off)
    score_contrast: bool = False  # readings above the frame's own median / 25th percentile (image_score)
    region_quantile: float = 0.0  # the region reading above the level this share of normal pixels stay under (0 = off)
    calibration_quantile: float = 0.99
    calibration_frames: int = 64  # leave-one-out maps used for calibration (at most)
    online_margin: float = 0.5
    warmup_frames: int = 16
    mutual_fraction: float = 0.3  # mutual scoring: mean of the lowest fraction of per-frame distances
    label_free_refs: int = 32  # label-free: reference frames the clean memory is built from (workers.memory.label_free)
    suspect_z: float = 3.0  # label-free: patches above median + z * MAD of the mutual scores stay out
    suspect_region_cells: int = 3  # label-free calibration: a frame's defect = a group of this many cells ...
    region_z: float = 4.0  # ... above median + region_z * MAD of the mutual scores (see workers.memory.label_free)
    false_alarm_rate: float = 0.01  # image threshold: share of good frames flagged (workers.memory.calibration)
    held_out_frames: int = 256  # recent OK frames' maxima kept for re-estimating the image threshold
    held_out_margin: float = 0.9  # ... those under this share of the memory's built threshold (settings doc)
    reload_interval_s: float = 5.0
    seed: int = 0
    layers: tuple[str, ...] = ("neck",)  # encoder outputs per patch (ImageEmbedding.features / .taps)
    search: SearchSpec = SearchSpec()  # scoring against the memory: exact here; from_settings: memory.search

    @classmethod
    def from_settings(cls, memory_settings: MemorySettings, false_alarm_rate: float | None = None,
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
                   held_out_frames=m.held_out_frames, image_sigma=float(getattr(m, "image_sigma", cls.image_sigma)),
                   area_sigma=float(getattr(m, "area_sigma", cls.area_sigma)),
                   wide_quantile=float(getattr(m, "wide_quantile", cls.wide_quantile)),
                   score_contrast=bool(getattr(m, "score_contrast", cls.score_contrast)),
                   region_quantile=float(getattr(m, "region_quantile", cls.region_quantile)),
                   held_out_margin=float(getattr(m, "held_out_margin", cls.held_out_margin)),
                   reload_interval_s=float(getattr(m, "reload_interval_s", cls.reload_interval_s)), **extra)

    @property
    def score_sigmas(self) -> tuple[float, ...]:
        """The readings of the image score a new memory is calibrated with (:mod:`workers.memory.image_score`)."""
        return ImageScoreRule.sigmas_for(self.image_sigma, self.area_sigma)

    def one_reading(self) -> MemoryParams:
        """These options with the first reading only (label-free memories, :mod:`workers.memory.image_score`)."""
        return replace(self, area_sigma=0.0, wide_quantile=0.0, region_quantile=0.0)

    @property
    def pixel_quantile(self) -> float:
        return 1.0 - (1.0 - self.calibration_quantile) / 10.0
