"""``lineinspect memory add LINE DIR`` | ``memory show LINE`` | ``memory clear LINE``."""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from workers.memory.calibration import image_threshold
from workers.memory.features import sam_source
from workers.memory.folder import embed_all, load_images
from workers.memory.image_score import ImageScoreRule
from workers.memory.mapper import MemoryMapper
from workers.memory.params import MemoryParams
from workers.memory.search import SearchSpec
from workers.memory.store import (
    MemoryConflict,
    MemoryMismatchError,
    MemoryMissingError,
    RedisMemoryStore,
    StoredMemory,
)

if TYPE_CHECKING:
    from config.settings import Settings


FEW_FRAMES = 20  # fewer normal frames under the image threshold: memory show / add advise adding more


def describe(stored: StoredMemory | None, line: str, held_out: Sequence[float] = (),
             false_alarm_rate: float = 0.01, search: SearchSpec | None = None) -> dict[str, Any]:
    """What ``memory show`` prints: the memory, its calibration, the image threshold in force now (from the
    calibration frames and the held-out OK frames) with how many frames it rests on (and advice when they are
    fewer than :data:`FEW_FRAMES`), and the index the workers build over it (``memory.search``)."""
    spec = search or SearchSpec()
    index = {"search": spec.kind, "index": spec.label(), "device": spec.device}
    if stored is None:
        return {"line": line, "memory": None, **index}
    h = stored.header
    built_on = list(h.calibration.get("image_maxima", ()))
    now = image_threshold([*built_on, *held_out] or [h.image_threshold], false_alarm_rate)
    index["index_bytes"] = spec.index_bytes(stored.n, h.dim)
    basis = {"false_alarm_rate_target": false_alarm_rate, "expected_false_alarm_rate": now.expected_false_alarm_rate,
             "rule": now.rule, "frames": now.frames, "calibration_frames": len(built_on),
             "held_out_frames": len(held_out), "at_build": h.image_threshold}
    if now.frames < FEW_FRAMES:
        basis["advice"] = (f"the image threshold rests on {now.frames} good frames: with about 10, random folders "
                           "flagged 0-22 % of good parts on the shared sets (docs/method.md, 'Fourth reading'); "
                           f"add known-good images (memory add appends) or let the line run: {FEW_FRAMES} or more "
                           "steady it")
    return {"line": line, "source": h.source, "patches": stored.n, "dim": h.dim, "generation": h.generation,
            "policy": h.policy, "max_patches": h.max_patches, "neighbourhood": h.neighbourhood, "norm": h.norm,
            "frames": stored.frames, "patches_seen": stored.seen, "coverage_radius": round(h.radius, 5),
            "image_threshold": now.value, "pixel_threshold": h.pixel_threshold,
            "image_score": ImageScoreRule.from_calibration(h.calibration).describe(),
            "image_threshold_basis": basis,
            "calibration": h.calibration, "bytes": int(stored.feats.nbytes + stored.radius.nbytes),
            "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(h.updated)), **index}


def main(settings: Settings, args: argparse.Namespace) -> int:
    """``lineinspect memory add LINE DIR`` | ``memory show LINE`` | ``memory clear LINE``."""
    from stream.redisclient import make_client

    action, line = args.action, args.line
    client = make_client(settings.redis)  # the deployment's key layout (plain / line_tag) and cluster mode
    store = RedisMemoryStore(client, settings.redis.key_prefix, line)
    try:
        far = settings.detector.false_alarm_rate
        if action == "show":
            print(json.dumps(describe(store.load(), line, store.held_out(), far,
                                      SearchSpec.from_settings(settings.memory)), indent=2))
            return 0
        if action == "clear":
            n = store.clear()
            print(f"line {line}: memory cleared ({n} keys deleted)")
            return 0
        if action == "add":
            if not getattr(args, "dir", None):
                print("memory add needs a folder of known-good images: lineinspect memory add LINE DIR")
                return 2
            from workers.sam import build_sam_backend

            sam = build_sam_backend(settings.sam, taps=settings.sam_taps)
            base = store.load()
            mapper = MemoryMapper(sam_source(sam, settings.memory.layers),
                                  MemoryParams.from_settings(settings.memory, far), store=store)
            images = load_images(args.dir)
            if len(images) < 2:
                print(f"{args.dir}: need at least two known-good images, found {len(images)}")
                return 2
            embs = embed_all(sam, images, True, f"memory add {line}")
            mapper.build(embs, images=[im for _, im in images], base=base)
            mapper.save_over(None if base is None else base.header.generation)
            store.clear_held_out()  # measured against the previous memory
            print(json.dumps(describe(store.load(), line, (), far, SearchSpec.from_settings(settings.memory)),
                             indent=2))
            return 0
        print(f"unknown memory action {action!r} (allowed: add, show, clear)")
        return 2
    except (MemoryMismatchError, MemoryConflict, MemoryMissingError) as exc:
        print(f"line {line}: {exc}")
        return 1
    finally:
        client.close()
