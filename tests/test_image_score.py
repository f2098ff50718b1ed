"""The memory map's image score (:func:`workers.memory.image_raw_score`) on constructed maps: it rewards a
defect's area whatever its shape and ignores isolated hot pixels. Pure numpy, no model."""

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


def test_a_thin_scratch_scores_like_a_round_spot_of_the_same_area():
    area = int(PARAMS.image_top_share * SIZE * SIZE * 1.5)  # a bit more than the share the score averages
    spot, scratch = _background(), _background()
    r = int(np.sqrt(area / np.pi))
    cv2.circle(spot, (200, 200), r, 1.0, -1)
    cv2.line(scratch, (40, 300), (40 + area // 4, 300), 1.0, 4)  # 4 px wide, about the same area
    s_spot = image_raw_score(spot, EMB, PARAMS)
    s_scratch = image_raw_score(scratch, EMB, PARAMS)
    assert s_spot > 0.9 and s_scratch > 0.9, (s_spot, s_scratch)
    assert abs(s_spot - s_scratch) < 0.05 * s_spot


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
