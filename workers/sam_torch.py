"""SAM through segment-anything (:class:`TorchSamBackend`): a ``vit_h`` / ``vit_l`` / ``vit_b`` model loaded from
an official checkpoint by path; the image encoder runs once per frame, the prompt encoder and mask decoder once
per decoder pass (single mask, logits, low-resolution logits kept for the cascade). Taps: ``blockN``, the
output of image-encoder block N.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from stream.contracts import ModelLoadError
from workers.interfaces import DecodeOutput, ImageEmbedding, Prompts
from workers.sam_geometry import LOW_RES, check_prompts, preprocess, to_input_coords

log = logging.getLogger(__name__)

_TORCH_TAP = re.compile(r"block(\d+)$")


class TorchSamBackend:
    """A segment-anything model loaded from a checkpoint by path (official SAM ViT-H/L/B checkpoints).

    ``builder`` (optional) builds the un-initialised ``Sam`` module instead of
    ``segment_anything.sam_model_registry[model_type]``; tests use it for a tiny architecture.
    """

    def __init__(self, model_type: str, checkpoint: str | Path, device: str = "cpu",
                 builder: Callable[[], Any] | None = None, taps: Sequence[str] = ()):
        self.model_type = model_type
        self.taps = tuple(taps)
        self._tap_blocks: tuple[int, ...] = ()
        self.checkpoint = Path(checkpoint)
        self._checkpoint_given = bool(str(checkpoint))
        self.device = device
        self.builder = builder
        self.name = f"torch:{model_type}:{self.checkpoint.name if self._checkpoint_given else '?'}"
        self._model: Any = None
        self._torch: Any = None
        self._device_features: tuple[np.ndarray, Any] | None = None  # (features array, its device tensor)

    @property
    def weights(self) -> str:
        return str(self.checkpoint)

    def load(self) -> TorchSamBackend:
        if not self._checkpoint_given:
            raise ModelLoadError("sam.checkpoint is empty: set it to the path of a segment-anything checkpoint "
                                 "(e.g. sam_vit_b_01ec64.pth) or use sam.backend=onnx")
        if not self.checkpoint.is_file():
            raise ModelLoadError(f"SAM checkpoint not found: {self.checkpoint} (sam.checkpoint, "
                                 f"model {self.model_type}); official checkpoints are loaded by path")
        try:
            import torch
            from segment_anything import sam_model_registry
        except ImportError as exc:  # pragma: no cover - installed with the package
            raise ModelLoadError(f"the torch SAM backend needs torch and segment-anything ({exc}); "
                                 "pip install torch segment-anything") from exc
        if self.builder is None and self.model_type not in sam_model_registry:
            raise ModelLoadError(f"unknown SAM model type {self.model_type!r} "
                                 f"(known: {', '.join(sorted(sam_model_registry))})")
        model = self.builder() if self.builder is not None else sam_model_registry[self.model_type](None)
        try:
            state = _load_state_dict(self.checkpoint, torch)
            model.load_state_dict(state, strict=True)
        except (RuntimeError, ValueError, OSError, KeyError) as exc:
            raise ModelLoadError(f"cannot load SAM checkpoint {self.checkpoint} into {self.model_type}: "
                                 f"{str(exc)[:500]}") from exc
        try:
            model = model.to(self.device).eval()
        except (RuntimeError, AssertionError) as exc:
            raise ModelLoadError(f"cannot move SAM to device {self.device!r}: {exc}") from exc
        blocks = getattr(model.image_encoder, "blocks", ())
        tap_blocks = []
        for tap in self.taps:
            m = _TORCH_TAP.match(tap)
            if m is None or int(m.group(1)) >= len(blocks):
                raise ModelLoadError(f"SAM tap {tap!r} (memory.layers) is not a block of the {self.model_type} "
                                     f"image encoder: use blockN with N in 0..{len(blocks) - 1}, or 'neck' alone")
            tap_blocks.append(int(m.group(1)))
        self._tap_blocks = tuple(tap_blocks)
        self._model, self._torch = model, torch
        log.info("SAM torch backend loaded: %s from %s on %s taps=%s", self.model_type, self.checkpoint,
                 self.device, list(self.taps) or "none")
        return self

    def _loaded(self) -> tuple[Any, Any]:
        if self._model is None:
            raise RuntimeError("TorchSamBackend.load() was not called")
        return self._model, self._torch

    def embed(self, image_bgr: np.ndarray, key: str) -> ImageEmbedding:
        model, torch = self._loaded()
        x, input_size = preprocess(image_bgr)
        captured: dict[int, Any] = {}
        hooks = [model.image_encoder.blocks[i].register_forward_hook(
            lambda _m, _in, out, i=i: captured.__setitem__(i, out)) for i in set(self._tap_blocks)]
        try:
            with torch.inference_mode():
                feats = model.image_encoder(torch.from_numpy(x).to(self.device))
        finally:
            for h in hooks:
                h.remove()
        features = feats[0].float().cpu().numpy()
        # a ViT block's output is [1, H, W, C]
        taps = {name: np.ascontiguousarray(captured[i][0].permute(2, 0, 1).float().cpu().numpy())
                for name, i in zip(self.taps, self._tap_blocks, strict=True)}
        return ImageEmbedding(key=key, features=np.ascontiguousarray(features), input_size=input_size,
                              original_size=tuple(image_bgr.shape[:2]), taps=taps)

    def _features_on_device(self, embedding: ImageEmbedding) -> Any:
        model, torch = self._loaded()
        cached = self._device_features
        if cached is not None and cached[0] is embedding.features:
            return cached[1]
        tensor = torch.from_numpy(np.ascontiguousarray(embedding.features)).to(self.device)[None]
        self._device_features = (embedding.features, tensor)
        return tensor

    def decode(self, embedding: ImageEmbedding, prompts: Prompts) -> DecodeOutput:
        model, torch = self._loaded()
        points, labels = check_prompts(prompts)
        dev = self.device
        point_arg = None
        if len(points):
            coords = torch.from_numpy(to_input_coords(points, embedding)).to(dev)[None]
            point_arg = (coords, torch.from_numpy(labels.astype(np.int64)).to(dev)[None])
        box_arg = None
        if prompts.box is not None:
            box = to_input_coords(np.asarray(prompts.box, dtype=np.float32).reshape(2, 2), embedding)
            box_arg = torch.from_numpy(box.reshape(1, 4)).to(dev)
        mask_arg = None
        if prompts.mask_logits is not None:
            mask = np.asarray(prompts.mask_logits, dtype=np.float32).reshape(1, 1, LOW_RES, LOW_RES)
            mask_arg = torch.from_numpy(np.ascontiguousarray(mask)).to(dev)
        with torch.inference_mode():
            sparse, dense = model.prompt_encoder(points=point_arg, boxes=box_arg, masks=mask_arg)
            low_res, iou = model.mask_decoder(
                image_embeddings=self._features_on_device(embedding),
                image_pe=model.prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                multimask_output=False,
            )
            full = model.postprocess_masks(low_res, embedding.input_size, embedding.original_size)
        return DecodeOutput(mask_logits=full[0, 0].float().cpu().numpy(),
                            low_res_logits=low_res[0, 0].float().cpu().numpy(),
                            iou=float(iou.reshape(-1)[0]))


def _load_state_dict(path: Path, torch: Any) -> dict[str, Any]:
    """A state dict from a ``.pth``/``.pt`` (tensors only: ``weights_only=True``) or ``.safetensors`` file."""
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError as exc:
            raise ModelLoadError(f"{path}: reading .safetensors needs pip install safetensors") from exc
        return load_file(str(path), device="cpu")
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises unpickling / zip errors of several types for a bad file
        raise ModelLoadError(f"{path} is not a loadable torch checkpoint of tensors: {str(exc)[:300]}") from exc
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise ModelLoadError(f"{path}: expected a state dict, got {type(state).__name__}")
    return state
