"""Wire format: bytes plus a small versioned JSON header. No Python object serialisation (pickling) anywhere.

Layout of one payload::

    b"LI"  | version (1 byte) | kind (1 byte: b"F" frame, b"R" result) | header length (uint32 BE)
    header (UTF-8 JSON object)  | body (raw bytes: encoded image for a frame, label-mask PNG for a result)

Decoding checks every field and raises :class:`PayloadError` with a reason that says what is wrong.
"""

from __future__ import annotations

import math
import struct
from typing import Any

import numpy as np

from stream.contracts import Defect, Encoding, Frame, InspectionResult, PayloadError, Verdict
from stream.imagesize import encoded_size
from stream.strictjson import dumps_header, loads_header

MAGIC = b"LI"
VERSION = 1
KIND_FRAME = b"F"
KIND_RESULT = b"R"
_PREFIX = struct.Struct(">2sBcI")
MAX_HEADER = 1 << 16  # bytes of JSON header; a frame's is ~150, a result's a few hundred
MAX_ID_CHARS = 128  # line, camera and session strings of a frame (they make the frame id and Redis keys)
MAX_SIDE = 65535  # pixels per image side (the JPEG limit)
MAX_TS = 1e10  # capture/processing timestamps: unix seconds in [0, 1e10) (until the year 2286)
DEFAULT_MAX_FRAME_PIXELS = 40_000_000  # queue.max_frame_pixels: H x W of a decoded frame


def _pack(kind: bytes, header: dict[str, Any], body: bytes) -> bytes:
    head = dumps_header(header)
    return _PREFIX.pack(MAGIC, VERSION, kind, len(head)) + head + body


def _unpack(payload: bytes, kind: bytes) -> tuple[dict[str, Any], bytes]:
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise PayloadError(f"payload is {type(payload).__name__}, not bytes")
    payload = bytes(payload)
    if len(payload) < _PREFIX.size:
        raise PayloadError(f"payload too short ({len(payload)} bytes)")
    magic, version, got_kind, head_len = _PREFIX.unpack_from(payload)
    if magic != MAGIC:
        raise PayloadError(f"bad magic {magic!r} (expected {MAGIC!r})")
    if version != VERSION:
        raise PayloadError(f"unsupported wire version {version} (this build reads {VERSION})")
    if got_kind != kind:
        raise PayloadError(f"payload kind {got_kind!r}, expected {kind!r}")
    if head_len > MAX_HEADER:
        raise PayloadError(f"header length {head_len} does not fit the limit of {MAX_HEADER} bytes")
    if _PREFIX.size + head_len > len(payload):
        raise PayloadError(f"header length {head_len} does not fit the payload of {len(payload)} bytes")
    header = loads_header(payload[_PREFIX.size:_PREFIX.size + head_len])
    if not isinstance(header, dict):
        raise PayloadError("header is not a JSON object")
    return header, payload[_PREFIX.size + head_len:]


def _field(header: dict[str, Any], name: str, types: type | tuple[type, ...]) -> Any:
    if name not in header:
        raise PayloadError(f"header misses field {name!r}")
    value = header[name]
    if not isinstance(value, types) or isinstance(value, bool) and bool not in (
            types if isinstance(types, tuple) else (types,)):
        raise PayloadError(f"header field {name!r} has type {type(value).__name__}")
    return value


def _ident(header: dict[str, Any], name: str) -> str:
    value = _field(header, name, str)
    if not 0 < len(value) <= MAX_ID_CHARS:
        raise PayloadError(f"header field {name!r} has {len(value)} characters (allowed 1..{MAX_ID_CHARS})")
    return value


def _timestamp(header: dict[str, Any], name: str, default: float | None = None) -> float:
    value = header.get(name, default) if default is not None else _field(header, name, (int, float))
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise PayloadError(f"header field {name!r} has type {type(value).__name__}")
    value = float(value)
    if not (math.isfinite(value) and 0.0 <= value < MAX_TS):
        raise PayloadError(f"header field {name!r} = {value} is not a unix time in [0, {MAX_TS:g})")
    return value


def _shape(header: dict[str, Any], max_pixels: int) -> tuple[int, ...]:
    shape = _field(header, "shape", list)
    if len(shape) not in (2, 3) or not all(type(s) is int and 0 < s <= MAX_SIDE for s in shape[:2]):
        raise PayloadError(f"bad shape {shape!r}: need [H, W] or [H, W, C] with 1 <= H, W <= {MAX_SIDE}")
    if len(shape) == 3 and (type(shape[2]) is not int or shape[2] not in (1, 3, 4)):
        raise PayloadError(f"bad shape {shape!r}: channels must be 1, 3 or 4")
    if shape[0] * shape[1] > max_pixels:
        raise PayloadError(f"shape {shape} has {shape[0] * shape[1]} pixels (queue.max_frame_pixels={max_pixels})")
    return tuple(shape)


# ------------------------------------------------------------------------------------------ frames


def encode_frame(frame: Frame) -> bytes:
    header = {
        "line": frame.line_id, "camera": frame.camera_id, "seq": frame.seq, "session": frame.session,
        "ts": frame.capture_ts, "enc": frame.encoding.value, "shape": list(frame.shape),
    }
    return _pack(KIND_FRAME, header, frame.data)


def decode_frame(payload: bytes, max_pixels: int = DEFAULT_MAX_FRAME_PIXELS) -> Frame:
    """Check and decode a frame payload (not its image: :func:`frame_to_image`); PayloadError says what is wrong.

    Limits: header size and depth, int64 integers, finite numbers, UTF-8 strings (:mod:`stream.strictjson`);
    ids of 1..128 characters; ``seq`` >= 0; ``ts`` a unix time; 1..65535 pixels a side, 1/3/4 channels and
    at most ``max_pixels`` (``queue.max_frame_pixels``) pixels.
    """
    header, body = _unpack(payload, KIND_FRAME)
    enc = _field(header, "enc", str)
    try:
        encoding = Encoding(enc)
    except ValueError:
        raise PayloadError(f"unknown encoding {enc[:32]!r}") from None
    shape = _shape(header, max_pixels)
    need = math.prod(shape)
    if encoding is Encoding.RAW and len(body) != need:
        raise PayloadError(f"raw body has {len(body)} bytes, shape {list(shape)} needs {need}")
    if not body:
        raise PayloadError("empty image body")
    seq = _field(header, "seq", int)
    if seq < 0:
        raise PayloadError(f"header field 'seq' = {seq} is negative")
    session = _field(header, "session", (str, int))
    return Frame(
        line_id=_ident(header, "line"), camera_id=_ident(header, "camera"), seq=seq,
        session=_ident({"session": str(session)}, "session"), capture_ts=_timestamp(header, "ts"),
        encoding=encoding, shape=shape, data=body,
    )


def frame_to_image(frame: Frame, max_pixels: int = DEFAULT_MAX_FRAME_PIXELS) -> np.ndarray:
    """Decode a frame's bytes to a BGR (or grey) uint8 image; a corrupt image raises PayloadError.

    An encoded body's own size is read from its JPEG/PNG header first and must match the frame header and
    ``max_pixels`` before any pixel is decoded.
    """
    import cv2

    if frame.encoding is Encoding.RAW:
        return np.frombuffer(frame.data, dtype=np.uint8).reshape(frame.shape)
    height, width = encoded_size(frame.data)
    if height * width > max_pixels:
        raise PayloadError(f"encoded image of {width}x{height} has {width * height} pixels "
                           f"(queue.max_frame_pixels={max_pixels})")
    if (height, width) != tuple(frame.shape[:2]):
        raise PayloadError(f"encoded image of {width}x{height} differs from header shape {tuple(frame.shape)}")
    img = cv2.imdecode(np.frombuffer(frame.data, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    if img is None:
        raise PayloadError(f"JPEG body of {len(frame.data)} bytes does not decode")
    if tuple(img.shape) != tuple(frame.shape) or img.dtype != np.uint8:
        raise PayloadError(f"decoded image {img.shape} {img.dtype} differs from header shape "
                           f"{tuple(frame.shape)} uint8")
    return img


def image_to_frame(image: np.ndarray, *, line_id: str, camera_id: str, seq: int, session: str,
                   capture_ts: float, encoding: Encoding = Encoding.JPEG, jpeg_quality: int = 90) -> Frame:
    import cv2

    if encoding is Encoding.JPEG:
        ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, int(jpeg_quality)])
        if not ok:
            raise PayloadError("JPEG encoding failed")
        data = buf.tobytes()
    else:
        data = np.ascontiguousarray(image, dtype=np.uint8).tobytes()
    return Frame(line_id=line_id, camera_id=camera_id, seq=seq, session=session, capture_ts=capture_ts,
                 encoding=encoding, shape=tuple(int(s) for s in image.shape), data=data)


# ------------------------------------------------------------------------------------------ results


def encode_result(result: InspectionResult) -> bytes:
    header = {
        "frame_id": result.frame_id, "line": result.line_id, "camera": result.camera_id, "seq": result.seq,
        "ts": result.capture_ts, "score": result.image_score, "threshold": result.threshold,
        "verdict": result.verdict.value,
        "defects": [[d.label, list(d.box), d.area, d.score] for d in result.defects],
        "timings": result.timings, "models": result.models, "worker": result.worker_id,
        "processed_ts": result.processed_ts,
    }
    return _pack(KIND_RESULT, header, result.mask_png)


def decode_result(payload: bytes) -> InspectionResult:
    header, body = _unpack(payload, KIND_RESULT)
    try:
        return _result_from(header, body)
    except (TypeError, ValueError, AttributeError, OverflowError, KeyError) as exc:
        raise PayloadError(f"bad result header: {type(exc).__name__}: {exc}") from None


def _result_from(header: dict[str, Any], body: bytes) -> InspectionResult:
    verdict_raw = _field(header, "verdict", str)
    try:
        verdict = Verdict(verdict_raw)
    except ValueError:
        raise PayloadError(f"unknown verdict {verdict_raw!r}") from None
    try:
        defects = tuple(Defect(label=int(d[0]), box=tuple(int(v) for v in d[1]), area=int(d[2]),
                               score=float(d[3])) for d in _field(header, "defects", list))
    except (TypeError, ValueError, IndexError, KeyError) as exc:
        raise PayloadError(f"bad defects list: {exc}") from None
    return InspectionResult(
        frame_id=_field(header, "frame_id", str), line_id=_field(header, "line", str),
        camera_id=_field(header, "camera", str), seq=_field(header, "seq", int),
        capture_ts=float(_field(header, "ts", (int, float))), image_score=float(_field(header, "score", (int, float))),
        threshold=float(_field(header, "threshold", (int, float))), verdict=verdict, defects=defects,
        mask_png=body, timings={str(k): float(v) for k, v in _field(header, "timings", dict).items()},
        models={str(k): str(v) for k, v in _field(header, "models", dict).items()},
        worker_id=str(header.get("worker", "")), processed_ts=float(header.get("processed_ts", 0.0)),
    )


def result_mask(result: InspectionResult, shape: tuple[int, int] | None = None) -> np.ndarray | None:
    """The label mask of a result (uint8/uint16 H x W), or None when the result carries none."""
    import cv2

    if not result.mask_png:
        return None
    mask = cv2.imdecode(np.frombuffer(result.mask_png, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    if mask is None:
        raise PayloadError("result mask PNG does not decode")
    if shape is not None and mask.shape[:2] != tuple(shape[:2]):
        mask = cv2.resize(mask, (shape[1], shape[0]), interpolation=cv2.INTER_NEAREST)
    return mask


def encode_label_mask(labels: np.ndarray) -> bytes:
    """PNG bytes of a label mask (uint8 when < 256 labels, else uint16)."""
    import cv2

    dtype = np.uint8 if labels.max(initial=0) < 256 else np.uint16
    ok, buf = cv2.imencode(".png", labels.astype(dtype))
    if not ok:
        raise PayloadError("PNG encoding of the label mask failed")
    return buf.tobytes()
