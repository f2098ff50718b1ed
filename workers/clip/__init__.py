"""CLIP anomaly mapping on open_clip (stage 1). Light on import: heavy modules load on first use.

Public names: ``build_clip_mapper``, ``ClipAnomalyMapper`` (workers.clip.mapper), ``load_clip_backbone``,
``ClipBackbone`` (workers.clip.backbone).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "build_clip_mapper": "workers.clip.mapper",
    "ClipAnomalyMapper": "workers.clip.mapper",
    "load_clip_backbone": "workers.clip.backbone",
    "ClipBackbone": "workers.clip.backbone",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'workers.clip' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
