"""draw_overlay: mask fill + contour per defect, boxes, banner (verdict, score, fps), on real demo images."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from stream.contracts import Defect, InspectionResult, Verdict
from stream.overlay import BANNER_BG, BOX_COLOUR, DEFECT_COLOUR, FILL_ALPHA, VERDICT_COLOURS, draw_overlay
from stream.wire import decode_result, encode_label_mask, encode_result


def _result(labels: np.ndarray | None, defects: tuple[Defect, ...], verdict: Verdict = Verdict.DEFECT,
            score: float = 0.9) -> InspectionResult:
    return InspectionResult(
        frame_id="cam0:1:0", line_id="line1", camera_id="cam0", seq=0, capture_ts=1.0, image_score=score,
        threshold=0.5, verdict=verdict, defects=defects,
        mask_png=encode_label_mask(labels) if labels is not None else b"")


def _defect_from_mask(label: int, region: np.ndarray) -> Defect:
    ys, xs = np.nonzero(region)
    return Defect(label=label, box=(int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1),
                  area=int(region.sum()), score=0.8)


def _magenta_like(img: np.ndarray) -> np.ndarray:
    """Pixels pulled towards magenta: blue and red both clearly above green (never so in the demo photos)."""
    b, g, r = (img[..., i].astype(int) for i in range(3))
    return (b - g > 30) & (r - g > 30)


@pytest.fixture
def demo_defect(demo_data):
    img = cv2.imread(str(demo_data / "test" / "colour" / "03.jpg"), cv2.IMREAD_COLOR)
    gt = cv2.imread(str(demo_data / "ground_truth" / "colour" / "03_mask.png"), cv2.IMREAD_GRAYSCALE)
    assert img is not None and gt is not None
    region = gt > 127
    assert region.sum() > 50
    return img, region


def test_fill_and_contour_follow_the_real_ground_truth_mask(demo_defect):
    img, region = demo_defect
    before = img.copy()
    d = _defect_from_mask(1, region)
    res = decode_result(encode_result(_result(region.astype(np.uint8), (d,))))  # through the wire, as live
    out = draw_overlay(img, res)

    assert out.shape == img.shape and out.dtype == np.uint8
    assert np.array_equal(img, before), "the input image must not be modified"
    # the image has (almost) no magenta of its own; after drawing, the defect region is magenta-tinted
    assert _magenta_like(img)[region].mean() < 0.05
    inner = cv2.erode(region.astype(np.uint8), np.ones((7, 7), np.uint8)).astype(bool)
    assert inner.any()
    assert _magenta_like(out)[inner].mean() > 0.9
    expected = np.clip(img[inner].astype(np.float32) * (1 - FILL_ALPHA) + np.array(DEFECT_COLOUR) * FILL_ALPHA + 0.5,
                       0, 255)
    assert np.abs(out[inner].astype(np.float32) - expected).max() <= 1.0
    # the contour is drawn in the defect colour exactly, on the region's border
    cross = cv2.getStructuringElement(cv2.MORPH_CROSS, (3, 3))
    border = region & ~cv2.erode(region.astype(np.uint8), cross).astype(bool)  # 4-connected border pixels
    exact = np.all(out == np.array(DEFECT_COLOUR, np.uint8), axis=-1)
    x0, y0, x1, y1 = d.box
    box_edge = np.zeros_like(region)
    box_edge[y0:y1, x0:x1] = True
    box_edge[y0 + 3:y1 - 3, x0 + 3:x1 - 3] = False
    assert exact[border & ~box_edge].mean() > 0.8
    # the box is yellow on its edges
    assert np.array_equal(out[y0 + (y1 - y0) // 2, x0], np.array(BOX_COLOUR, np.uint8))
    assert np.array_equal(out[y1 - 1, x0 + (x1 - x0) // 2], np.array(BOX_COLOUR, np.uint8))
    # far from the defect and below the banner, the image is untouched
    far = np.ones_like(region)
    far[max(0, y0 - 40):y1 + 40, max(0, x0 - 40):x1 + 40] = False
    far[:60] = False
    assert np.array_equal(out[far], img[far])


def test_several_defects_each_get_their_own_region_and_box():
    img = np.full((240, 320, 3), 120, np.uint8)
    labels = np.zeros((240, 320), np.uint8)
    labels[100:140, 30:90] = 1
    cv2.circle(labels, (240, 170), 25, 2, -1)
    d1 = _defect_from_mask(1, labels == 1)
    d2 = _defect_from_mask(2, labels == 2)
    out = draw_overlay(img, _result(labels, (d1, d2)))
    for lab in (1, 2):
        inner = cv2.erode((labels == lab).astype(np.uint8), np.ones((7, 7), np.uint8)).astype(bool)
        assert _magenta_like(out)[inner].all()
    # between the two defects nothing is drawn
    assert np.array_equal(out[150:230, 120:200], img[150:230, 120:200])
    # only defects listed in the result are drawn: label 2 left out -> its region stays grey
    out1 = draw_overlay(img, _result(labels, (d1,)))
    assert not _magenta_like(out1)[labels == 2].any()


def test_mask_at_another_resolution_is_resized_to_the_frame():
    img = np.full((400, 600, 3), 90, np.uint8)
    small = np.zeros((100, 150), np.uint8)
    small[40:60, 60:90] = 1  # -> rows 160..240, cols 240..360 at full size
    d = Defect(label=1, box=(240, 160, 360, 240), area=80 * 120, score=0.7)
    out = draw_overlay(img, _result(small, (d,)))
    assert _magenta_like(out)[170:230, 250:350].all()
    assert not _magenta_like(out)[300:, :].any()


def test_banner_shows_verdict_colour_and_fps_changes_it():
    img = np.full((300, 400, 3), 200, np.uint8)
    ok = draw_overlay(img, _result(None, (), verdict=Verdict.OK, score=0.1))
    bad = draw_overlay(img, _result(None, (), verdict=Verdict.DEFECT, score=0.9))

    def has_colour(im, colour):
        return bool(np.any(np.all(np.abs(im[:40].astype(int) - np.array(colour)) <= 10, axis=-1)))

    assert has_colour(ok, VERDICT_COLOURS[Verdict.OK]) and not has_colour(ok, VERDICT_COLOURS[Verdict.DEFECT])
    assert has_colour(bad, VERDICT_COLOURS[Verdict.DEFECT]) and not has_colour(bad, VERDICT_COLOURS[Verdict.OK])
    assert np.array_equal(ok[2, 2], np.array(BANNER_BG, np.uint8))
    # no defects -> nothing outside the banner changes
    assert np.array_equal(ok[60:], img[60:])
    with_fps = draw_overlay(img, _result(None, (), verdict=Verdict.OK, score=0.1), fps=12.5)
    banner_cols = lambda im: int(np.any(np.any(im[:40] != img[:40], axis=-1), axis=0).sum())  # noqa: E731
    assert banner_cols(with_fps) > banner_cols(ok)  # the "12.5 fps" text widens the banner


def test_grey_frames_and_no_result():
    grey = np.full((128, 128), 77, np.uint8)
    out = draw_overlay(grey, None, fps=3.0)
    assert out.shape == (128, 128, 3)
    assert np.array_equal(out[100:, :], np.full((28, 128, 3), 77, np.uint8))
    assert not np.array_equal(out[:20], np.full((20, 128, 3), 77, np.uint8))
    with pytest.raises(ValueError):
        draw_overlay(grey.astype(np.float32), None)


def test_box_outside_the_frame_is_clipped_not_an_error():
    img = np.zeros((100, 100, 3), np.uint8)
    d = Defect(label=1, box=(80, 80, 300, 300), area=10, score=0.5)
    out = draw_overlay(img, _result(None, (d,)))
    assert np.array_equal(out[99, 90], np.array(BOX_COLOUR, np.uint8))
    d_out = Defect(label=1, box=(200, 200, 300, 300), area=10, score=0.5)
    out2 = draw_overlay(img, _result(None, (d_out,)))
    assert not np.any(np.all(out2 == np.array(BOX_COLOUR, np.uint8), axis=-1))
