"""Image scores compared at the operating point: which reading of the anomaly map makes a verdict.

    .venv/bin/python -m workers.bench.image_scores [--data ../shared/data] [--cache /tmp/li-emb]
        [--max-test 60] [--false-alarm-rate 0.01] [--set KEY=VALUE ...]

Per category (MVTec layout): the memory is built from ``train/good`` as ``memory add`` builds it (default
settings, or those ``--set`` gives), the leave-one-out maps of the good images are computed as the calibration
computes them, and each test image (a slice balanced over defect types) is mapped with the line's search. Every candidate image score
is then read off the same maps: the maximum after smoothing to sigma 8 / 16 / 24 / 32 / 48 / 64 px (at 1024) and the
25th-99.9th percentiles of the map, and the region reading (``region``: the largest region's summed excess over
the level that 99.8 % of the leave-one-out pixels stay under, or ``memory.region_quantile``'s). For each it prints
image AUROC (the ranking) and, at the threshold the
calibration sets from the leave-one-out scores for ``--false-alarm-rate`` (:func:`image_threshold`), the
share of defective and of good test images flagged (what the line does). Then the same for combinations read
as :class:`workers.memory.image_score.ImageScoreRule` combines them (each reading over its normal 90th
percentile, the region reading over its 95th with the product's floor; the largest counts): the rule of absolute
readings (24 px, 64 px, p90) and variants whose compact readings are taken above the frame's own median
(``rel@S`` = ``max@S - p50``) and whose wide reading is the map's spread (``p90-p25``), each with and without the
region reading; the product's is ``rel@24+64, spread, region`` with the default settings. ``--set KEY=VALUE`` overrides a setting (e.g. ``--set 'memory.layers=[neck, stage1, stage2,
stage3]'``). Under the table, where the threshold of the product's combination sits (the rule that set it;
good leave-one-out, good test and missed defects' scores in its units). ``--from-dump FILE`` reports from an
earlier ``--dump`` without computing anything. Label-free mode is not covered (its
calibration reads its own references; use ``lineinspect eval --modes mutual``). Prints figures, asserts
nothing.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from workers.bench import REPO_ROOT

SIGMAS = (8.0, 16.0, 24.0, 32.0, 48.0, 64.0)
PERCENTILES = (99.9, 99.5, 99.0, 98.0, 95.0, 90.0, 50.0, 25.0)
COMBINATIONS = {  # name: candidate keys, combined as ImageScoreRule combines its readings
    "rule": ("max@24", "max@64", "p90"),
    "rule, rel@24": ("rel@24", "max@64", "p90"),
    "rule, rel@24+64": ("rel@24", "rel@64", "p90"),
    "rel@24+64": ("rel@24", "rel@64"),
    "rel@24+64, spread": ("rel@24", "rel@64", "p90-p25"),
    "rel@24+64, spread, region": ("rel@24", "rel@64", "p90-p25", "region"),
    "rule, region": ("max@24", "max@64", "p90", "region"),
}


def candidate_scores(raw: np.ndarray, embedding, params, region_level: float = 0.0) -> dict[str, float]:
    """Every candidate reading of one raw map (``region``: the region reading above ``region_level``, when > 0)."""
    from workers.memory.image_score import map_readings, smoothed_maxima

    maxima = smoothed_maxima(raw, embedding, SIGMAS, params.smoothing_sigma)
    out = {f"max@{s:g}": v for s, v in zip(SIGMAS, maxima, strict=True)}
    flat = raw.ravel()
    out.update({f"p{q:g}": float(np.percentile(flat, q)) for q in PERCENTILES})
    out.update({f"rel@{s:g}": out[f"max@{s:g}"] - out["p50"] for s in SIGMAS})
    out["p90-p25"] = out["p90"] - out["p25"]
    if region_level > 0:
        out["region"] = map_readings(raw, embedding, (), 0.0, params.smoothing_sigma, region_level=region_level)[0]
    return out


def combined(loo: list[dict], tests: list[tuple[bool, dict]], keys: tuple[str, ...]
             ) -> tuple[list[dict], list[tuple[bool, dict]]]:
    """Leave-one-out and test scores of one combination: max over ``keys`` of each over its normal reference."""
    from workers.memory.image_score import REFERENCE_QUANTILE, region_reference

    refs = np.quantile(np.asarray([[x[k] for k in keys] for x in loo], np.float64), REFERENCE_QUANTILE, axis=0)
    refs = np.maximum(refs, 1e-6)
    if "region" in keys:  # the product's reference of the region reading
        refs[keys.index("region")] = region_reference([x["region"] for x in loo], loo[0]["region_level"])

    def score(x: dict) -> dict:
        return {"+".join(keys): float(max(x[k] / r for k, r in zip(keys, refs, strict=True)))}

    return [score(x) for x in loo], [(d, score(x)) for d, x in tests]


def auroc(good: np.ndarray, bad: np.ndarray) -> float:
    if not len(good) or not len(bad):
        return float("nan")
    return float((bad[:, None] > good[None]).mean() + 0.5 * (bad[:, None] == good[None]).mean())


def category_scores(cat, backend, settings, max_test: int) -> tuple[list[dict], list[tuple[bool, dict]]]:
    """(leave-one-out candidate scores of the good images, [(is defect, candidate scores)] of the test slice)."""
    from config.settings import MemorySettings
    from workers.dataset import limit_images, test_images
    from workers.imageio import read_image
    from workers.memory.calibration import leave_one_out_maps, region_level
    from workers.memory.coreset import build_memory
    from workers.memory.features import patch_features
    from workers.memory.folder import load_images
    from workers.memory.mapper import MemoryMapper
    from workers.memory.params import MemoryParams

    params = MemoryParams.from_settings(settings.memory, settings.detector.false_alarm_rate)
    embs = [backend.embed(im, f"train:{i}") for i, (_, im) in enumerate(load_images(cat.root / "train" / "good"))]
    feats = [patch_features(e, params.neighbourhood, params.norm, params.layers)[0] for e in embs]
    maps, _, level = leave_one_out_maps(feats, embs, build_memory(feats, params), params)
    if not level:  # the region reading is read whatever the setting: at the default level when it is off
        level = region_level(maps, MemorySettings.region_quantile)
    loo = [{**candidate_scores(m, embs[i], params, level), "region_level": level} for i, m in enumerate(maps)]
    mapper = MemoryMapper.from_embeddings("bench", embs, params)
    tests = []
    for it in limit_images(test_images(cat), max_test):
        image = read_image(it.path)
        emb = backend.embed(image, it.rel)
        tests.append((it.is_defect, candidate_scores(mapper.map(image, emb).raw, emb, params, level)))
    return loo, tests


def product_rule(contrast: bool, region: bool) -> str:
    """The combination the product's :class:`ImageScoreRule` reads (``memory.score_contrast`` and
    ``memory.region_quantile`` on or off)."""
    return ("rel@24+64, spread" if contrast else "rule") + (", region" if region else "")


def threshold_detail(label: str, thr, r_loo: list[dict], r_tests: list[tuple[bool, dict]], key: str) -> None:
    """Where the calibrated threshold ``thr`` (:class:`ImageThreshold`) of one score sits: the rule that set it,
    and the leave-one-out and test scores around it in units of the threshold."""
    loo = np.array([x[key] for x in r_loo]) / thr.value
    good = np.array([s[key] for d, s in r_tests if not d]) / thr.value
    bad = np.sort(np.array([s[key] for d, s in r_tests if d]) / thr.value)

    def q(v: np.ndarray) -> str:
        return "/".join(f"{x:.2f}" for x in np.quantile(v, (0.5, 0.9, 1.0))) if len(v) else "-"

    missed = bad[bad <= 1.0]
    print(f"  threshold of '{label}': {thr.rule}; in its units, median/90th/max: good leave-one-out {q(loo)}, "
          f"good test {q(good)}; defects missed {len(missed)} of {len(bad)}, the highest of them at "
          f"{missed[-3:].round(3).tolist()}")


def report(name: str, loo: list[dict], tests: list[tuple[bool, dict]], rate: float, product: str) -> None:
    from workers.memory.calibration import image_threshold

    print(f"\n{name}: {len(loo)} good images calibrate, {len(tests)} test images "
          f"({sum(d for d, _ in tests)} defective); threshold for a false-alarm rate of {rate:g}")
    print(f"  {'score':27s} {'AUROC':>6s} {'defects flagged':>16s} {'good flagged':>13s}")
    rows = [(key, loo, tests, key) for key in loo[0] if key != "region_level"]
    for name, keys in COMBINATIONS.items():
        if not all(k in loo[0] for k in keys):  # a dump from before the region reading
            continue
        c_loo, c_tests = combined(loo, tests, keys)
        rows.append((name, c_loo, c_tests, "+".join(keys)))
    if "region" not in loo[0]:  # a dump from before the region reading: the product's rule without it
        product = product.removesuffix(", region")
    detail = None
    for label, r_loo, r_tests, key in rows:
        calibrated = image_threshold([x[key] for x in r_loo], rate)
        thr = calibrated.value
        bad = np.array([s[key] for d, s in r_tests if d])
        good = np.array([s[key] for d, s in r_tests if not d])
        print(f"  {label:27s} {100 * auroc(good, bad):6.1f} {100 * float(np.mean(bad > thr)):15.1f}% "
              f"{100 * float(np.mean(good > thr)):12.1f}%")
        if label == product:
            detail = (label, calibrated, r_loo, r_tests, key)
    if detail is not None:
        threshold_detail(*detail)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m workers.bench.image_scores", description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=str(REPO_ROOT.parent / "shared" / "data"))
    ap.add_argument("--cache", default="", help="folder for cached embeddings (empty: no cache)")
    ap.add_argument("--dump", default="", help="write every candidate score (good leave-one-out and test) to this JSON file")
    ap.add_argument("--from-dump", default="", help="report from a --dump file instead of computing the scores")
    ap.add_argument("--categories", default="", help="comma-separated category folder names (default all)")
    ap.add_argument("--max-test", type=int, default=60, help="test images per category (balanced; 0 = all)")
    ap.add_argument("--false-alarm-rate", type=float, default=0.0, help="default: detector.false_alarm_rate")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override one setting, as lineinspect --set does (repeatable)")
    args = ap.parse_args(argv)

    from config.loading import parse_override
    from config.settings import Settings
    from workers.dataset import find_categories
    from workers.offline import build_backend

    settings = Settings().with_overrides(**dict(parse_override(o) for o in args.overrides))
    rate = args.false_alarm_rate or settings.detector.false_alarm_rate
    wanted = {c for c in args.categories.split(",") if c}
    product = product_rule(settings.memory.score_contrast, settings.memory.region_quantile > 0)
    if args.from_dump:
        for name, d in json.loads(Path(args.from_dump).read_text()).items():
            if not wanted or name in wanted:
                tests = [(x.pop("defect"), x) for x in d["test"]]
                report(name, d["good_loo"], tests, rate, product)
        return 0
    backend = build_backend(settings, args.cache)
    dump = {}
    for cat in find_categories(Path(args.data)):
        if wanted and cat.name not in wanted:
            continue
        loo, tests = category_scores(cat, backend, settings, args.max_test)
        report(cat.name, loo, tests, rate, product)
        dump[cat.name] = {"good_loo": loo, "test": [{"defect": d, **s} for d, s in tests]}
    if args.dump:
        Path(args.dump).write_text(json.dumps(dump, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
