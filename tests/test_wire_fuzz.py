"""Property-based fuzzing of the wire decoder: every input either decodes to a frame/result that re-encodes as
strict JSON and round-trips, or raises PayloadError. No other exception, whatever the bytes."""

from __future__ import annotations

import json
import struct

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stream.contracts import Encoding, PayloadError
from stream.wire import (
    decode_frame,
    decode_result,
    encode_frame,
    encode_result,
    frame_to_image,
    image_to_frame,
)

FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
GOOD = {"line": "L1", "camera": "c", "seq": 0, "session": "1", "ts": 1.0, "enc": "raw", "shape": [2, 2]}
RESULT = {"frame_id": "c:1:0", "line": "L1", "camera": "c", "seq": 0, "ts": 1.0, "score": 0.5,
          "threshold": 1.0, "verdict": "ok", "defects": [[1, [0, 0, 1, 1], 1, 0.5]], "timings": {"a": 0.1},
          "models": {"m": "x"}, "worker": "w", "processed_ts": 2.0}

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(st.characters(codec=None, exclude_categories=())),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4),
    max_leaves=12)


def pack(kind: bytes, head: bytes, body: bytes) -> bytes:
    return struct.pack(">2sBcI", b"LI", 1, kind, len(head)) + head + body


def dump(header: dict) -> bytes:
    # allow_nan and surrogates on purpose: what a hostile producer could write
    return json.dumps(header, allow_nan=True).encode("utf-8", "surrogatepass")


def check_frame(payload: bytes) -> None:
    try:
        frame = decode_frame(payload)
        image = frame_to_image(frame)
    except PayloadError as exc:
        assert exc.reason
        return
    assert image.dtype == np.uint8 and image.shape == frame.shape
    again = encode_frame(frame)
    json.loads(again[8:8 + struct.unpack(">I", again[4:8])[0]])  # strict JSON parses it
    assert decode_frame(again) == frame


def check_result(payload: bytes) -> None:
    try:
        result = decode_result(payload)
    except PayloadError as exc:
        assert exc.reason
        return
    try:
        again = encode_result(result)
    except PayloadError:  # e.g. a field that only strict output refuses: refused with a reason, no crash
        return
    assert decode_result(again) == result


@FUZZ
@given(st.binary(max_size=300))
def test_random_bytes(blob):
    check_frame(blob)
    check_frame(b"LI\x01F" + blob)
    check_result(b"LI\x01R" + blob)


@FUZZ
@given(st.sampled_from(sorted(GOOD)), json_values, st.binary(max_size=64))
def test_one_frame_field_replaced(name, value, body):
    check_frame(pack(b"F", dump({**GOOD, name: value}), body))
    check_frame(pack(b"F", dump({**GOOD, name: value}), b"\x00" * 4))


@FUZZ
@given(st.sampled_from(sorted(RESULT)), json_values, st.binary(max_size=16))
def test_one_result_field_replaced(name, value, body):
    check_result(pack(b"R", dump({**RESULT, name: value}), body))


@FUZZ
@given(st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=8),
       st.sampled_from(["raw", "jpeg"]))
def test_valid_payloads_with_bytes_flipped(flips, enc):
    img = np.full((8, 8, 3), 100, np.uint8)
    frame = image_to_frame(img, line_id="L1", camera_id="c", seq=3, session="s", capture_ts=5.0,
                           encoding=Encoding(enc))
    blob = bytearray(encode_frame(frame))
    for pos, byte in flips:
        blob[pos % len(blob)] = byte
    check_frame(bytes(blob))

