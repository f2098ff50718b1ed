"""One device's line speed: frames/s of the whole detector, its per-stage split, and the ratio to the bare encoder.

    .venv/bin/python -m workers.bench.gpu_check [--label GPU0] [--frames 8] [--train 12] [--data DIR]

Run by ``deploy/gpu_check.sh`` once per GPU (``CUDA_VISIBLE_DEVICES`` set to one GPU each time), or once on
the CPU when there is no GPU, which it says. Settings: the defaults (and ``--config`` files / environment),
with ``sam.providers`` = TensorRT, CUDA, CPU and ``memory.device`` = cuda when a GPU is visible (each falls
back to the CPU with a warning when this onnxruntime or torch lacks it; the providers really used are
printed). The memory is built from ``--train`` images of ``DIR/train/good`` (no Redis), then ``--frames``
test images run through :class:`workers.pipeline.Detector` (encoder, memory map, PPG, CPS), each a new
frame (no embedding cache hit). The limit is the bare encoder on the same frames in the same run.
Prints figures, asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from workers.bench import DEMO

if TYPE_CHECKING:
    import numpy as np

    from workers.interfaces import FrameDetector, SamBackend

GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")


def _images(folder: Path, n: int) -> list[Path]:
    from workers.imageio import IMAGE_EXTENSIONS

    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    return files[:n] if n > 0 else files


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m workers.bench.gpu_check")
    ap.add_argument("--label", default="", help="name of the device in the printout (e.g. GPU0)")
    ap.add_argument("--data", default=str(DEMO), help="a category folder (train/good, test/...)")
    ap.add_argument("--frames", type=int, default=8, help="test frames through the detector")
    ap.add_argument("--train", type=int, default=12, help="train/good images for the memory")
    ap.add_argument("--config", action="append", default=[], help="settings YAML (repeatable)")
    args = ap.parse_args(argv)

    import torch

    from config.settings import Settings
    from workers.imageio import read_image
    from workers.memory.features import sam_source
    from workers.memory.mapper import MemoryMapper
    from workers.memory.params import MemoryParams
    from workers.pipeline import Detector, DetectorConfig
    from workers.sam import build_sam_backend

    gpu = torch.cuda.is_available() and torch.cuda.device_count() > 0
    overrides = {"sam.providers": list(GPU_PROVIDERS), "memory.device": "cuda"} if gpu else {}
    settings = Settings.load(*args.config, overrides=overrides)
    where = _where(torch, gpu)
    sam = build_sam_backend(settings.sam, taps=settings.sam_taps)
    used = list(getattr(sam, "active_providers", ())) or [getattr(sam, "device", "?")]
    data = Path(args.data)
    train = [read_image(p) for p in _images(data / "train" / "good", args.train)]
    frames = [read_image(p) for p in _images(data / "test", args.frames)]
    if len(train) < 2 or not frames:
        raise SystemExit(f"{data}: need >= 2 train/good images and >= 1 test image")

    params = MemoryParams.from_settings(settings.memory)
    mapper = MemoryMapper(sam_source(sam, params.layers), params).build(
        [sam.embed(im, f"train:{i}") for i, im in enumerate(train)])
    detector = Detector(sam, mapper, DetectorConfig.from_settings(settings))

    enc_s = _time_encoder(sam, frames)
    wall, stages = _time_detector(detector, frames)
    fps = len(frames) / wall
    label = args.label or ("GPU" if gpu else "CPU")
    print(f"[{label}] {where}")
    print(f"[{label}] SAM {sam.name}: providers used {used}; memory search {mapper.rows.search.describe()['index']} "
          f"on {mapper.rows.search.device}; memory {mapper.size} x {mapper.rows.feats.shape[1]} from {len(train)} images; "
          f"{len(frames)} frames of {data.name}")
    print(f"[{label}] detector {fps:.3f} frames/s ({wall / len(frames) * 1e3:.0f} ms/frame); bare encoder "
          f"{1 / enc_s:.3f} frames/s ({enc_s * 1e3:.0f} ms/frame); ratio {fps * enc_s:.2f} (frames/s x encoder s)")
    _print_stages(label, stages, enc_s)
    return 0


def _where(torch: Any, gpu: bool) -> str:
    if gpu:
        return f"GPU {torch.cuda.get_device_name(0)}"
    return (f"CPU ({os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}): no GPU visible to torch "
            f"(torch {torch.__version__}, CUDA build {torch.version.cuda}); these are CPU figures")


def _time_encoder(sam: SamBackend, frames: list[np.ndarray]) -> float:
    """Mean seconds of the bare encoder per frame (after one warm-up frame)."""
    sam.embed(frames[0], "warm-up")
    enc = []
    for i, im in enumerate(frames):
        t0 = time.perf_counter()
        sam.embed(im, f"bare:{i}")
        enc.append(time.perf_counter() - t0)
    return statistics.mean(enc)


def _time_detector(detector: FrameDetector, frames: list[np.ndarray]) -> tuple[float, dict[str, list[float]]]:
    """Wall seconds of the detector over ``frames`` (after one warm-up frame) and its stage timings per frame."""
    detector.inspect(frames[0], "warm-up")
    stages: dict[str, list[float]] = {}
    t_all = time.perf_counter()
    for i, im in enumerate(frames):
        det = detector.inspect(im, f"frame:{i}")
        for k, v in det.timings.items():
            stages.setdefault(k, []).append(float(v))
    return time.perf_counter() - t_all, stages


def _print_stages(label: str, stages: dict[str, list[float]], enc_s: float) -> None:
    total = sum(statistics.mean(v) for k, v in stages.items() if "." not in k)
    for k, v in stages.items():
        m = statistics.mean(v)
        share = f"{m / total * 100:5.1f} %" if "." not in k and total > 0 else "  (in map)"
        print(f"[{label}]   {k:22s} {m * 1e3:9.1f} ms  {share}  x encoder {m / enc_s:.2f}")
    knn = stages.get("map.memory_knn")
    if knn:
        print(f"[{label}] memory kNN / encoder = {statistics.mean(knn) / enc_s:.2f} (target <= 0.3)")


if __name__ == "__main__":
    raise SystemExit(main())
