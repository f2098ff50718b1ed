"""The eval/predict embedding cache (:mod:`workers.disk_cache`): a cold and a warm cache serve the same values,
a changed set of taps or an unreadable entry is recomputed, decoding passes through. The encoder here is a
stand-in that returns seeded random features (what is under test is the cache, not a model)."""

from __future__ import annotations

import numpy as np

from workers.disk_cache import DiskEmbeddings
from workers.interfaces import ImageEmbedding


class StandInEncoder:
    name = "stand-in"

    def __init__(self, taps=("stage2",)):
        self.taps = tuple(taps)
        self.calls = 0

    def embed(self, image_bgr, key):
        self.calls += 1
        rng = np.random.default_rng(int(image_bgr.sum()))
        taps = {t: rng.standard_normal((4, 8, 8)).astype(np.float32) / 3 for t in self.taps}
        return ImageEmbedding(key, rng.standard_normal((6, 8, 8)).astype(np.float32) / 3, (32, 24),
                              (64, 48), taps=taps)

    def decode(self, embedding, prompts):
        return ("decoded", embedding.key, prompts)


def test_cold_and_warm_cache_serve_the_same_values(tmp_path):
    image = np.full((64, 48, 3), 7, np.uint8)
    enc = StandInEncoder()
    cold = DiskEmbeddings(enc, tmp_path).embed(image, "a")
    warm_cache = DiskEmbeddings(enc, tmp_path)
    warm = warm_cache.embed(image, "b")
    assert enc.calls == 1 and warm_cache.hits == 1 and warm.key == "b"
    np.testing.assert_array_equal(cold.features, warm.features)
    np.testing.assert_array_equal(cold.taps["stage2"], warm.taps["stage2"])
    assert cold.features.dtype == np.float32 and (cold.input_size, cold.original_size) == ((32, 24), (64, 48))
    raw = StandInEncoder().embed(image, "x").features  # the float16 rounding, nothing more
    assert 0 < float(np.abs(cold.features - raw).max()) < 1e-3
    assert warm_cache.decode(warm, "p") == ("decoded", "b", "p")


def test_other_taps_and_unreadable_entries_are_recomputed(tmp_path):
    image = np.full((64, 48, 3), 9, np.uint8)
    DiskEmbeddings(StandInEncoder(), tmp_path).embed(image, "a")
    more = StandInEncoder(taps=("stage1", "stage2"))
    got = DiskEmbeddings(more, tmp_path).embed(image, "a")
    assert more.calls == 1 and set(got.taps) == {"stage1", "stage2"}  # another model id: its own folder
    cache = DiskEmbeddings(StandInEncoder(), tmp_path)
    for entry in cache.folder.glob("*.npz"):
        entry.write_bytes(b"not an npz")
    again = cache.embed(image, "a")
    assert cache.misses == 1 and cache.inner.calls == 1 and again.features.shape == (6, 8, 8)
    assert DiskEmbeddings(StandInEncoder(), tmp_path).embed(image, "a").features.shape == (6, 8, 8)
