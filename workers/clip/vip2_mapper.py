"""The ViP²-CLIP anomaly mapper: a frozen CLIP backbone and a trained prompt head (:mod:`workers.clip.vip2`)
turned into normalised anomaly maps, and its construction from ``settings.clip``.

Imported lazily by :func:`workers.clip.build_clip_mapper` when ``clip.prompt_mode == "vip2"`` (needs torch).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812

from stream.contracts import ModelLoadError
from workers.clip.vip2 import (
    DEFAULT_SIGMA,
    DEFAULT_THRESHOLD,
    DEFAULT_TOP_K,
    TEMPERATURE,
    PromptFileError,
    Vip2Head,
    align,
    config_for,
    extract_features,
    load_prompts,
    new_head,
    smooth_sigma,
)
from workers.interfaces import AnomalyMap, ImageEmbedding

if TYPE_CHECKING:
    from config.settings import ClipSettings


class Vip2Mapper:
    """:class:`workers.interfaces.AnomalyMapper` with ViP² prompts.

    ``pixel`` = smoothed abnormal probability / ``pixel_threshold``; ``image_score`` = top-K patch score /
    ``image_threshold`` (both default 0.5 on probabilities, so 1.0 = threshold). ``raw`` holds the
    smoothed probability map at the frame's size. Build it with :func:`build_vip2_mapper`.
    """

    def __init__(self, backbone: Any, head: Vip2Head, *, top_k: int = DEFAULT_TOP_K,
                 smoothing_sigma: float = DEFAULT_SIGMA, pixel_threshold: float = DEFAULT_THRESHOLD,
                 image_threshold: float = DEFAULT_THRESHOLD, temperature: float = TEMPERATURE):
        if pixel_threshold <= 0 or image_threshold <= 0:
            raise ValueError("vip2: thresholds must be > 0")
        self.backbone = backbone
        self.head = head
        self.top_k = top_k
        self.smoothing_sigma = smoothing_sigma
        self.pixel_threshold = pixel_threshold
        self.image_threshold = image_threshold
        self.temperature = temperature
        self.name = f"clip-vip2[{backbone.label}]"

    @property
    def layers(self) -> tuple[int, ...]:
        return self.head.config.layers

    def map(self, image_bgr: np.ndarray, embedding: ImageEmbedding | None = None) -> AnomalyMap:
        return self.map_batch([image_bgr])[0]

    def map_batch(self, images_bgr: Sequence[np.ndarray]) -> list[AnomalyMap]:
        """Maps for several frames; the image encoder and the text encoder each run once for the batch."""
        import cv2

        t0 = time.perf_counter()
        global_emb, patches = extract_features(self.backbone, images_bgr, self.layers)
        t1 = time.perf_counter()
        self.head.eval()
        with torch.no_grad():
            grid, score = align(self.head, self.backbone.model, global_emb, patches, self.top_k, self.temperature)
        t2 = time.perf_counter()
        size = int(self.backbone.image_size)
        up = F.interpolate(grid.unsqueeze(1), size=(size, size), mode="bilinear", align_corners=False)[:, 0]
        up_np = up.cpu().numpy().astype(np.float32)
        sigma = smooth_sigma(size, self.smoothing_sigma)
        share = 1.0 / len(images_bgr)
        out = []
        for i, img in enumerate(images_bgr):
            m = cv2.GaussianBlur(up_np[i], (0, 0), sigma) if sigma > 0 else up_np[i]
            h, w = img.shape[:2]
            raw = cv2.resize(m, (w, h), interpolation=cv2.INTER_LINEAR).astype(np.float32)
            np.clip(raw, 0.0, 1.0, out=raw)
            out.append(AnomalyMap(
                pixel=(raw / self.pixel_threshold).astype(np.float32),
                image_score=float(score[i]) / self.image_threshold,
                raw=raw,
                timings={"clip_image": (t1 - t0) * share, "vip2_prompts_align": (t2 - t1) * share,
                         "vip2_map": (time.perf_counter() - t2) * share},
            ))
        return out



def build_vip2_mapper(clip_settings: ClipSettings) -> Vip2Mapper:
    """Load the backbone and the prompt file named by ``clip_settings`` (a ``config.settings.ClipSettings``).

    Raises :class:`ModelLoadError` when the CLIP weights cannot be loaded (random weights are only used with
    ``allow_random_weights``), and :class:`PromptFileError` when ``clip.prompts`` is empty, missing or made for
    another backbone. Without a prompt file, an untrained head is used only when random weights are allowed
    (tests and benchmarks).
    """
    from workers.clip.backbone import load_clip_backbone

    cs = clip_settings
    try:
        backbone = load_clip_backbone(cs.model, cs.pretrained, cs.image_size, device=cs.device,
                                      allow_random=cs.allow_random_weights)
    except ModelLoadError:
        raise
    except Exception as exc:  # noqa: BLE001 - every load failure must stop verdicts the same way
        raise ModelLoadError(f"clip: cannot load {cs.model} weights {cs.pretrained!r}: {exc}") from exc
    layers = tuple(cs.layers)
    if cs.prompts:
        head = load_prompts(cs.prompts, backbone, layers)
    elif cs.allow_random_weights:
        head = new_head(backbone, config_for(backbone, layers), seed=0)
    else:
        raise PromptFileError(
            "clip.prompt_mode=vip2 needs clip.prompts: a file made by `lineinspect train-prompts`", "clip.prompts")
    head.eval()
    return Vip2Mapper(backbone, head)


