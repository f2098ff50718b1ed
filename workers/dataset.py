"""MVTec-layout data sets (``CATEGORY/train/good``, ``CATEGORY/test/<defect type>``,
``CATEGORY/ground_truth/<defect type>/<stem>_mask.png``): their categories and test images with ground truth,
for ``eval``, the training commands and the benchmarks."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from workers.imageio import images_in


@dataclass(frozen=True)
class EvalImage:
    path: Path
    defect: str  # defect type folder ("good" = normal)
    mask: Path | None  # ground truth, None for good images (or when missing)

    @property
    def is_defect(self) -> bool:
        return self.defect != "good"

    @property
    def rel(self) -> str:
        return f"{self.defect}/{self.path.name}"


@dataclass(frozen=True)
class Category:
    name: str
    root: Path
    rel: str  # relative to DATASET_ROOT ("." when the root is the category)

    @property
    def train_good(self) -> Path:
        return self.root / "train" / "good"


def _is_category(p: Path) -> bool:
    return (p / "test").is_dir()


def find_categories(root: Path) -> list[Category]:
    """Categories under ``root``: the root itself, its children, or its grandchildren (one nesting level)."""
    root = Path(root)
    if _is_category(root):
        return [Category(root.name, root, ".")]
    found: list[Path] = []
    for child in sorted(p for p in root.iterdir() if p.is_dir()):
        if _is_category(child):
            found.append(child)
        else:
            found.extend(sorted(g for g in child.iterdir() if g.is_dir() and _is_category(g)))
    names = [p.name for p in found]
    out = []
    for p in found:
        rel = p.relative_to(root).as_posix()
        out.append(Category(p.name if names.count(p.name) == 1 else rel, p, rel))
    return out


def select_categories(cats: Sequence[Category], wanted: str) -> list[Category]:
    names = [w.strip() for w in wanted.split(",") if w.strip()]
    if not names:
        return list(cats)
    known = {c.name: c for c in cats} | {c.rel: c for c in cats}
    missing = [n for n in names if n not in known]
    if missing:
        raise ValueError(f"unknown categories {missing} (known: {', '.join(c.name for c in cats)})")
    picked: list[Category] = []
    for n in names:
        if known[n] not in picked:
            picked.append(known[n])
    return picked


def test_images(cat: Category) -> list[EvalImage]:
    out = []
    for d in sorted(p for p in (cat.root / "test").iterdir() if p.is_dir()):
        for p in images_in(d):
            mask = None
            if d.name != "good":
                cand = cat.root / "ground_truth" / d.name / f"{p.stem}_mask.png"
                mask = cand if cand.is_file() else None
            out.append(EvalImage(p, d.name, mask))
    return out


def balanced_order(items: Sequence[EvalImage]) -> list[EvalImage]:
    """Round-robin over defect types (sorted), each type in name order: a prefix is a balanced slice."""
    groups: dict[str, list[EvalImage]] = {}
    for it in items:
        groups.setdefault(it.defect, []).append(it)
    queues = [groups[k] for k in sorted(groups)]
    out: list[EvalImage] = []
    i = 0
    while len(out) < len(items):
        for q in queues:
            if i < len(q):
                out.append(q[i])
        i += 1
    return out


def limit_images(items: Sequence[EvalImage], max_images: int) -> list[EvalImage]:
    """At most ``max_images`` (0 = all), balanced over defect types, returned in directory order."""
    if max_images <= 0 or max_images >= len(items):
        return list(items)
    keep = set(id(x) for x in balanced_order(items)[:max_images])
    return [x for x in items if id(x) in keep]
