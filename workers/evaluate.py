"""``lineinspect eval DATASET_ROOT``: metrics of the detector on MVTec-layout data, with the CPS ablation.

::

    lineinspect eval DATASET_ROOT [--categories a,b] [--normal-from-train | --mutual] [--normal DIR]
                     [--cps-stages 0,1,2,3]
                     [--kernel ellipse:25] [--max-images N] [--out DIR] [--prompts vip2|ensemble]

Layout: a category is a folder with ``test/<defect type>/*`` images (``good`` = defect-free) and
``ground_truth/<defect type>/<stem>_mask.png``; ``train/good`` holds known-good images. DATASET_ROOT is one
category, or contains categories, possibly nested one level (``root/kolektorsdd/commutator``). A category is
named by its folder; ``--categories`` matches that name or its path relative to the root.

Per category, the SAM embedding and the anomaly map of every test image are computed **once** and shared by
every CPS setting: the detectors of all settings share one caching SAM backend and one memoising mapper
(:mod:`workers.offline`), and this module warms both before running the settings, so their times are
measured apart ("shared" vs "stage" in the table).

Memory (map source memory/fusion): ``--normal-from-train`` (the default when ``train/good`` exists) fills the
memory from the category's ``train/good`` (or from ``--normal DIR`` for every category: a labelled folder grown by
operator review has no ``train/good``); ``--mutual`` scores the (selected) test images against each other.
``--max-images N`` keeps at most N test images per category, taken round-robin over the defect types (good
included) so that a slice still has both classes. Pixel maps are pooled at a longest side of
:data:`DEFAULT_PIXEL_SIZE` px (``args.pixel_size`` when the CLI gives one; 0 = native size).

Writes ``OUT/results.json``, ``OUT/results.md`` and ``OUT/report.html`` (rewritten after every category, so a
stopped run keeps what it finished). Exit code 0 when every category produced metrics, 1 when some category
produced none, 2 on a usage error, 3 when the models cannot be loaded.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from config.settings import Settings, SettingsError
from stream.contracts import ModelLoadError
from workers.dataset import (
    Category,
    EvalImage,
    balanced_order,
    find_categories,
    limit_images,
    select_categories,
    test_images,
)
from workers.eval_metrics import PixelPool, binary_metrics, pr_curve
from workers.imageio import images_in, read_image, read_mask
from workers.operating import MaskPool
from workers.predict import mask_at, score_map_at
from workers.report import (
    CategoryResult,
    EvalReport,
    StageResult,
    Thumbnail,
    caption,
    encode_image,
    overlay_panel,
    write_report,
)

DEFAULT_PIXEL_SIZE = 256
THUMBNAILS_PER_CATEGORY = 6


# ------------------------------------------------------------------------------------------ options


def parse_stages(text: str | Sequence[int] | None, default: int) -> tuple[int, ...]:
    if text is None or text == "":
        return (default,)
    if isinstance(text, str):
        try:
            values = [int(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise ValueError(f"--cps-stages {text!r}: expected comma-separated integers 0..3") from None
    else:
        values = [int(v) for v in text]
    bad = [v for v in values if v not in (0, 1, 2, 3)]
    if bad or not values:
        raise ValueError(f"--cps-stages {text!r}: allowed values 0, 1, 2, 3")
    return tuple(dict.fromkeys(values))


def parse_kernel(text: str) -> dict[str, object]:
    """``ellipse:25`` -> settings overrides for the PPG ring kernel ('' -> none)."""
    if not text:
        return {}
    shape, _, size = text.partition(":")
    if shape not in ("ellipse", "rect", "cross") or not size.isdigit() or int(size) < 1:
        raise ValueError(f"--kernel {text!r}: expected SHAPE:SIZE with SHAPE ellipse|rect|cross, e.g. ellipse:25")
    return {"detector.ppg.kernel_shape": shape, "detector.ppg.kernel_size": int(size)}


def settings_summary(settings: Settings) -> dict:
    d, m, p = settings.detector, settings.memory, settings.detector.ppg
    out = {"map_source": d.map_source, "mask_boost": d.mask_boost,
           "ppg": {"threshold": p.threshold, "top_k": p.top_k, "negatives": p.negatives,
                   "kernel": f"{p.kernel_shape}:{p.kernel_size}", "min_spacing": p.min_spacing,
                   "max_regions": p.max_regions},
           "sam": {"backend": settings.sam.backend, "encoder": settings.sam.encoder_path,
                   "decoder": settings.sam.decoder_path, "model_type": settings.sam.model_type,
                   "checkpoint": settings.sam.checkpoint}}
    if d.uses_memory:
        out["memory"] = {"features": m.features, "k": m.k, "neighbourhood": m.neighbourhood,
                         "max_patches": m.max_patches, "policy": m.policy}
    if d.uses_clip:
        c = settings.clip
        out["clip"] = {"model": c.model, "pretrained": c.pretrained, "prompt_mode": c.prompt_mode,
                       "adapters": c.adapters, "prompts": c.prompts, "image_size": c.image_size}
    return out


# ------------------------------------------------------------------------------------------ one category


class _StageAccumulator:
    def __init__(self, stage: int, pixel_size: int | None):
        self.stage = stage
        self.pool = PixelPool(size=pixel_size)
        self.masks = MaskPool(size=pixel_size)
        self.image_scores: list[float] = []
        self.image_labels: list[bool] = []
        self.image_names: list[str] = []
        self.stage_s: list[float] = []
        self.timings: dict[str, list[float]] = {}

    def result(self, shared_s: float) -> StageResult:
        scores = np.asarray(self.image_scores, np.float64)
        labels = np.asarray(self.image_labels, bool)
        flagged = scores > 1.0  # the verdict rule: above the calibrated (or configured) image threshold (as in
        # the published-mask pool's count of flagged images without a mask)
        return StageResult(
            stage=self.stage, image=binary_metrics(scores, labels), pixel=self.pool.compute(),
            images=len(self.image_scores), shared_s=shared_s, stage_s=float(np.mean(self.stage_s)),
            timings={k: float(np.mean(v)) for k, v in sorted(self.timings.items())},
            pixel_curve=self.pool.curve(), image_curve=pr_curve(scores, labels),
            flagged_defect=float(flagged[labels].mean()) if labels.any() else float("nan"),
            flagged_good=float(flagged[~labels].mean()) if (~labels).any() else float("nan"),
            operating=self.masks.result(),
            image_scores=tuple(zip(self.image_names, self.image_labels, self.image_scores, strict=True)))


def evaluate_category(cat: Category, items: Sequence[EvalImage], session, stages: Sequence[int],
                      pixel_size: int | None, memory: str, thumbnails: int = THUMBNAILS_PER_CATEGORY,
                      progress: bool = True) -> CategoryResult:
    """Run every stage's detector on ``items`` (embedding and map once per image, via ``session``)."""
    from tqdm import tqdm

    accs = {s: _StageAccumulator(s, pixel_size) for s in stages}
    thumb_keys = {x.rel for x in balanced_order(items)[:thumbnails]}
    thumbs: list[Thumbnail] = []
    shared: list[float] = []
    failed: list[tuple[str, str]] = []
    for it in tqdm(items, desc=f"eval {cat.name}", unit="img", disable=not progress, file=sys.stderr):
        key = f"{cat.rel}/{it.rel}"
        try:
            image = read_image(it.path)
            shape = image.shape[:2]
            gt = read_mask(it.mask, shape) if it.mask is not None else None
            if it.is_defect and gt is None:
                print(f"eval: {cat.name}/{it.rel}: no ground-truth mask; pixel metrics treat it as all-normal",
                      file=sys.stderr)
            shared_s = session.prepare(image, key)
            dets = {}
            for s in stages:
                t0 = time.perf_counter()
                dets[s] = session.detectors[s].inspect(image, key)
                dets[s] = (dets[s], time.perf_counter() - t0)
        except Exception as exc:  # report, skip, go on
            failed.append((it.rel, f"{type(exc).__name__}: {exc}"))
            print(f"eval: {cat.name}/{it.rel} skipped: {type(exc).__name__}: {exc}", file=sys.stderr)
            continue
        shared.append(shared_s)
        panels = [caption(overlay_panel(image, None, None, gt), f"{it.rel}")] if it.rel in thumb_keys else []
        for s, (det, dt) in dets.items():
            acc = accs[s]
            score = score_map_at(det, shape)
            acc.pool.add(score, gt)
            acc.masks.add(mask_at(det, shape), gt, flagged=float(det.image_score) > 1.0)
            acc.image_scores.append(float(det.image_score))
            acc.image_labels.append(it.is_defect)
            acc.image_names.append(it.rel)
            acc.stage_s.append(dt)
            for name, v in det.timings.items():
                acc.timings.setdefault(name, []).append(float(v))
            if panels:
                panels.append(caption(overlay_panel(image, score, mask_at(det, shape), gt),
                                      f"stages {s}: score {float(det.image_score):.2f}"))
        if panels:
            thumbs.append(Thumbnail(it.rel, it.defect, encode_image(np.hstack(panels))))
    if not shared:
        raise RuntimeError(f"{cat.name}: no test image could be evaluated")
    shared_mean = float(np.mean(shared))
    ok = [it for it in items if it.rel not in {f[0] for f in failed}]
    return CategoryResult(
        name=cat.name, root=str(cat.root), memory=memory, images=len(ok),
        defect_images=sum(it.is_defect for it in ok), stages=tuple(accs[s].result(shared_mean) for s in stages),
        thumbnails=tuple(thumbs), failed=tuple(failed))


# ------------------------------------------------------------------------------------------ main


def run_eval(settings: Settings, root: Path, out_dir: Path, categories: str = "", stages: Sequence[int] = (0,),
             mode: str | Sequence[str] = "auto", max_images: int = 0, pixel_size: int | None = DEFAULT_PIXEL_SIZE,
             command: str = "", progress: bool = True, mapper_factory=None,
             backend=None, normal: Path | None = None) -> tuple[EvalReport, dict[str, Path]]:
    """Evaluate ``stages`` on the categories under ``root``; writes the report files into ``out_dir``.

    ``mode``: ``train`` (memory from train/good), ``mutual`` (label-free), ``auto`` (train when train/good has
    images, else mutual), or several of them (one result per category and mode, in one report). Ignored when
    the map source needs no memory. ``backend``: an already loaded SAM backend (default: built from
    ``settings.sam``); ``mapper_factory``: see :mod:`workers.offline`. ``normal``: a folder of known-good
    images that mode ``train`` (and ``auto``) uses for every category instead of its ``train/good`` (e.g. the
    line's own good parts for a labelled folder grown by operator review, which has no ``train/good``).
    """
    from workers import offline

    modes = parse_modes(mode)
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    t_start = time.perf_counter()
    cats = select_categories(find_categories(root), categories)
    if not cats:
        raise ValueError(f"no MVTec-layout category (a folder with test/) under {root}")
    backend = backend if backend is not None else offline.build_backend(settings)
    results: list[CategoryResult] = []
    models: dict[str, str] = {}

    def _write(done: list[CategoryResult]) -> tuple[EvalReport, dict[str, Path]]:
        rep = EvalReport(dataset_root=str(root), command=command, settings=settings_summary(settings),
                         models=models, stages=tuple(stages), pixel_size=pixel_size, categories=tuple(done),
                         wall_s=time.perf_counter() - t_start, started=started,
                         false_alarm_target=settings.detector.false_alarm_rate)
        return rep, write_report(rep, out_dir)

    for cat in cats:
        items = limit_images(test_images(cat), max_images)
        if not items:
            print(f"eval: {cat.name}: no test images, skipped", file=sys.stderr)
            continue
        train_dir = Path(normal) if normal is not None else cat.train_good
        train = images_in(train_dir)
        for cat_mode in modes:
            done = _evaluate_mode(settings, cat, items, (train_dir, train), cat_mode, stages, backend, pixel_size,
                                  mapper_factory, progress)
            if done is None:
                continue
            results.append(done[0])
            models = done[1]
            # the report so far after every category: a long run that is stopped keeps what it finished
            _write(results)
    return _write(results)


def parse_modes(mode: str | Sequence[str]) -> tuple[str, ...]:
    """``train,mutual`` / a sequence -> distinct memory modes (allowed: train, mutual, auto)."""
    items = [m.strip() for m in (mode.split(",") if isinstance(mode, str) else mode) if m.strip()]
    bad = [m for m in items if m not in ("train", "mutual", "auto")]
    if bad or not items:
        raise ValueError(f"memory modes {list(items)}: allowed train, mutual, auto")
    return tuple(dict.fromkeys(items))


def _evaluate_mode(settings: Settings, cat: Category, items: Sequence[EvalImage],
                   normal: tuple[Path, Sequence[Path]], mode: str, stages: Sequence[int], backend,
                   pixel_size: int | None, mapper_factory,
                   progress: bool) -> tuple[CategoryResult, dict[str, str]] | None:
    """One category under one memory mode; None (reported) when it cannot be evaluated."""
    from dataclasses import replace

    from workers import offline

    train_dir, train = normal
    if mode == "auto":
        mode = "train" if train else "mutual"
    if mode == "train" and not train:
        print(f"eval: {cat.name}: no metrics: memory from train/good asked, but {train_dir} has no "
              "images", file=sys.stderr, flush=True)
        return None
    normal_dir = train_dir if mode == "train" else None
    source = "train/good" if train_dir == cat.train_good else str(train_dir)
    uses_memory = settings.detector.uses_memory
    memory = ("none" if not uses_memory else
              f"{source} ({len(train)} images)" if normal_dir else f"mutual ({len(items)} test images)")
    print(f"eval: {cat.name}: {len(items)} test images, memory: {memory}", flush=True)
    try:
        session = offline.StageSession.build(settings, stages, backend=backend, normal_dir=normal_dir,
                                             mutual_images=[it.path for it in items], line=cat.name,
                                             mapper_factory=mapper_factory)
        result = evaluate_category(cat, items, session, stages, pixel_size, memory, progress=progress)
        session.close()
    except (ModelLoadError, KeyboardInterrupt):
        raise
    except Exception as exc:  # one category failing (too few normal images, ...) does not end the run
        print(f"eval: {cat.name}: no metrics: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        return None
    return replace(result, mode=mode if uses_memory else ""), dict(session.models)


def main(settings: Settings, args: argparse.Namespace, mapper_factory=None) -> int:
    root = Path(args.root)
    if not root.is_dir():
        print(f"lineinspect eval: {root} is not a folder", file=sys.stderr)
        return 2
    try:
        stages = parse_stages(getattr(args, "cps_stages", None), settings.detector.cps_stages)
        overrides = parse_kernel(getattr(args, "kernel", "") or "")
        if getattr(args, "prompts", None):
            overrides["clip.prompt_mode"] = args.prompts
        if overrides:
            settings = settings.with_overrides(**overrides)
    except (ValueError, SettingsError) as exc:
        print(f"lineinspect eval: {exc}", file=sys.stderr)
        return 2
    mode = ("mutual" if getattr(args, "mutual", False) else "train" if getattr(args, "normal_from_train", False)
            else getattr(args, "modes", "") or "auto")
    try:
        modes = parse_modes(mode)
    except ValueError as exc:
        print(f"lineinspect eval: --modes: {exc}", file=sys.stderr)
        return 2
    px = getattr(args, "pixel_size", DEFAULT_PIXEL_SIZE)
    pixel_size = None if px in (0, None) else int(px)
    from workers import offline
    from workers.predict import describe_models

    for line in describe_models(settings):
        print(f"eval: {line}", flush=True)
    command = "lineinspect " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv else ""
    try:
        backend = offline.build_backend(settings, getattr(args, "embedding_cache", "") or "")
        normal = getattr(args, "normal", None)
        report, paths = run_eval(settings, root, Path(args.out), getattr(args, "categories", "") or "", stages,
                                 modes, int(getattr(args, "max_images", 0) or 0), pixel_size, command,
                                 mapper_factory=mapper_factory, backend=backend,
                                 normal=Path(normal) if normal else None)
    except ModelLoadError as exc:
        print(f"lineinspect eval: cannot load the models: {exc}", file=sys.stderr)
        return 3
    except ValueError as exc:
        print(f"lineinspect eval: {exc}", file=sys.stderr)
        return 2
    print((Path(paths["md"]).read_text()), flush=True)
    print(f"eval: wrote {', '.join(str(p) for p in paths.values())} in {report.wall_s:.0f} s", flush=True)
    expected = len(modes) * len(select_categories(find_categories(root), getattr(args, "categories", "") or ""))
    return 0 if len(report.categories) == expected else 1
