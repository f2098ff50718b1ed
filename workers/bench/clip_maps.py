"""Per-frame time of the CLIP mappers on this machine: the ensemble mapper alone (:func:`run`, the command
line), and the ensemble next to ViP² prompts on the same backbone (:func:`bench_prompt_modes`, run by
``lineinspect bench --prompt-modes``).

    python -m workers.bench.clip_maps --model ViT-S-32 --size 320 --layers 3,6,9,12 --vv 4 --threads 1
    python -m workers.bench.clip_maps --model ViT-L-14-336 --size 336 --frames 3 --threads 1

``--pretrained random`` (the default, since no CLIP weights exist on the development machine) times the
real architecture with random weights: the maps mean nothing, the time is the real one. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


def run(model: str, pretrained: str, size: int, layers: tuple[int, ...], vv: int, frames: int, threads: int,
        image: str = "", adapters: str = "") -> dict:
    import cv2
    import torch

    from config.settings import Settings
    from workers.clip.mapper import build_clip_mapper

    if threads > 0:
        torch.set_num_threads(threads)
    settings = Settings.load(overrides={
        "clip.model": model, "clip.pretrained": pretrained, "clip.image_size": size, "clip.layers": list(layers),
        "clip.vv_attention": vv > 0, "clip.vv_blocks": max(vv, 1), "clip.adapters": adapters,
        "clip.allow_random_weights": pretrained == "random"})
    t0 = time.perf_counter()
    mapper = build_clip_mapper(settings.clip)
    t1 = time.perf_counter()
    mapper.prepare()
    t2 = time.perf_counter()
    if image:
        frame = cv2.imread(image, cv2.IMREAD_COLOR)
        if frame is None:
            raise SystemExit(f"cannot read {image}")
    else:
        frame = np.random.default_rng(0).integers(0, 256, (512, 512, 3), dtype=np.uint8)
    mapper.map(frame, None)  # warm-up
    times, forward = [], []
    for _ in range(frames):
        a = time.perf_counter()
        out = mapper.map(frame, None)
        times.append(time.perf_counter() - a)
        forward.append(out.timings["clip_forward"])
    return {"mapper": mapper.name, "mode": mapper.mode, "input_px": mapper.backbone.image_size,
            "grid": mapper.backbone.grid_size, "layers": list(mapper.layers), "frame": list(frame.shape[:2]),
            "torch_threads": torch.get_num_threads(), "frames": frames,
            "ms_per_frame_mean": round(1000 * float(np.mean(times)), 1),
            "ms_per_frame_min": round(1000 * float(np.min(times)), 1),
            "ms_forward_mean": round(1000 * float(np.mean(forward)), 1),
            "load_s": round(t1 - t0, 2), "text_s": round(t2 - t1, 2)}


def bench_prompt_modes(model: str = "ViT-S-32", image_size: int = 224, n_frames: int = 5,
                       pretrained: str = "random", layers: Sequence[int] | None = None,
                       device: str = "cpu", frame_size: tuple[int, int] = (480, 640),
                       warmup: int = 1) -> dict[str, Any]:
    """Per-frame time of the ViP² map next to the ensemble map on the same backbone and input size.

    Both mappers are built through their settings (``prompt_mode`` ensemble / vip2); with ``pretrained=
    "random"`` random weights are allowed (timing only, the maps mean nothing). Frames are synthetic
    ``frame_size`` BGR images, mapped one at a time after ``warmup`` untimed frames. Returns milliseconds per
    frame for each mode (mean and min) and the mean of each mapper's own stage timings.

    Command line: ``lineinspect bench --prompt-modes``.
    """
    import torch

    from config.settings import ClipSettings
    from workers.clip import build_clip_mapper
    from workers.clip.backbone import load_clip_backbone
    from workers.clip.vip2 import default_layers

    allow_random = pretrained == "random"
    if layers is None:
        probe = load_clip_backbone(model, pretrained, image_size, device=device, allow_random=allow_random)
        layers = default_layers(probe)
        del probe
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (*frame_size, 3), dtype=np.uint8) for _ in range(n_frames)]
    result: dict[str, Any] = {"model": model, "pretrained": pretrained, "image_size": image_size,
                              "layers": list(layers), "n_frames": n_frames, "frame_size": list(frame_size),
                              "torch_threads": torch.get_num_threads()}
    for mode in ("ensemble", "vip2"):
        cs = ClipSettings(model=model, pretrained=pretrained, image_size=image_size, layers=tuple(layers),
                          prompt_mode=mode, device=device, allow_random_weights=allow_random)
        mapper = build_clip_mapper(cs)  # prompt_mode vip2: workers.clip.vip2_mapper.build_vip2_mapper
        for f in frames[:warmup]:
            mapper.map(f, None)
        times = []
        stages: dict[str, list[float]] = {}
        for f in frames:
            t0 = time.perf_counter()
            amap = mapper.map(f, None)
            times.append(time.perf_counter() - t0)
            for k, v in amap.timings.items():
                stages.setdefault(k, []).append(v)
        result[f"{mode}_ms_per_frame"] = 1000.0 * float(np.mean(times))
        result[f"{mode}_stages_ms"] = {k: 1000.0 * float(np.mean(v)) for k, v in stages.items()}
        result[f"{mode}_ms_min"] = 1000.0 * float(np.min(times))
        result[f"{mode}_name"] = mapper.name
    result["vip2_over_ensemble"] = result["vip2_ms_per_frame"] / result["ensemble_ms_per_frame"]
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m workers.bench.clip_maps", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="ViT-S-32")
    p.add_argument("--pretrained", default="random")
    p.add_argument("--size", type=int, default=0, help="input px (0 = native)")
    p.add_argument("--layers", default="", help="comma list, 1-based (default: 4 evenly spaced)")
    p.add_argument("--vv", type=int, default=0, help="value-value attention blocks (0 = off)")
    p.add_argument("--frames", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch default)")
    p.add_argument("--image", default="", help="a frame to map (default: random 512x512)")
    p.add_argument("--adapters", default="")
    a = p.parse_args(argv)
    import open_clip

    vision = open_clip.get_model_config(a.model)["vision_cfg"]
    if a.layers:
        layers = tuple(int(x) for x in a.layers.split(","))
    else:
        layers = tuple(vision["layers"] * i // 4 for i in range(1, 5))
    size = a.size or int(vision["image_size"])
    res = run(a.model, a.pretrained, size, layers, a.vv, a.frames, a.threads, a.image, a.adapters)
    if a.image:
        res["image"] = Path(a.image).name
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
