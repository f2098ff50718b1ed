"""Teaching the memory one frame an operator judged normal ("OK - false alarm", :mod:`workers.review`).

:func:`teach_normal`:

1. the line's memory is synced first (other workers' additions), then the frame is scored against it: its raw
   image score is a held-out sample (the memory does not hold the frame) and joins the line's held-out window
   (:class:`workers.memory.held_out.HeldOutWindow`), so the image threshold takes the frame into account;
2. the frame's patches the memory does not cover are added: greedy k-center picks (exact distances, no
   projection) until every patch of the frame is within ``min(coverage radius, pixel threshold / 2)`` of the
   memory, appended atomically to the stored memory (:meth:`workers.memory.rows.MemoryRows.persist_append`),
   so every worker picks them up on its next sync; over ``memory.max_patches`` the memory is compacted as the
   online fill does.

Unlike the online fill (:mod:`workers.memory.online`) the frame is not limited to ``frame_ratio`` of its
patches: an operator's word is enough to make the whole frame normal, and the same frame scored again is
below the pixel threshold everywhere (with ``memory.k`` 1; a compaction at the bound may drop rows again,
which the caller's re-score shows).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from stream.contracts import LineInspectError
from workers.memory.coreset import kcenter
from workers.memory.search import torch_module as _torch

if TYPE_CHECKING:
    from workers.interfaces import ImageEmbedding
    from workers.memory.mapper import MemoryMapper

TEACH_PIXEL_FRACTION = 0.5  # every taught patch ends within this share of the pixel threshold (or the coverage)


class TeachError(LineInspectError):
    """The memory cannot learn the frame (no memory yet: warm-up)."""


@dataclass(frozen=True)
class Taught:
    raw_before: float  # the frame's raw image score against the memory before (the held-out sample)
    score_before: float  # the same, normalised (1.0 = the image threshold before the frame was taught)
    rows_added: int
    rows_after: int
    target_radius: float  # every patch of the frame is now within this distance of the memory


def teach_normal(mapper: MemoryMapper, image_bgr: np.ndarray, embedding: ImageEmbedding) -> Taught:
    """Make ``image_bgr`` normal for ``mapper``'s line (see the module doc)."""
    torch = _torch()
    mapper.reload()
    if mapper.header is None or not mapper.size:
        raise TeachError("the line has no memory yet (warm-up): nothing to add the frame to")
    amap = mapper.map(image_bgr, embedding)
    raw_before = float(amap.image_score) * mapper.image_threshold
    feats, nn = mapper.nearest_rows(image_bgr, embedding)  # from the map() above: no second search
    target = min(float(mapper.header.radius), TEACH_PIXEL_FRACTION * mapper.pixel_threshold)
    idx, radius = kcenter(feats, feats.shape[0], init_dist=nn, min_radius=target)
    mapper.rows.held_out.offer(raw_before)
    if len(idx):
        rows = feats[torch.from_numpy(idx)].numpy()
        mapper.rows.persist_append(rows, radius, seen=int(feats.shape[0]))
        mapper.online.bound()
    return Taught(raw_before=raw_before, score_before=float(amap.image_score), rows_added=int(len(idx)), rows_after=mapper.size, target_radius=target)
