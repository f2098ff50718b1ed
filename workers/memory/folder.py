"""Known-good images of a folder (``memory add``, :meth:`MemoryMapper.from_folder`) and their embeddings."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from workers.imageio import IMAGE_EXTENSIONS, ImageReadError, read_image
from workers.interfaces import ImageEmbedding, SamBackend

log = logging.getLogger(__name__)


def load_images(folder: str | Path) -> list[tuple[str, np.ndarray]]:
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"not a folder: {folder}")
    out = []
    for p in sorted(folder.iterdir()):
        if p.suffix.lower() in IMAGE_EXTENSIONS:
            try:
                out.append((p.name, read_image(p)))
            except ImageReadError as exc:
                log.warning("skipping unreadable image: %s", exc)
    return out


def embed_all(sam_backend: SamBackend, images: Sequence[tuple[str, np.ndarray]], progress: bool, desc: str
               ) -> list[ImageEmbedding]:
    it: Any = images
    if progress:
        from tqdm import tqdm

        it = tqdm(images, desc=desc, unit="img")
    return [sam_backend.embed(im, f"memory:{name}") for name, im in it]

