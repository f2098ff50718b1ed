"""Per-stage timings of the SAM side on one real frame: encoder, PPG, each CPS decoder pass.

    .venv/bin/python -m workers.bench.stage_timings [--threads N] [--image IMG --mask GT_MASK] [--repeat N]

The anomaly map is the ground-truth mask blurred (a stand-in: the map stage is timed by the mapper's own
benchmarks), so PPG and the cascade see one realistic region. Wall-clock seconds (``time.perf_counter``);
on a shared CPU these depend on the load, which is printed with the figures.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

from workers.bench import DEMO


def main(argv: list[str] | None = None) -> int:
    import cv2
    import numpy as np

    from config.settings import Settings
    from workers.cps import cascade
    from workers.ppg import generate_prompts
    from workers.sam import build_sam_backend
    from workers.sam_onnx import OnnxSamBackend

    ap = argparse.ArgumentParser(prog="python -m workers.bench.stage_timings")
    ap.add_argument("--image", default=str(DEMO / "test" / "colour" / "14.jpg"))
    ap.add_argument("--mask", default=str(DEMO / "ground_truth" / "colour" / "14_mask.png"))
    ap.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0 = default)")
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args(argv)

    settings = Settings.load()
    backend = build_sam_backend(settings.sam, taps=settings.sam_taps)
    if isinstance(backend, OnnxSamBackend) and args.threads:
        backend = OnnxSamBackend(backend.encoder_path, backend.decoder_path, backend.providers,
                                 intra_op_threads=args.threads, taps=backend.taps).load()
    img = cv2.imread(args.image)
    gt = cv2.imread(args.mask, cv2.IMREAD_GRAYSCALE)
    if img is None or gt is None:
        raise SystemExit(f"cannot read {args.image} or {args.mask}")
    amap = cv2.GaussianBlur((gt > 127).astype(np.float32), (0, 0), 6) * 2.0

    def timed(fn, n):
        out, times = None, []
        for _ in range(n):
            t0 = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - t0)
        return out, times

    backend.embed(img, "warm-up")
    emb, enc = timed(lambda: backend.embed(img, "frame"), args.repeat)
    regions, ppg = timed(lambda: generate_prompts(amap, emb, settings.detector.ppg), 4 * args.repeat)
    if not regions:
        raise SystemExit("the mask gives no region above the PPG threshold")
    passes: dict[str, list[float]] = {"cps1": [], "cps2": [], "cps3": []}
    for _ in range(args.repeat):
        for k, v in cascade(backend, emb, regions[0], 3).timings.items():
            passes[k].append(v)

    print(f"{backend.name} threads={args.threads or 'default'} image={Path(args.image).name} "
          f"{img.shape[1]}x{img.shape[0]} load={os.getloadavg()[0]:.1f} cpus={os.cpu_count()}")
    for name, v in [("encoder", enc), ("ppg", ppg), *passes.items()]:
        print(f"  {name:8s} median {statistics.median(v) * 1e3:8.1f} ms   min {min(v) * 1e3:8.1f} ms   n={len(v)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
