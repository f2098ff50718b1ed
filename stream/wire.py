"""Wire format: bytes plus a small versioned JSON header. No Python object serialisation (pickling) anywhere.

Layout of one payload::

    b"LI"  | version (1 byte) | kind (1 byte: b"F" frame, b"R" result) | header length (uint32 BE)
    header (UTF-8 JSON object)  | body (raw bytes: encoded image for a frame, label-mask PNG for a result)

Decoding checks every field and raises :class:`PayloadError` with a reason that says what is wrong.
"""

from __future__ import annotations

import json
import struct
from typing import Any

import numpy as np

from stream.contracts import Defect, Encoding, Frame, InspectionResult, PayloadError, Verdict

MAGIC = b"LI"
VERSION = 1
KIND_FRAME = b"F"
KIND_RESULT = b"R"
_PREFIX = struct.Struct(">2sBcI")
MAX_HEADER = 1 << 20


def _pack(kind: bytes, header: dict[str, Any], body: bytes) -> bytes:
    head = json.dumps(header, separators=(",", ":")).encode()
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
    if head_len > MAX_HEADER or _PREFIX.size + head_len > len(payload):
        raise PayloadError(f"header length {head_len} does not fit the payload of {len(payload)} bytes")
    try:
        header = json.loads(payload[_PREFIX.size:_PREFIX.size + head_len])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PayloadError(f"header is not JSON: {exc}") from None
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


# ------------------------------------------------------------------------------------------ frames


def encode_frame(frame: Frame) -> bytes:
    header = {
        "line": frame.line_id, "camera": frame.camera_id, "seq": frame.seq, "session": frame.session,
        "ts": frame.capture_ts, "enc": frame.encoding.value, "shape": list(frame.shape),
    }
    return _pack(KIND_FRAME, header, frame.data)


def decode_frame(payload: bytes) -> Frame:
    header, body = _unpack(payload, KIND_FRAME)
    enc = _field(header, "enc", str)
    try:
        encoding = Encoding(enc)
    except ValueError:
        raise PayloadError(f"unknown encoding {enc!r}") from None
    shape = _field(header, "shape", list)
    if len(shape) not in (2, 3) or not all(isinstance(s, int) and s > 0 for s in shape):
        raise PayloadError(f"bad shape {shape!r}")
    if encoding is Encoding.RAW and len(body) != int(np.prod(shape)):
        raise PayloadError(f"raw body has {len(body)} bytes, shape {shape} needs {int(np.prod(shape))}")
    if not body:
        raise PayloadError("empty image body")
    return Frame(
        line_id=_field(header, "line", str), camera_id=_field(header, "camera", str),
        seq=_field(header, "seq", int), session=str(_field(header, "session", (str, int))),
        capture_ts=float(_field(header, "ts", (int, float))), encoding=encoding, shape=tuple(shape), data=body,
    )


def frame_to_image(frame: Frame) -> np.ndarray:
    """Decode a frame's bytes to a BGR (or grey) uint8 image; a corrupt image raises PayloadError."""
    import cv2

    if frame.encoding is Encoding.RAW:
        return np.frombuffer(frame.data, dtype=np.uint8).reshape(frame.shape)
    img = cv2.imdecode(np.frombuffer(frame.data, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    if img is None:
        raise PayloadError(f"JPEG body of {len(frame.data)} bytes does not decode")
    if tuple(img.shape) != tuple(frame.shape):
        raise PayloadError(f"decoded shape {img.shape} differs from header shape {tuple(frame.shape)}")
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
    verdict_raw = _field(header, "verdict", str)
    try:
        verdict = Verdict(verdict_raw)
    except ValueError:
        raise PayloadError(f"unknown verdict {verdict_raw!r}") from None
    try:
        defects = tuple(Defect(label=int(d[0]), box=tuple(int(v) for v in d[1]), area=int(d[2]),
                               score=float(d[3])) for d in _field(header, "defects", list))
    except (TypeError, ValueError, IndexError) as exc:
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
