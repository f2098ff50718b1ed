"""Evaluation report: ``results.json``, ``results.md`` (tables) and ``report.html`` (overlay thumbnails and
precision/recall curves as inline SVG; thumbnails inline as base64 JPEG drawn with OpenCV; no matplotlib).

The data model (frozen dataclasses) is filled by :mod:`workers.evaluate`; this module only renders it.
"""

from __future__ import annotations

import base64
import html
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from workers.eval_metrics import BinaryMetrics, Curve, PixelMetrics
from workers.operating import OperatingPoint

STAGE_NAMES = {0: "map only", 1: "PPG points", 2: "+logit1", 3: "+box+logit2"}
STAGE_COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")


@dataclass(frozen=True)
class StageResult:
    """Metrics of one category under one ablation setting (CPS stage count)."""

    stage: int
    image: BinaryMetrics
    pixel: PixelMetrics
    images: int
    shared_s: float  # mean seconds per image computed once for every stage (SAM embedding + anomaly map)
    stage_s: float  # mean seconds per image of this setting's own work (PPG, decoder passes, fusion)
    timings: dict[str, float] = field(default_factory=dict)  # mean of the detector's own stage timings
    pixel_curve: Curve = Curve((), (), ())
    image_curve: Curve = Curve((), (), ())
    # the verdicts at the line's calibrated image threshold (normalised image score > 1): the fraction of
    # defect images flagged and of good images flagged (nan without such images)
    flagged_defect: float = float("nan")
    flagged_good: float = float("nan")
    # the published masks (the result's labels) against the ground truth (workers.operating)
    operating: OperatingPoint = field(default_factory=OperatingPoint.empty)
    # each test image's normalised image score (the verdict is score > 1): (image, is defect, score)
    image_scores: tuple[tuple[str, bool, float], ...] = ()

    @property
    def total_s(self) -> float:
        return self.shared_s + self.stage_s


@dataclass(frozen=True)
class Thumbnail:
    rel: str  # image path relative to the category's test folder
    label: str  # defect type ("good", "crack", ...)
    data: bytes = field(repr=False)  # the composite (image+GT, then one panel per stage), encoded
    mime: str = "image/jpeg"


@dataclass(frozen=True)
class CategoryResult:
    name: str
    root: str
    memory: str  # where the normal memory came from ("train/good: 40 images", "mutual", ...)
    images: int
    defect_images: int
    stages: tuple[StageResult, ...]
    thumbnails: tuple[Thumbnail, ...] = ()
    failed: tuple[tuple[str, str], ...] = ()  # (image, reason) skipped
    mode: str = ""  # memory mode: "train" (from train/good), "mutual" (label-free), "" (no memory)


@dataclass(frozen=True)
class EvalReport:
    dataset_root: str
    command: str
    settings: dict  # the settings that matter for reading the numbers
    models: dict[str, str]
    stages: tuple[int, ...]
    pixel_size: int | None
    categories: tuple[CategoryResult, ...]
    wall_s: float
    started: str  # ISO time, UTC
    false_alarm_target: float = 0.0  # detector.false_alarm_rate the image thresholds were set for


# ------------------------------------------------------------------------------------------ summaries

THRESHOLD_FREE_COLUMNS = (
    ("image AUROC", lambda r: r.image.auroc),
    ("image AP", lambda r: r.image.ap),
    ("image F1-max", lambda r: r.image.f1_max),
    ("pixel AUROC", lambda r: r.pixel.auroc),
    ("pixel AP", lambda r: r.pixel.ap),
    ("pixel F1-max", lambda r: r.pixel.f1_max),
    ("AUPRO", lambda r: r.pixel.aupro),
)
# what the line acts on: the published masks and the verdicts at the calibrated thresholds
OPERATING_COLUMNS = (
    ("mask P", lambda r: r.operating.precision),
    ("mask R", lambda r: r.operating.recall),
    ("mask F1", lambda r: r.operating.f1),
    ("mask IoU", lambda r: r.operating.iou),
    ("regions found", lambda r: r.operating.regions_found),
    ("defects flagged", lambda r: r.flagged_defect),
    ("good flagged", lambda r: r.flagged_good),
    ("flagged, no mask", lambda r: r.operating.flagged_without_mask),
)
METRIC_COLUMNS = THRESHOLD_FREE_COLUMNS + OPERATING_COLUMNS


def _nanmean(values: Sequence[float]) -> float:
    vals = [v for v in values if not (isinstance(v, float) and math.isnan(v))]
    return float(np.mean(vals)) if vals else float("nan")


def mean_keys(report: EvalReport) -> list[tuple[str, int]]:
    """(mode, stage) pairs present in the report, modes in order of appearance."""
    modes = list(dict.fromkeys(c.mode for c in report.categories))
    return [(m, s) for m in modes for s in report.stages]


def mean_label(mode: str, stage: int, report: EvalReport) -> str:
    """The key of one mean row: the stage alone with one memory mode, else ``mode/stage``."""
    single = len({c.mode for c in report.categories}) <= 1
    return str(stage) if single else f"{mode}/{stage}"


def mean_over_categories(report: EvalReport) -> dict[tuple[str, int], dict[str, float]]:
    """Per (memory mode, stage): every metric column and the timings averaged over categories (nan-aware),
    plus the gap between the published-mask F1 and the map's F1-max."""
    out: dict[tuple[str, int], dict[str, float]] = {}
    for mode, stage in mean_keys(report):
        rows = [r for c in report.categories if c.mode == mode for r in c.stages if r.stage == stage]
        if not rows:
            continue
        d = {name: _nanmean([fn(r) for r in rows]) for name, fn in METRIC_COLUMNS}
        d["mask F1 - F1-max"] = _nanmean([r.operating.f1 - r.pixel.f1_max for r in rows])
        d["false regions / good image"] = _nanmean([r.operating.false_regions_per_good for r in rows])
        d["shared_ms"] = 1000 * _nanmean([r.shared_s for r in rows])
        d["stage_ms"] = 1000 * _nanmean([r.stage_s for r in rows])
        d["total_ms"] = d["shared_ms"] + d["stage_ms"]
        out[(mode, stage)] = d
    return out


def _pct(v: float) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}"


def _ms(v: float) -> str:
    return "–" if math.isnan(v) else f"{v:.0f}"


def stage_label(stage: int) -> str:
    return f"{stage} ({STAGE_NAMES.get(stage, '?')})"


# ------------------------------------------------------------------------------------------ json / md


def _jsonable(x):
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.floating, np.integer)):
        return _jsonable(x.item())
    return x


def to_json(report: EvalReport) -> dict:
    cats = []
    for c in report.categories:
        stages = []
        for r in c.stages:
            stages.append({
                "stage": r.stage, "images": r.images, "image": asdict(r.image), "pixel": asdict(r.pixel),
                "seconds": {"shared": r.shared_s, "stage": r.stage_s, "total": r.total_s,
                            "detector_timings": r.timings},
                "pixel_pr_curve": asdict(r.pixel_curve), "image_pr_curve": asdict(r.image_curve),
                "at_threshold": {"defects_flagged": r.flagged_defect, "good_flagged": r.flagged_good,
                                 "published_masks": asdict(r.operating)},
                "image_scores": [{"image": n, "defect": d, "score": v} for n, d, v in r.image_scores],
            })
        cats.append({"name": c.name, "root": c.root, "mode": c.mode, "memory": c.memory, "images": c.images,
                     "defect_images": c.defect_images, "failed": [list(f) for f in c.failed], "stages": stages})
    mean = {mean_label(m, st, report): v for (m, st), v in mean_over_categories(report).items()}
    return _jsonable({
        "dataset_root": report.dataset_root, "command": report.command, "started": report.started,
        "wall_s": report.wall_s, "models": report.models, "settings": report.settings,
        "stages": list(report.stages), "pixel_size": report.pixel_size,
        "metric_notes": "fractions in [0, 1]; pixel metrics pool all pixels of a category's test images "
                        f"resized to a longest side of {report.pixel_size or 'native'} px; AUPRO up to FPR 0.3; "
                        "null = undefined (one class only)",
        "categories": cats, "mean": mean,
    })


def _rows(report: EvalReport, columns, extra) -> list[list[str]]:
    """Table rows: one per category and stage, then the means per (mode, stage)."""
    means = mean_over_categories(report)
    rows = []
    for c in report.categories:
        for r in c.stages:
            rows.append([c.name, c.mode or "–", stage_label(r.stage), *[_pct(fn(r)) for _, fn in columns],
                         *extra(r, None)])
    for (mode, stage), d in means.items():
        rows.append(["**mean**", mode or "–", stage_label(stage), *[_pct(d[n]) for n, _ in columns],
                     *extra(None, d)])
    return rows


def _timing_cells(r: StageResult | None, d: dict | None) -> list[str]:
    if r is not None:
        return [_ms(1000 * r.shared_s), _ms(1000 * r.stage_s), _ms(1000 * r.total_s)]
    return [_ms(d["shared_ms"]), _ms(d["stage_ms"]), _ms(d["total_ms"])]


def _operating_cells(r: StageResult | None, d: dict | None) -> list[str]:
    if r is not None:
        gap = r.operating.f1 - r.pixel.f1_max
        fr = r.operating.false_regions_per_good
        return [_pct(gap), "–" if math.isnan(fr) else f"{fr:.2f}"]
    fr = d["false regions / good image"]
    return [_pct(d["mask F1 - F1-max"]), "–" if math.isnan(fr) else f"{fr:.2f}"]


THRESHOLD_FREE_HEAD = ["category", "memory", "CPS stages", *[n for n, _ in THRESHOLD_FREE_COLUMNS],
                       "shared ms", "stage ms", "total ms"]
OPERATING_HEAD = ["category", "memory", "CPS stages", *[n for n, _ in OPERATING_COLUMNS],
                  "mask F1 − F1-max", "false regions / good image"]


def _md_table(head: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head), *("| " + " | ".join(r) + " |" for r in rows)]


def to_markdown(report: EvalReport) -> str:
    lines = [f"# Evaluation: {report.dataset_root}", "",
             f"`{report.command}`", "",
             f"Started {report.started}, wall time {report.wall_s:.0f} s. Models: "
             + ", ".join(f"{k}={v}" for k, v in report.models.items()) + ".", "",
             "Metrics in %. *memory*: train = normal memory from the category's train/good, mutual = label-free "
             "(the test images themselves, no labels).", "",
             "## What the map could do (threshold-free)", "",
             "Pixel metrics pool every pixel of a category's test images "
             f"(maps and masks resized to a longest side of {report.pixel_size or 'native'} px); "
             "AUPRO integrated to FPR 0.3. *shared ms*: SAM embedding + anomaly map, computed once per image "
             "and reused by every CPS setting; *stage ms*: that setting's own work (PPG, SAM decoder passes, "
             "fusion); per image, mean.", ""]
    lines += _md_table(THRESHOLD_FREE_HEAD, _rows(report, THRESHOLD_FREE_COLUMNS, _timing_cells))
    lines += ["", "## What the line gets (operating point)", "",
              "The published masks (the results' labels: empty for an OK verdict) pooled against the ground "
              "truth at the same resolution; *regions found*: ground-truth regions at least 10 % covered; "
              "*defects / good flagged*: verdicts at the calibrated image threshold"
              + (f" (false-alarm target {100 * report.false_alarm_target:.1f} % of good images)"
                 if report.false_alarm_target > 0 else "") + "; *flagged, no mask*: flagged images whose "
              "published mask is empty (a DEFECT verdict with nothing outlined).", ""]
    lines += _md_table(OPERATING_HEAD, _rows(report, OPERATING_COLUMNS, _operating_cells))
    lines.append("")
    lines.append("| category | memory | images (defect) | normal memory from | skipped |")
    lines.append("|---|---|---|---|---|")
    for c in report.categories:
        lines.append(f"| {c.name} | {c.mode or '–'} | {c.images} ({c.defect_images}) | {c.memory} | "
                     f"{len(c.failed)} |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------ drawing


def overlay_panel(image_bgr: np.ndarray, score_map: np.ndarray | None, pred_mask: np.ndarray | None,
                  gt_mask: np.ndarray | None, width: int = 200, score_max: float = 2.0) -> np.ndarray:
    """A thumbnail: the image, the score map as a translucent heat map (0..``score_max``, 1.0 = threshold),
    the predicted mask's outline in magenta and the ground truth's outline in green."""
    import cv2

    img = image_bgr if image_bgr.ndim == 3 else cv2.cvtColor(image_bgr, cv2.COLOR_GRAY2BGR)
    h, w = img.shape[:2]
    th = max(1, int(round(h * width / w)))
    out = cv2.resize(img, (width, th), interpolation=cv2.INTER_AREA)
    if score_map is not None:
        s = cv2.resize(np.asarray(score_map, np.float32), (width, th), interpolation=cv2.INTER_AREA)
        heat = cv2.applyColorMap(np.clip(s / score_max * 255, 0, 255).astype(np.uint8), cv2.COLORMAP_JET)
        out = cv2.addWeighted(out, 0.55, heat, 0.45, 0)
    for mask, colour in ((gt_mask, (60, 220, 60)), (pred_mask, (255, 0, 255))):
        if mask is None:
            continue
        m = cv2.resize((np.asarray(mask) > 0).astype(np.uint8), (width, th), interpolation=cv2.INTER_NEAREST)
        contours, _ = cv2.findContours(m, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(out, contours, -1, colour, 1)
    return out


def caption(panel: np.ndarray, text: str) -> np.ndarray:
    import cv2

    bar = np.full((16, panel.shape[1], 3), 32, np.uint8)
    cv2.putText(bar, text[:40], (3, 12), cv2.FONT_HERSHEY_SIMPLEX, 0.38, (235, 235, 235), 1, cv2.LINE_AA)
    return np.vstack([bar, panel])


def encode_image(image: np.ndarray, fmt: str = ".jpg", quality: int = 85) -> bytes:
    """Encode a BGR image (JPEG by default: thumbnails of photos are ~10x smaller than PNG)."""
    import cv2

    params = [cv2.IMWRITE_JPEG_QUALITY, quality] if fmt in (".jpg", ".jpeg") else []
    ok, buf = cv2.imencode(fmt, image, params)
    if not ok:
        raise ValueError(f"{fmt} encoding failed")
    return buf.tobytes()


def svg_pr_curves(curves: Sequence[tuple[str, Curve]], title: str, size: tuple[int, int] = (300, 240)) -> str:
    """Precision (y) over recall (x), one polyline per curve, as an inline SVG string."""
    w, h = size
    left, right, top, bottom = 38, 10, 22, 30
    pw, ph = w - left - right, h - top - bottom

    def xy(r: float, p: float) -> str:
        return f"{left + r * pw:.1f},{top + (1 - p) * ph:.1f}"

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" '
             'font-family="sans-serif" font-size="10">',
             f'<text x="{w / 2}" y="13" text-anchor="middle" font-size="11">{html.escape(title)}</text>',
             f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#888"/>']
    for t in (0.0, 0.5, 1.0):
        parts.append(f'<text x="{left + t * pw:.1f}" y="{top + ph + 12}" text-anchor="middle">{t:g}</text>')
        parts.append(f'<text x="{left - 4}" y="{top + (1 - t) * ph + 3:.1f}" text-anchor="end">{t:g}</text>')
    parts.append(f'<text x="{left + pw / 2}" y="{h - 4}" text-anchor="middle">recall</text>')
    parts.append(f'<text x="10" y="{top + ph / 2}" transform="rotate(-90 10 {top + ph / 2})" '
                 'text-anchor="middle">precision</text>')
    for i, (name, c) in enumerate(curves):
        colour = STAGE_COLOURS[i % len(STAGE_COLOURS)]
        if c.recall:
            pts = " ".join(xy(r, p) for r, p in zip(c.recall, c.precision, strict=True))
            parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="1.5" points="{pts}"/>')
        ly = top + 10 + 12 * i
        parts.append(f'<line x1="{left + pw - 70}" y1="{ly - 3}" x2="{left + pw - 58}" y2="{ly - 3}" '
                     f'stroke="{colour}" stroke-width="2"/>')
        parts.append(f'<text x="{left + pw - 55}" y="{ly}">{html.escape(name)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def to_html(report: EvalReport) -> str:
    e = html.escape
    def table(head: list[str], rows: list[list[str]]) -> str:
        return ("<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in head) + "</tr>"
                + "".join("<tr>" + "".join(f"<td>{e(str(v).strip('*'))}</td>" for v in row) + "</tr>"
                          for row in rows) + "</table>")

    tables = ("<h2>What the map could do (threshold-free)</h2>"
              + table(THRESHOLD_FREE_HEAD, _rows(report, THRESHOLD_FREE_COLUMNS, _timing_cells))
              + "<h2>What the line gets (published masks, verdicts at the calibrated thresholds)</h2>"
              + table(OPERATING_HEAD, _rows(report, OPERATING_COLUMNS, _operating_cells)))
    body = [f"<h1>Evaluation: {e(report.dataset_root)}</h1>",
            f"<p><code>{e(report.command)}</code><br>started {e(report.started)}, wall time "
            f"{report.wall_s:.0f} s; models: {e(', '.join(f'{k}={v}' for k, v in report.models.items()))}</p>",
            "<p>Metrics in %. Pixel metrics pool all pixels of a category (maps resized to a longest side of "
            f"{report.pixel_size or 'native'} px); AUPRO to FPR 0.3. Thumbnails: heat map of the fused score "
            "(red = 2x the pixel threshold), <span style='color:#3c3'>ground truth</span> and "
            "<span style='color:#f0f'>predicted mask</span> outlines.</p>", tables]
    for c in report.categories:
        body.append(f"<h2>{e(c.name)}</h2><p>{c.images} test images ({c.defect_images} defective); memory: "
                    f"{e(c.memory)}; root {e(c.root)}</p>")
        px = [(f"stages {r.stage}", r.pixel_curve) for r in c.stages]
        im = [(f"stages {r.stage}", r.image_curve) for r in c.stages]
        body.append("<div class='curves'>" + svg_pr_curves(px, f"{c.name}: pixel PR")
                    + svg_pr_curves(im, f"{c.name}: image PR") + "</div>")
        if c.failed:
            body.append("<p>skipped: " + "; ".join(e(f"{a}: {b}") for a, b in c.failed) + "</p>")
        for t in c.thumbnails:
            b64 = base64.b64encode(t.data).decode("ascii")
            body.append(f"<figure><img alt='{e(t.rel)}' src='data:{t.mime};base64,{b64}'>"
                        f"<figcaption>{e(t.rel)} ({e(t.label)})</figcaption></figure>")
    style = ("body{font-family:sans-serif;margin:1.5em}table{border-collapse:collapse;font-size:13px}"
             "td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}td:first-child,td:nth-child(2)"
             "{text-align:left}figure{display:inline-block;margin:4px}figcaption{font-size:11px}"
             ".curves svg{margin-right:12px}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>lineinspect eval</title>"
            f"<style>{style}</style></head><body>{''.join(body)}"
            f"<details><summary>markdown</summary><pre>{e(to_markdown(report))}</pre></details></body></html>\n")


def write_report(report: EvalReport, out_dir: Path) -> dict[str, Path]:
    """Write results.json, results.md and report.html into ``out_dir``; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "results.json", "md": out_dir / "results.md", "html": out_dir / "report.html"}
    paths["json"].write_text(json.dumps(to_json(report), indent=1, allow_nan=False) + "\n")
    paths["md"].write_text(to_markdown(report))
    paths["html"].write_text(to_html(report))
    return paths
