"""A SAM backend wrapper that keeps each image's encoder output on disk (``eval``/``predict --embedding-cache``).

Offline evaluation re-runs the same images many times (settings sweeps, before/after a change, both memory
modes); the encoder is the dominant cost on a CPU (about 1 s per 1024 px frame), so its outputs are kept in
``DIR/<model id>/<content hash>.npz`` (float16, the neck and every tap) and re-used whenever the same image
comes again under the same model and taps. The model id hashes the backend's name, its weights' paths with
their size and modification time, and the taps, so a changed model never serves stale features.

Entries are float16, and a miss returns the encoder output rounded the same way: a run gives the same maps
whether the cache was cold or warm (returning the float32 output on a miss moved commutator's F1-max by 0.8
between a first and a second ``eval``). Decoding is passed through untouched. Writes go to a temporary name
first and are renamed into place, so two processes sharing a cache folder never read half a file. Not used by
the streaming worker.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from workers.interfaces import DecodeOutput, ImageEmbedding, Prompts, SamBackend


def model_identity(backend: Any) -> str:
    """A short id for the backend's model, weights (path, size, mtime) and taps."""
    parts = [str(getattr(backend, "name", type(backend).__name__)), ",".join(getattr(backend, "taps", ()) or ())]
    for attr in ("encoder_path", "checkpoint"):
        p = getattr(backend, attr, None)
        if p:
            p = Path(p)
            st = p.stat() if p.exists() else None
            parts.append(f"{p.resolve()}:{st.st_size if st else 0}:{int(st.st_mtime) if st else 0}")
    return hashlib.blake2b("|".join(parts).encode(), digest_size=8).hexdigest()


def _as_stored(emb: ImageEmbedding) -> ImageEmbedding:
    """``emb`` with its features and taps rounded to float16, as an entry read back holds them."""
    def rounded(a: np.ndarray) -> np.ndarray:
        return np.asarray(a, np.float16).astype(np.float32)

    return ImageEmbedding(key=emb.key, features=rounded(emb.features), input_size=emb.input_size,
                          original_size=emb.original_size, taps={k: rounded(v) for k, v in emb.taps.items()})


class DiskEmbeddings:
    """:class:`workers.interfaces.SamBackend` that reads/writes encoder outputs under ``folder``."""

    def __init__(self, inner: SamBackend, folder: str | os.PathLike):
        self.inner = inner
        self.name = inner.name
        self.taps = tuple(getattr(inner, "taps", ()) or ())
        self.folder = Path(folder) / model_identity(inner)
        self.hits = 0
        self.misses = 0

    @property
    def weights(self) -> str:
        return str(getattr(self.inner, "weights", ""))

    def _path(self, image_bgr: np.ndarray) -> Path:
        from workers.sam import content_key

        return self.folder / (content_key(image_bgr).removeprefix("sha:") + ".npz")

    def embed(self, image_bgr: np.ndarray, key: str) -> ImageEmbedding:
        path = self._path(image_bgr)
        if path.is_file():
            try:
                with np.load(path) as z:
                    taps = {name.removeprefix("tap_"): z[name].astype(np.float32) for name in z.files
                            if name.startswith("tap_")}
                    emb = ImageEmbedding(key=key, features=z["features"].astype(np.float32),
                                         input_size=tuple(int(v) for v in z["input_size"]),
                                         original_size=tuple(int(v) for v in z["original_size"]), taps=taps)
                if set(self.taps) <= set(emb.taps):
                    self.hits += 1
                    return emb
            except (OSError, ValueError, KeyError):  # unreadable entry: recompute and overwrite it
                pass
        emb = self.inner.embed(image_bgr, key)
        self.misses += 1
        self._write(path, emb)
        return _as_stored(emb)

    def _write(self, path: Path, emb: ImageEmbedding) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {"features": emb.features.astype(np.float16), "input_size": np.asarray(emb.input_size),
                  "original_size": np.asarray(emb.original_size)}
        arrays |= {f"tap_{k}": np.asarray(v, np.float16) for k, v in emb.taps.items()}
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, **arrays)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def decode(self, embedding: ImageEmbedding, prompts: Prompts) -> DecodeOutput:
        return self.inner.decode(embedding, prompts)
