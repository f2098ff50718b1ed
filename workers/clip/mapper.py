"""CLIP anomaly mapper (stage 1): zero-shot anomaly maps from a frozen open_clip ViT and a prompt ensemble.

Per tapped layer the patch tokens go to the joint space (trained per-layer linear adapters when
configured, else the model's own ``ln_post`` + ``proj``), are L2-normalised and compared with the normal /
abnormal text embeddings: ``softmax(100 * patch @ text.T)`` gives an abnormal probability per patch. The
layers' grids are averaged, resized bilinearly to the frame and smoothed with a Gaussian whose sigma scales
with the frame size. The image score fuses the class token's abnormal probability with the map's maximum.
Without adapters the map is training-free and the last ``vv_blocks`` blocks use value-value attention
for the patch tokens (docs/method.md section 1).

Normalisation (workers.interfaces): ``pixel = probability / pixel_threshold`` and
``image_score = raw_image / image_threshold``; both thresholds default to 0.5 (the point where CLIP finds
"abnormal" as likely as "normal") until a line is calibrated (``ClipAnomalyMapper.calibrated``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from stream.contracts import ModelLoadError
from workers.interfaces import AnomalyMap, ImageEmbedding

if TYPE_CHECKING:
    from config.settings import ClipSettings

log = logging.getLogger(__name__)

DEFAULT_RAW_THRESHOLD = 0.5
SIGMA_REFERENCE_PX = 518  # smoothing_sigma is given at this image size (longer side)
LOGIT_SCALE = 100.0


def abnormal_probability(features: Any, text: Any) -> Any:
    """features [B, N, D] (any scale), text [2, D] normalised (normal, abnormal) -> [B, N] P(abnormal)."""
    import torch.nn.functional as F

    f = F.normalize(features, dim=-1)
    return (LOGIT_SCALE * f @ text.T).softmax(dim=-1)[..., 1]


@dataclass
class _TextCache:
    """Prompt-ensemble text embeddings per class name, kept in the backbone's cache: shared by every
    mapper on that backbone (calibrated copies included)."""

    embeddings: dict[str, Any] = field(default_factory=dict)
    encodings: int = 0  # how many times the prompt ensemble went through the text tower


class ClipAnomalyMapper:
    """``workers.interfaces.AnomalyMapper`` on CLIP. The SAM embedding passed to ``map`` is not used.

    Build it with ``build_clip_mapper(settings.clip)``; the constructor only stores what it is given
    (a loaded backbone and, optionally, loaded adapters). Text embeddings are computed on first use (or by
    ``prepare``) and cached in the backbone, once per process for every mapper on it.
    """

    def __init__(self, backbone: Any, layers: tuple[int, ...], *, class_name: str = "",
                 adapters: Any = None, adapter_source: str = "", vv_blocks: int = 0,
                 smoothing_sigma: float = 4.0, pixel_threshold: float = DEFAULT_RAW_THRESHOLD,
                 image_threshold: float = DEFAULT_RAW_THRESHOLD, image_map_weight: float = 0.5) -> None:
        if not layers:
            raise ValueError("clip mapper needs at least one layer")
        if adapters is not None and len(adapters) != len(layers):
            raise ValueError(f"{len(adapters)} adapters for {len(layers)} layers")
        if pixel_threshold <= 0 or image_threshold <= 0:
            raise ValueError("thresholds must be > 0")
        self.backbone = backbone
        self.layers = tuple(int(x) for x in layers)
        self.class_name = class_name
        self.adapters = adapters
        self.adapter_source = adapter_source
        self.vv_blocks = int(vv_blocks)
        self.smoothing_sigma = float(smoothing_sigma)
        self.pixel_threshold = float(pixel_threshold)
        self.image_threshold = float(image_threshold)
        self.image_map_weight = float(image_map_weight)
        self._text: _TextCache = backbone.cache.setdefault("prompt_ensemble", _TextCache())
        mode = "adapters" if adapters is not None else (f"vv{self.vv_blocks}" if self.vv_blocks else "zero-shot")
        self.name = f"clip[{backbone.label}]"
        self.mode = mode

    # ------------------------------------------------------------------------------------------ text
    @property
    def text_encodings(self) -> int:
        return self._text.encodings

    def text_features(self) -> Any:
        """[2, D] normalised (normal, abnormal) embeddings for this mapper's class name; computed once."""
        key = self.class_name
        cached = self._text.embeddings.get(key)
        if cached is None:
            from workers.clip.prompts import ensemble_text_embeddings

            t0 = time.perf_counter()
            cached = ensemble_text_embeddings(self.backbone, self.class_name)
            self._text.embeddings[key] = cached
            self._text.encodings += 1
            log.info("clip: text prompt ensemble for %r embedded in %.2f s", key or "object",
                     time.perf_counter() - t0)
        return cached

    def prepare(self) -> ClipAnomalyMapper:
        """Compute the text embeddings now (worker start-up) instead of on the first frame."""
        self.text_features()
        return self

    def calibrated(self, pixel_threshold: float, image_threshold: float) -> ClipAnomalyMapper:
        """A copy with a line's calibrated raw thresholds, sharing the backbone and the text cache."""
        return ClipAnomalyMapper(
            self.backbone, self.layers, class_name=self.class_name, adapters=self.adapters,
            adapter_source=self.adapter_source, vv_blocks=self.vv_blocks, smoothing_sigma=self.smoothing_sigma,
            pixel_threshold=pixel_threshold, image_threshold=image_threshold,
            image_map_weight=self.image_map_weight)

    # ------------------------------------------------------------------------------------------ maps
    def layer_grids(self, images_bgr: list[np.ndarray]) -> tuple[Any, Any]:
        """Per-layer abnormal probability grids [L, B, g, g] and the class-token probabilities [B]."""
        import torch

        from workers.clip.adapters import apply_adapter
        from workers.clip.backbone import encode_tokens, preprocess, project_patches

        bb = self.backbone
        text = self.text_features()
        with torch.inference_mode():
            x = preprocess(bb, images_bgr)
            glob, tokens = encode_tokens(bb, x, self.layers, vv_blocks=self.vv_blocks)
            probs = []
            for i, tok in enumerate(tokens):
                feats = apply_adapter(bb, self.adapters[i], tok) if self.adapters is not None \
                    else project_patches(bb, tok)
                probs.append(abnormal_probability(feats.float(), text))
            g = bb.grid_size
            grids = torch.stack(probs).reshape(len(tokens), len(images_bgr), g, g)
            cls_prob = (LOGIT_SCALE * glob.float() @ text.T).softmax(dim=-1)[:, 1]
        return grids, cls_prob

    def map(self, image_bgr: np.ndarray, embedding: ImageEmbedding | None = None) -> AnomalyMap:
        return self.map_batch([image_bgr])[0]

    def map_batch(self, images_bgr: list[np.ndarray]) -> list[AnomalyMap]:
        """Maps for several frames in one forward pass (frames may differ in size)."""
        import cv2

        t0 = time.perf_counter()
        self.text_features()
        t1 = time.perf_counter()
        grids, cls_prob = self.layer_grids(images_bgr)
        mean_grid = grids.mean(dim=0).cpu().numpy().astype(np.float32)  # bilinear is linear: mean first
        cls_prob = cls_prob.cpu().numpy()
        t2 = time.perf_counter()
        n = len(images_bgr)
        text_s, forward_s = (t1 - t0) / n, (t2 - t1) / n  # shared by the batch: per frame
        out = []
        for i, img in enumerate(images_bgr):
            t3 = time.perf_counter()
            h, w = img.shape[:2]
            raw = cv2.resize(mean_grid[i], (w, h), interpolation=cv2.INTER_LINEAR)
            sigma = self.smoothing_sigma * max(h, w) / SIGMA_REFERENCE_PX
            if sigma > 0:
                raw = cv2.GaussianBlur(raw, (0, 0), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REFLECT)
            raw = raw.astype(np.float32, copy=False)
            wmap = self.image_map_weight
            image_raw = (1.0 - wmap) * float(cls_prob[i]) + wmap * float(raw.max())
            pixel = (raw / self.pixel_threshold).astype(np.float32)
            map_s = time.perf_counter() - t3
            out.append(AnomalyMap(
                pixel=pixel, image_score=image_raw / self.image_threshold, raw=raw,
                timings={"clip_text": text_s, "clip_forward": forward_s, "clip_map": map_s,
                         "clip": text_s + forward_s + map_s},
            ))
        return out


def build_clip_mapper(clip_settings: ClipSettings, *, pixel_threshold: float = DEFAULT_RAW_THRESHOLD,
                      image_threshold: float = DEFAULT_RAW_THRESHOLD) -> ClipAnomalyMapper:
    """Load the backbone (and adapters) named by ``settings.clip`` and build the mapper.

    ``clip.prompt_mode = "vip2"`` returns ``workers.clip.vip2_mapper.build_vip2_mapper(clip_settings)`` instead
    (same interface, same threshold convention).

    Raises ModelLoadError when no real weights can be had (random weights only with
    ``clip.allow_random_weights``), when the adapter file is missing or does not fit the backbone, and
    when ``clip.layers`` does not fit the model.
    """
    s = clip_settings
    mode = s.prompt_mode
    if mode == "vip2":  # image-conditioned prompts: built by workers.clip.vip2_mapper on the same backbone code
        from workers.clip.vip2_mapper import build_vip2_mapper

        vip2 = build_vip2_mapper(s)
        vip2.pixel_threshold, vip2.image_threshold = float(pixel_threshold), float(image_threshold)
        return vip2  # type: ignore[return-value]
    if mode != "ensemble":
        raise ModelLoadError(f"unknown clip.prompt_mode {mode!r} (allowed: ensemble, vip2)")
    from workers.clip.backbone import load_clip_backbone

    bb = load_clip_backbone(s.model, s.pretrained, s.image_size, device=s.device,
                            allow_random=bool(s.allow_random_weights))
    adapters = None
    source = ""
    layers = tuple(int(x) for x in s.layers)
    vv = int(s.vv_blocks) if s.vv_attention else 0
    if s.adapters:
        from workers.clip.adapters import check_compatible, load_adapters

        config, adapters = load_adapters(s.adapters, device=s.device)
        check_compatible(config, bb, s.adapters)
        if config.layers != layers:
            log.warning("clip: adapters %s were trained on layers %s; using those instead of clip.layers %s",
                        s.adapters, list(config.layers), list(layers))
        layers, vv, source = config.layers, config.vv_blocks, str(s.adapters)
    bad = [x for x in layers if not 1 <= x <= bb.num_layers]
    if bad:
        raise ModelLoadError(f"clip.layers {list(layers)}: {bad} outside 1..{bb.num_layers} for {s.model}")
    if vv > bb.num_layers:
        raise ModelLoadError(f"clip.vv_blocks={vv} > {bb.num_layers} blocks of {s.model}")
    mapper = ClipAnomalyMapper(bb, layers, class_name=s.class_name, adapters=adapters, adapter_source=source,
                               vv_blocks=vv, smoothing_sigma=s.smoothing_sigma, pixel_threshold=pixel_threshold,
                               image_threshold=image_threshold)
    log.info("clip mapper %s: model %s, weights %s, %d px, layers %s, %s%s, object %r, thresholds px %.3f "
             "img %.3f", mapper.name, bb.model_name, bb.weights, bb.image_size, list(layers), mapper.mode,
             f" from {source}" if source else "", s.class_name or "object", pixel_threshold, image_threshold)
    return mapper
