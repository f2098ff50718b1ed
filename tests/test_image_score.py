"""The memory map's image score (:func:`workers.memory.features.image_raw_score`) on constructed maps: a
defect's region outweighs isolated hot pixels, and excluded regions do not count. Pure numpy, no model."""

from __future__ import annotations

import cv2
import numpy as np

from workers.interfaces import ImageEmbedding
from workers.memory.features import image_raw_score
from workers.memory.params import MemoryParams

SIZE = 512
EMB = ImageEmbedding("k", np.zeros((1, 64, 64), np.float32), (1024, 1024), (SIZE, SIZE))
PARAMS = MemoryParams()


def _background(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (0.3 + 0.02 * rng.standard_normal((SIZE, SIZE))).astype(np.float32)


def test_isolated_hot_pixels_do_not_outscore_a_defect():
    noisy, defect = _background(1), _background(1)
    for y, x in ((30, 30), (400, 100), (250, 480)):  # three 3 x 3 specks at 5x the defect's level
        noisy[y:y + 3, x:x + 3] = 5.0
    cv2.circle(defect, (256, 256), 30, 1.0, -1)
    clean = image_raw_score(_background(1), EMB, PARAMS)
    assert image_raw_score(noisy, EMB, PARAMS) < 0.5 * image_raw_score(defect, EMB, PARAMS)
    assert image_raw_score(noisy, EMB, PARAMS) < clean + 0.3  # the specks barely move it


def test_excluded_pixels_do_not_count():
    m = _background(2)
    cv2.circle(m, (100, 100), 40, 2.0, -1)
    exclude = np.zeros(m.shape, bool)
    cv2.circle(exclude.view(np.uint8), (100, 100), 45, 1, -1)
    assert image_raw_score(m, EMB, PARAMS) > 1.5
    assert image_raw_score(m, EMB, PARAMS, exclude=exclude) < 0.45
