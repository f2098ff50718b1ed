"""The memory map's image score (:mod:`workers.memory.image_score`) on constructed maps: a defect's region
outweighs isolated hot pixels, excluded regions do not count, the area reading catches a wide shallow
defect the peak reading misses, and the wide (quantile) reading a change spread over much of the frame that
no smoothed maximum sees. Pure numpy, no model."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from workers.interfaces import ImageEmbedding
from workers.memory.calibration import image_threshold
from workers.memory.features import image_raw_score
from workers.memory.image_score import ImageScoreRule, map_readings, smoothed_maxima
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


# --------------------------------------------------------------------------- the rule (workers.memory.image_score)


def _normal_frames(n: int = 12) -> list[np.ndarray]:
    """Background plus a small bright speck at a random place: the odd hot spot every good frame has."""
    rng = np.random.default_rng(5)
    out = []
    for i in range(n):
        m = _background(10 + i)
        y, x = rng.integers(40, SIZE - 40, 2)
        cv2.circle(m, (int(x), int(y)), 10, float(1.0 + 0.1 * rng.random()), -1)
        out.append(m)
    return out


def test_a_wide_shallow_defect_is_caught_by_the_area_reading_only():
    """A wide patch a little above the background (rust, a stain) stays under the peak reading's normal level
    (a good frame's small hot spot reaches higher) but far above the area reading's: the rule fitted to normal
    frames flags it, the 24 px maximum alone does not."""
    normals = _normal_frames()
    sigmas = ImageScoreRule.sigmas_for(PARAMS.image_sigma, PARAMS.area_sigma)
    assert sigmas == (24.0, 64.0)
    readings = [smoothed_maxima(m, EMB, sigmas, PARAMS.smoothing_sigma) for m in normals]
    rule = ImageScoreRule.fit(sigmas, readings)
    np.testing.assert_allclose(rule.refs, np.quantile(readings, 0.9, axis=0))
    normal_scores = [rule.combine(r) for r in readings]
    thr = image_threshold(normal_scores, 0.01).value
    peak_only = ImageScoreRule.fit(sigmas[:1], [r[:1] for r in readings])
    peak_thr = image_threshold([peak_only.combine(r[:1]) for r in readings], 0.01).value

    wide = _background(99)
    cv2.circle(wide, (256, 256), 110, 0.45, -1)
    assert rule.score(wide, EMB, PARAMS.smoothing_sigma) > thr
    assert peak_only.score(wide, EMB, PARAMS.smoothing_sigma) < peak_thr
    # a compact bright defect is caught by both
    spot = _background(98)
    cv2.circle(spot, (256, 256), 25, 1.2, -1)
    assert rule.score(spot, EMB, PARAMS.smoothing_sigma) > thr
    assert peak_only.score(spot, EMB, PARAMS.smoothing_sigma) > peak_thr
    # the seed level: no region under it can make the frame defective by either reading
    level = rule.raw_level(thr)
    capped = np.minimum(wide, level)
    assert rule.score(capped, EMB, PARAMS.smoothing_sigma) <= thr + 1e-6


def test_rule_round_trips_through_the_header_and_old_headers_mean_the_plain_maximum():
    rule = ImageScoreRule((24.0, 64.0), (0.5, 0.4))
    assert ImageScoreRule.from_calibration({"image_score": rule.as_dict(), "image_sigma": 24.0}) == rule
    assert ImageScoreRule.from_calibration({"image_sigma": 24.0}) == ImageScoreRule((24.0,), (1.0,))
    assert ImageScoreRule.from_calibration({}) == ImageScoreRule((16.0,), (1.0,))
    m = _background(3)
    assert ImageScoreRule((24.0,), (1.0,)).score(m, EMB, 4.0) == image_raw_score(m, EMB, PARAMS)
    assert rule.combine((0.6, 0.2)) == 0.6 / 0.5 and rule.combine((0.3, 0.6)) == 0.6 / 0.4
    with pytest.raises(ValueError):
        ImageScoreRule((24.0, 64.0), (0.5,))
    with pytest.raises(ValueError):
        ImageScoreRule((24.0,), (0.0,))


def test_area_sigma_setting_is_validated():
    from config.settings import MemorySettings, SettingsError

    assert MemorySettings(area_sigma=0.0).area_sigma == 0.0
    for bad in (16.0, 24.0, 1000.0):
        with pytest.raises(SettingsError, match="memory.area_sigma"):
            MemorySettings(area_sigma=bad)
    assert MemoryParams(area_sigma=0.0).score_sigmas == (24.0,)


def _scattered_change(seed: int, share: float, level: float) -> np.ndarray:
    """Background with many small raised patches (8 px squares at ``level``) covering about ``share`` of the
    frame: a whole surface changed (corrosion, a wrong finish), compact nowhere."""
    m = _background(seed)
    rng = np.random.default_rng(seed)
    cells = [(y, x) for y in range(0, SIZE - 8, 12) for x in range(0, SIZE - 8, 12)]  # 8 px patch per 12 px
    for i in rng.choice(len(cells), int(share * len(cells) * 144 / 64), replace=False):
        y, x = cells[i]
        m[y:y + 8, x:x + 8] = level
    return m


def test_a_change_spread_over_the_frame_is_caught_by_the_wide_reading_only():
    """About a third of the frame mildly raised in small scattered patches: its smoothed maxima stay under a
    good frame's hot spot, its 90th percentile is far above a good frame's. The rule with the wide reading
    flags it and says which pixels made it (wide_level); the same rule without it does not flag it; a compact
    defect is flagged by the smoothed maxima and has no wide level."""
    normals = _normal_frames()
    sigmas = ImageScoreRule.sigmas_for(PARAMS.image_sigma, PARAMS.area_sigma)
    q = PARAMS.wide_quantile
    assert q == 0.9
    readings = [map_readings(m, EMB, sigmas, q, PARAMS.smoothing_sigma) for m in normals]
    assert [r[:2] for r in readings] == [smoothed_maxima(m, EMB, sigmas, PARAMS.smoothing_sigma) for m in normals]
    rule = ImageScoreRule.fit(sigmas, readings, q)
    assert rule.quantile == q and len(rule.refs) == 3
    thr = image_threshold([rule.combine(r) for r in readings], 0.01).value
    two = ImageScoreRule.fit(sigmas, [r[:2] for r in readings])
    two_thr = image_threshold([two.combine(r[:2]) for r in readings], 0.01).value

    spread = _scattered_change(7, 0.3, 0.38)
    r = rule.readings(spread, EMB, PARAMS.smoothing_sigma)
    assert rule.combine(r) > thr and two.score(spread, EMB, PARAMS.smoothing_sigma) < two_thr
    level = rule.wide_level(r, thr)
    assert level == pytest.approx(thr * rule.refs[2]) and rule.wide_alone(r, thr)
    assert 0.1 < float((spread >= level).mean()) < 0.5  # the raised patches, not the background
    assert rule.raw_level(thr) == pytest.approx(thr * min(rule.refs[:2]))  # the seed level: smoothed maxima only

    spot = _background(98)
    cv2.circle(spot, (256, 256), 25, 1.2, -1)
    r = rule.readings(spot, EMB, PARAMS.smoothing_sigma)
    assert rule.combine(r) > thr and not rule.wide_alone(r, thr)  # (its p90 is a normal frame's, at the threshold)
    assert not any(rule.wide_alone(x, thr) for x in readings)
    # a third of the frame raised to the spot's level: the wide reading is over the threshold, so the wide level
    # is set, but the smoothed maxima are over it too: the reading is not alone
    both = _background(98)
    both[:, :170] += 0.6
    r = rule.readings(both, EMB, PARAMS.smoothing_sigma)
    assert min(r[i] / rule.refs[i] for i in range(3)) > thr
    assert rule.wide_level(r, thr) == pytest.approx(thr * rule.refs[2]) and not rule.wide_alone(r, thr)


def test_rule_with_the_wide_reading_round_trips_and_is_described():
    rule = ImageScoreRule((24.0, 64.0), (0.5, 0.4, 0.2), 0.9)
    assert ImageScoreRule.from_calibration({"image_score": rule.as_dict()}) == rule
    assert rule.as_dict()["quantile"] == 0.9 and "quantile" not in ImageScoreRule((24.0,), (1.0,)).as_dict()
    assert "p90 / 0.2" in rule.describe()
    assert rule.combine((0.5, 0.4, 0.3)) == pytest.approx(1.5)
    with pytest.raises(ValueError, match="3 readings"):
        ImageScoreRule((24.0, 64.0), (0.5, 0.4), 0.9)
    with pytest.raises(ValueError, match="quantile"):
        ImageScoreRule((24.0,), (0.5, 0.4), 1.5)


def test_wide_quantile_setting_is_validated_and_label_free_takes_one_reading():
    from config.settings import MemorySettings, SettingsError

    assert MemorySettings(wide_quantile=0.0).wide_quantile == 0.0
    for bad in (0.3, 0.995, 1.0, -0.1):
        with pytest.raises(SettingsError, match="memory.wide_quantile"):
            MemorySettings(wide_quantile=bad)
    assert MemoryParams.from_settings(MemorySettings(wide_quantile=0.8)).wide_quantile == 0.8
    one = MemoryParams().one_reading()
    assert one.score_sigmas == (24.0,) and one.wide_quantile == 0.0


def test_contrast_readings_ignore_a_level_shift_of_the_whole_frame():
    """Contrast readings (``memory.score_contrast``): a good frame whose whole map is raised (another
    texture lot, lighting) reads exactly as before and is not flagged, where the absolute readings flag it; a
    compact defect and a change spread over a third of the frame are still flagged. The seed and wide levels
    sit on the frame's own levels."""
    normals = _normal_frames()
    sigmas, q, s = ImageScoreRule.sigmas_for(PARAMS.image_sigma, PARAMS.area_sigma), PARAMS.wide_quantile, 4.0
    assert not PARAMS.score_contrast  # off by default
    rule = ImageScoreRule.fit(sigmas, [map_readings(m, EMB, sigmas, q, s, contrast=True) for m in normals], q,
                              contrast=True)
    absolute = ImageScoreRule.fit(sigmas, [map_readings(m, EMB, sigmas, q, s) for m in normals], q)
    thr = image_threshold([rule.score(m, EMB, s) for m in normals], 0.01).value
    abs_thr = image_threshold([absolute.score(m, EMB, s) for m in normals], 0.01).value

    shifted = normals[0] + np.float32(0.15)
    np.testing.assert_allclose(rule.readings(shifted, EMB, s), rule.readings(normals[0], EMB, s), atol=1e-5)
    assert rule.score(shifted, EMB, s) <= thr < rule.score(shifted, EMB, s) + 1.0
    assert absolute.score(shifted, EMB, s) > abs_thr

    spot = _background(98)
    cv2.circle(spot, (256, 256), 25, 1.2, -1)
    r = rule.readings(spot, EMB, s)
    assert rule.combine(r) > thr and not rule.wide_alone(r, thr)
    base, wide_base = rule.bases(spot, EMB)
    assert base == pytest.approx(float(np.median(spot)), abs=0.01) and wide_base < base
    level = rule.raw_level(thr, base)
    assert level == pytest.approx(base + thr * min(rule.refs[:2]))
    assert rule.score(np.minimum(spot, level), EMB, s) <= thr + 1e-6  # nothing under the seed level can flag it

    spread = _scattered_change(7, 0.3, 0.38)
    r = rule.readings(spread, EMB, s)
    assert rule.combine(r) > thr and rule.wide_alone(r, thr)
    wide = rule.wide_level(r, thr, rule.bases(spread, EMB)[1])
    assert 0.1 < float((spread >= wide).mean()) < 0.5  # the raised patches, not the background


def test_contrast_rule_round_trips_and_old_rules_stay_absolute():
    from config.settings import MemorySettings

    rule = ImageScoreRule((24.0, 64.0), (0.5, 0.4, 0.2), 0.9, contrast=True)
    assert rule.as_dict()["contrast"] is True
    assert ImageScoreRule.from_calibration({"image_score": rule.as_dict()}) == rule
    old = {"image_score": {"sigmas": [24.0, 64.0], "refs": [0.5, 0.4, 0.2], "quantile": 0.9}}
    assert not ImageScoreRule.from_calibration(old).contrast
    assert "above the frame's median" in rule.describe() and "above" not in ImageScoreRule((24.0,), (1.0,)).describe()
    assert ImageScoreRule((24.0,), (0.5,)).bases(_background(3), EMB) == (0.0, 0.0)
    assert MemoryParams.from_settings(MemorySettings(score_contrast=True)).score_contrast
    assert MemoryParams.from_settings(MemorySettings(score_contrast=False)).score_contrast is False


# --------------------------------------------------------------------------- the region reading

LINE_LEVEL = 0.6


def _thin_line(seed: int, level: float = LINE_LEVEL) -> np.ndarray:
    """Background plus a long thin scratch (3 px wide, about 300 px long) well above the background."""
    m = _background(seed)
    cv2.line(m, (100, 150), (400, 350), level, 3)
    return m


def test_a_long_thin_defect_is_caught_by_the_region_reading_and_its_region_is_seeded():
    """A scratch 3 px wide and 300 px long: smoothing to 24 or 64 px spreads it to a level under a good
    frame's speck, so the rule without the region reading misses it; its excess over the normal pixels'
    99.8 % level, summed along it, is far above any normal frame's and the rule with it flags it. region_seed
    gives the region's peak (the mapper's seed level is at most that), and nothing for a normal frame or for a
    spot that a smoothed maximum flags."""
    normals = _normal_frames()
    sigmas, q, s = ImageScoreRule.sigmas_for(PARAMS.image_sigma, PARAMS.area_sigma), 0.0, 4.0  # no wide reading
    level = float(np.quantile(np.concatenate([m.ravel() for m in normals]), 0.998))
    readings = [map_readings(m, EMB, sigmas, q, s, region_level=level) for m in normals]
    assert [r[:2] for r in readings] == [map_readings(m, EMB, sigmas, q, s) for m in normals]
    rule = ImageScoreRule.fit(sigmas, readings, q, region_level=level)
    assert rule.region_level == level and len(rule.refs) == 3
    thr = image_threshold([rule.combine(r) for r in readings], 0.01).value
    without = ImageScoreRule.fit(sigmas, [r[:2] for r in readings], q)
    without_thr = image_threshold([without.combine(r[:2]) for r in readings], 0.01).value

    line = _thin_line(50)
    r = rule.readings(line, EMB, s)
    assert without.score(line, EMB, s) < without_thr
    assert rule.combine(r) > thr and r[2] / rule.refs[2] > thr  # the region reading makes the verdict
    assert max(rule.combine(x) for x in readings) < rule.combine(r)
    seed = rule.region_seed(line, EMB, r, thr)
    assert seed == pytest.approx(LINE_LEVEL, rel=0.1)  # the line's peak, read off the reduced map
    assert rule.region_seed(normals[0], EMB, readings[0], thr) == 0.0  # not over the threshold: no seed
    # a compact spot is still flagged, and a scratch half as long reads less (an area, not a peak)
    spot = _background(98)
    cv2.circle(spot, (256, 256), 25, 1.2, -1)
    assert rule.score(spot, EMB, s) > thr
    assert rule.region_seed(spot, EMB, rule.readings(spot, EMB, s), thr) == 0.0  # its smoothed maximum seeds it
    short = _background(50)
    cv2.line(short, (100, 150), (250, 250), LINE_LEVEL, 3)
    assert rule.readings(short, EMB, s)[2] < 0.8 * r[2]


def test_region_reading_units_do_not_depend_on_the_frame_size():
    """The same scratch on a frame of half the size (the map is read at the 1024 px frame's scale): the region
    reading is the same to a few percent."""
    big = _thin_line(51)
    small = cv2.resize(big, (SIZE // 2, SIZE // 2), interpolation=cv2.INTER_AREA)
    emb_small = ImageEmbedding("k", np.zeros((1, 64, 64), np.float32), (1024, 1024), (SIZE // 2, SIZE // 2))
    a = map_readings(big, EMB, (24.0,), 0.0, 4.0, region_level=0.4)[1]
    b = map_readings(small, emb_small, (24.0,), 0.0, 4.0, region_level=0.4)[1]
    assert a > 0 and b == pytest.approx(a, rel=0.1)


def test_region_reference_has_a_floor_when_normal_frames_rarely_cross_the_level():
    """Normal frames whose maps almost never cross the level (most read 0): the reference is the floor, not
    ~0, so one small crossing does not make a frame defective by itself."""
    from workers.memory.image_score import region_floor

    readings = [(0.5, 0.4, 0.0)] * 11 + [(0.5, 0.4, 0.5)]
    rule = ImageScoreRule.fit((24.0, 64.0), readings, region_level=0.6)
    assert rule.refs[2] == pytest.approx(region_floor(0.6)) and region_floor(0.6) > 1.0
    assert rule.combine((0.5, 0.4, 0.5)) == pytest.approx(1.0 / 0.9 * 0.5 / 0.5, rel=0.2)  # the peak reading leads


def test_rule_with_the_region_reading_round_trips_is_described_and_settings_are_validated():
    from config.settings import MemorySettings, SettingsError

    rule = ImageScoreRule((24.0, 64.0), (0.5, 0.4, 0.2, 3.0), 0.9, contrast=True, region_level=0.65)
    assert rule.as_dict()["region_level"] == 0.65
    assert ImageScoreRule.from_calibration({"image_score": rule.as_dict()}) == rule
    old = {"image_score": {"sigmas": [24.0, 64.0], "refs": [0.5, 0.4, 0.2], "quantile": 0.9}}
    assert ImageScoreRule.from_calibration(old).region_level == 0.0
    assert "region's excess over 0.65 / 3" in rule.describe() and "above p25 / 0.2" in rule.describe()
    assert "region_level" not in ImageScoreRule((24.0,), (1.0,)).as_dict()
    with pytest.raises(ValueError, match="4 readings"):
        ImageScoreRule((24.0, 64.0), (0.5, 0.4, 0.2), 0.9, region_level=0.65)
    # the wide reading over the threshold with no smoothed maximum: alone (its pixels are published), whether
    # or not the region reading is over the threshold too (then its region is seeded as well)
    assert rule.wide_alone((0.5, 0.4, 0.5, 3.0), 2.0) and rule.wide_alone((0.5, 0.4, 0.5, 9.0), 2.0)
    assert not rule.wide_alone((1.5, 0.4, 0.5, 9.0), 2.0)

    assert MemorySettings().region_quantile == 0.998
    assert MemorySettings(region_quantile=0.0).region_quantile == 0.0
    for bad in (0.5, 1.0, -0.1):
        with pytest.raises(SettingsError, match="memory.region_quantile"):
            MemorySettings(region_quantile=bad)
    assert MemoryParams.from_settings(MemorySettings()).region_quantile == 0.998
    assert MemoryParams.from_settings(MemorySettings()).one_reading().region_quantile == 0.0  # label-free: off
