"""``lineinspect predict IN_DIR --out OUT_DIR [--normal NORMAL_DIR] [--cps-stages N]``: offline inference.

Output contract (other tools rely on it). For every image ``IN_DIR/<rel>/<stem>.<ext>`` (searched
recursively; extensions in :data:`IMAGE_EXTENSIONS`, case-insensitive):

- ``OUT_DIR/<rel>/<stem>_mask.png``: uint8, the input's height and width, 0 = good, 255 = defect pixel
  (the detector's label mask > 0);
- ``OUT_DIR/<rel>/<stem>_score.npy``: float32 ``[H, W]`` at the input's size, higher = more anomalous
  (the detector's fused pixel score; normalised so that 1.0 is the pixel threshold);
- ``OUT_DIR/scores.csv``: columns ``path,score,defect``: ``path`` relative to IN_DIR with ``/``,
  ``score`` the normalised image score (> 1.0 = above the image threshold), ``defect`` 1 or 0 (the verdict).
  Rows in input order; the file is written row by row, so an interrupted run keeps what it finished.

Failures: an image that cannot be read or inspected is reported on stderr and skipped; the list also goes
to ``OUT_DIR/errors.csv`` (``path,error``), written only when something failed. Exit code: 0 when at least
one image was processed (even if others failed: look at stderr / errors.csv), 1 when none could be
processed (no images found, or every one failed), 2 on a usage error (IN_DIR or NORMAL_DIR missing), 3 when
the detector cannot be built (model files missing, ...).

Map source: ``settings.detector.map_source`` (memory by default here, since no CLIP weights exist). In memory
mode, with ``--normal`` the memory is filled from NORMAL_DIR; without it the inputs are scored against each
other (mutual, label-free: each image against the others). What is used, and from where, is printed first.
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import numpy as np

from config.settings import Settings
from stream.contracts import Verdict
from workers import offline
from workers.imageio import IMAGE_EXTENSIONS, ImageReadError, list_images, read_image
from workers.interfaces import Detection, FrameDetector

SCORES_CSV = "scores.csv"
ERRORS_CSV = "errors.csv"


# ------------------------------------------------------------------------------------------ images


def score_map_at(detection: Detection, shape: tuple[int, int]) -> np.ndarray:
    """The detection's pixel score as float32 at ``shape`` (bilinear when the detector returned another size)."""
    import cv2

    s = np.asarray(detection.score_map, dtype=np.float32)
    if s.shape != shape:
        s = cv2.resize(s, (shape[1], shape[0]), interpolation=cv2.INTER_LINEAR)
    return np.ascontiguousarray(s)


def mask_at(detection: Detection, shape: tuple[int, int]) -> np.ndarray:
    """The detection's defect mask as uint8 0/255 at ``shape``."""
    import cv2

    m = (np.asarray(detection.labels) > 0).astype(np.uint8) * 255
    if m.shape != shape:
        m = cv2.resize(m, (shape[1], shape[0]), interpolation=cv2.INTER_NEAREST)
    return m


# ------------------------------------------------------------------------------------------ folder run


@dataclass(frozen=True)
class PredictSummary:
    processed: int
    failed: tuple[tuple[str, str], ...]  # (relative path, reason)
    out_dir: Path
    seconds: float

    @property
    def exit_code(self) -> int:
        return 0 if self.processed > 0 else 1


def output_paths(out_dir: Path, rel: Path) -> tuple[Path, Path]:
    base = out_dir / rel.parent
    return base / f"{rel.stem}_mask.png", base / f"{rel.stem}_score.npy"


def predict_folder(detector: FrameDetector, in_dir: Path, out_dir: Path, images: Sequence[Path] | None = None,
                   progress: bool = True, err: TextIO | None = None) -> PredictSummary:
    """Run ``detector`` on every image of ``in_dir`` (or the given ``images`` under it) and write the contract."""
    import cv2
    from tqdm import tqdm

    err = err or sys.stderr
    in_dir, out_dir = Path(in_dir), Path(out_dir)
    if images is None:
        images = list_images(in_dir, exclude=[out_dir])
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    processed = 0
    failed: list[tuple[str, str]] = []
    claimed: dict[Path, str] = {}  # output mask path -> input that wrote it (x.png and x.jpg collide)
    with open(out_dir / SCORES_CSV, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "score", "defect"])
        for path in tqdm(images, desc="predict", unit="img", disable=not progress, file=err):
            rel = Path(path).relative_to(in_dir)
            key = rel.as_posix()
            mask_path, score_path = output_paths(out_dir, rel)
            try:
                if mask_path in claimed:
                    raise ImageReadError(f"output name {mask_path.name} already written for {claimed[mask_path]}")
                image = read_image(Path(path))
                det = detector.inspect(image, key)
                shape = image.shape[:2]
                mask_path.parent.mkdir(parents=True, exist_ok=True)
                if not cv2.imwrite(str(mask_path), mask_at(det, shape)):
                    raise OSError(f"cannot write {mask_path}")
                np.save(score_path, score_map_at(det, shape))
            except Exception as exc:  # one bad image never ends the run: report it and go on
                reason = f"{type(exc).__name__}: {exc}"
                failed.append((key, reason))
                print(f"predict: skipped {key}: {reason}", file=err, flush=True)
                continue
            claimed[mask_path] = key
            writer.writerow([key, f"{float(det.image_score):.6g}", int(det.verdict == Verdict.DEFECT)])
            fh.flush()
            processed += 1
    if failed:
        with open(out_dir / ERRORS_CSV, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["path", "error"])
            w.writerows(failed)
    return PredictSummary(processed=processed, failed=tuple(failed), out_dir=out_dir,
                          seconds=time.perf_counter() - t0)


# ------------------------------------------------------------------------------------------ detector

def describe_models(settings: Settings) -> list[str]:
    """Human-readable lines: which map source, which models and weights, from where."""
    d = settings.detector
    lines = [f"map source: {d.map_source}; CPS stages: {d.cps_stages}"]
    s = settings.sam
    if s.backend == "onnx":
        lines.append(f"SAM: onnx encoder {Path(s.encoder_path).resolve()} decoder {Path(s.decoder_path).resolve()}")
    else:
        lines.append(f"SAM: torch {s.model_type} checkpoint {s.checkpoint or '(none)'} on {s.device}")
    if d.uses_clip:
        c = settings.clip
        lines.append(f"CLIP: {c.model} weights {c.pretrained!r} prompts {c.prompt_mode}"
                     + (f" adapters {c.adapters}" if c.adapters else "")
                     + (f" prompt file {c.prompts}" if c.prompts else ""))
    if d.uses_memory:
        m = settings.memory
        layers = f" ({'+'.join(m.layers)})" if m.features == "sam" else ""
        lines.append(f"memory: {m.features} features{layers}, k={m.k}, neighbourhood={m.neighbourhood}")
    return lines


def _require_dir(path: str | None, what: str) -> Path | None:
    if path is None:
        return None
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"{what} {p} is not a folder")
    return p


def main(settings: Settings, args: argparse.Namespace, mapper_factory: offline.MapperFactory | None = None) -> int:
    try:
        in_dir = _require_dir(args.input, "IN_DIR")
        normal_dir = _require_dir(getattr(args, "normal", None), "NORMAL_DIR")
    except FileNotFoundError as exc:
        print(f"lineinspect predict: {exc}", file=sys.stderr)
        return 2
    assert in_dir is not None
    out_dir = Path(args.out)
    if getattr(args, "cps_stages", None) is not None:
        settings = settings.with_overrides(**{"detector.cps_stages": int(args.cps_stages)})
    images = list_images(in_dir, exclude=[out_dir])
    if not images:
        print(f"lineinspect predict: no images ({', '.join(IMAGE_EXTENSIONS)}) under {in_dir}", file=sys.stderr)
        return 1
    for line in describe_models(settings):
        print(f"predict: {line}", flush=True)
    if settings.detector.uses_memory:
        refs = min(len(images), settings.memory.label_free_refs)
        print(f"predict: memory from {normal_dir}" if normal_dir else
              f"predict: memory: label-free, from {refs} of the {len(images)} inputs judged against each other "
              "(no --normal); each input is then scored against it, never against its own patches", flush=True)
    try:
        backend = offline.build_backend(settings, getattr(args, "embedding_cache", "") or "")
        built = offline.build_offline_detector(settings, line=getattr(args, "line", None) or "offline",
                                               normal_dir=normal_dir, mutual_images=images,
                                               mapper_factory=mapper_factory, backend=backend)
    except Exception as exc:
        print(f"lineinspect predict: cannot build the detector: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 3
    print(f"predict: models {built.detector.models}", flush=True)
    summary = predict_folder(built.detector, in_dir, out_dir, images)
    print(f"predict: {summary.processed} of {len(images)} images in {summary.seconds:.1f} s -> {out_dir}"
          + (f"; {len(summary.failed)} skipped (see {out_dir / ERRORS_CSV})" if summary.failed else ""),
          flush=True)
    return summary.exit_code
