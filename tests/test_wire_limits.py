"""Crafted payloads the decoder must refuse with a PayloadError (never another exception), and strict JSON out."""

from __future__ import annotations

import json
import struct

import cv2
import numpy as np
import pytest

from stream.contracts import Encoding, InspectionResult, PayloadError, Verdict
from stream.imagesize import encoded_size
from stream.strictjson import dumps_header, loads_header
from stream.wire import decode_frame, encode_frame, encode_result, frame_to_image, image_to_frame

GOOD_HEADER = {"line": "L1", "camera": "c", "seq": 0, "session": "1", "ts": 1.0, "enc": "raw", "shape": [2, 2]}


def frame_payload(header: bytes | dict, body: bytes = b"\x00" * 4) -> bytes:
    head = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack(">2sBcI", b"LI", 1, b"F", len(head)) + head + body


def header_text(**fields: str) -> bytes:
    """GOOD_HEADER with some fields replaced by raw JSON text (numbers json.dumps cannot write)."""
    parts = [f'"{k}":{fields.get(k, json.dumps(v))}' for k, v in GOOD_HEADER.items()]
    parts += [f'"{k}":{v}' for k, v in fields.items() if k not in GOOD_HEADER]
    return ("{" + ",".join(parts) + "}").encode()


# The six payloads that crashed workers (issue 13), then NaN and a large PNG; each with the reason's words.
POISON = {
    "deep_header": (frame_payload(b"[" * 100_000), "does not fit the limit"),
    "huge_int": (frame_payload(header_text(seq="1" + "0" * 4999)), "integer of 5000 digits"),
    "ts_10_pow_400": (frame_payload(header_text(ts="1" + "0" * 400)), "integer of 401 digits"),
    "shape_wraps_int64": (frame_payload(header_text(shape="[4294967296, 4294967296, 3]")), "bad shape"),
    "shape_bools": (frame_payload(header_text(shape="[true, true]")), "bad shape"),
    "lone_surrogate": (frame_payload(header_text(camera='"\\ud800"')), "lone surrogate"),
    "ts_nan": (frame_payload(header_text(ts="NaN")), "NaN"),
}


@pytest.mark.parametrize("name", sorted(POISON))
def test_crafted_payload_is_a_payload_error(name):
    payload, words = POISON[name]
    with pytest.raises(PayloadError) as err:
        frame_to_image(decode_frame(payload))
    assert words in err.value.reason


def test_depth_limit_inside_the_size_limit():
    with pytest.raises(PayloadError, match="nested deeper than 8"):
        decode_frame(frame_payload(b"[" * 1000 + b"]" * 1000))
    # brackets inside strings do not count
    assert loads_header(b'{"a": "[[[[[[[[[[[[[[[[[[[[[["}') == {"a": "[" * 22}


@pytest.mark.parametrize("ts, words", [("1e400", "not a finite float"), ("-1", "unix time"),
                                       ("Infinity", "Infinity"), ("1e10", "unix time"), ('"x"', "type str")])
def test_timestamps_must_be_finite_unix_times(ts, words):
    with pytest.raises(PayloadError, match=words):
        decode_frame(frame_payload(header_text(ts=ts)))


def test_integers_outside_int64_and_negative_seq():
    with pytest.raises(PayloadError, match="outside int64"):
        decode_frame(frame_payload(header_text(seq=str(1 << 63))))
    with pytest.raises(PayloadError, match="negative"):
        decode_frame(frame_payload(header_text(seq="-1")))


def _big_png(side: int) -> bytes:
    ok, buf = cv2.imencode(".png", np.zeros((side, side), np.uint8))
    assert ok
    return buf.tobytes()


def test_8000x8000_png_is_refused_before_decoding():
    body = _big_png(8000)
    assert len(body) < 200_000 and encoded_size(body) == (8000, 8000)
    # honest header: over queue.max_frame_pixels (default 40 M) already in the header
    with pytest.raises(PayloadError, match="max_frame_pixels"):
        decode_frame(frame_payload({**GOOD_HEADER, "enc": "jpeg", "shape": [8000, 8000]}, body))
    # lying header: the body's own size is read and refused before cv2.imdecode runs
    frame = decode_frame(frame_payload({**GOOD_HEADER, "enc": "jpeg", "shape": [10, 10]}, body))
    with pytest.raises(PayloadError, match="max_frame_pixels"):
        frame_to_image(frame)


def test_max_frame_pixels_is_a_parameter():
    img = np.zeros((100, 100, 3), np.uint8)
    frame = image_to_frame(img, line_id="L", camera_id="c", seq=0, session="s", capture_ts=1.0)
    assert frame_to_image(decode_frame(encode_frame(frame), 10_000), 10_000).shape == (100, 100, 3)
    with pytest.raises(PayloadError, match="max_frame_pixels=9999"):
        decode_frame(encode_frame(frame), 9_999)


def test_body_size_must_match_header_and_be_jpeg_or_png():
    img = np.full((20, 30, 3), 90, np.uint8)
    frame = image_to_frame(img, line_id="L", camera_id="c", seq=0, session="s", capture_ts=1.0)
    assert encoded_size(frame.data) == (20, 30)
    liar = type(frame)(**{**frame.__dict__, "shape": (30, 20, 3)})
    with pytest.raises(PayloadError, match="differs from header shape"):
        frame_to_image(decode_frame(encode_frame(liar)))
    gif = type(frame)(**{**frame.__dict__, "data": b"GIF89a" + b"\x00" * 50})
    with pytest.raises(PayloadError, match="neither JPEG nor PNG"):
        frame_to_image(decode_frame(encode_frame(gif)))


def test_strict_json_out():
    with pytest.raises(PayloadError, match="strict JSON"):
        dumps_header({"score": float("nan")})
    result = InspectionResult(
        frame_id="c:s:0", line_id="L", camera_id="c", seq=0, capture_ts=1.0, image_score=float("inf"),
        threshold=1.0, verdict=Verdict.OK, defects=(), mask_png=b"", timings={}, models={}, worker_id="w",
        processed_ts=2.0)
    with pytest.raises(PayloadError):
        encode_result(result)
    # a lone surrogate is escaped on the way out (ASCII JSON), and refused on the way back in
    assert dumps_header({"camera": "\ud800"}) == b'{"camera":"\\ud800"}'
    with pytest.raises(PayloadError, match="lone surrogate"):
        loads_header(b'{"camera":"\\ud800"}')


def test_raw_round_trip_still_exact():
    img = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    frame = image_to_frame(img, line_id="L", camera_id="c", seq=5, session="s", capture_ts=1.0,
                           encoding=Encoding.RAW)
    assert np.array_equal(frame_to_image(decode_frame(encode_frame(frame))), img)
