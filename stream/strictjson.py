"""Bounded, strict JSON for wire headers: what a crafted header can make the decoder do is limited.

Parsing (:func:`loads_header`) refuses, with a :class:`~stream.contracts.PayloadError` naming the limit:
- nesting deeper than :data:`MAX_DEPTH` (checked by a scan before ``json.loads``: no RecursionError);
- integers of more than :data:`MAX_INT_DIGITS` digits (no ValueError on 5,000-digit integers, no int
  overflow later) and integers outside int64;
- ``NaN``, ``Infinity`` and numbers that overflow a float;
- strings that are not valid UTF-8 text (lone surrogates such as ``"\\ud800"``).

Serialising (:func:`dumps_header`) is strict too: ``allow_nan=False`` and ASCII-only output, so what a
worker publishes is standard JSON that any consumer parses.
"""

from __future__ import annotations

import json
import math
from typing import Any

from stream.contracts import PayloadError

MAX_DEPTH = 8
MAX_INT_DIGITS = 19  # int64 has at most 19 digits
INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1
_OPEN, _CLOSE, _QUOTE, _BACKSLASH = frozenset(b"[{"), frozenset(b"]}"), ord('"'), ord("\\")


def _depth_ok(raw: bytes, limit: int) -> None:
    depth = 0
    in_string = escaped = False
    for byte in raw:
        if in_string:
            if escaped:
                escaped = False
            elif byte == _BACKSLASH:
                escaped = True
            elif byte == _QUOTE:
                in_string = False
        elif byte == _QUOTE:
            in_string = True
        elif byte in _OPEN:
            depth += 1
            if depth > limit:
                raise PayloadError(f"header nested deeper than {limit} levels")
        elif byte in _CLOSE:
            depth -= 1


def _parse_int(text: str) -> int:
    digits = len(text) - (text[0] == "-")
    if digits > MAX_INT_DIGITS:
        raise PayloadError(f"header integer of {digits} digits (limit {MAX_INT_DIGITS})")
    value = int(text)
    if not INT64_MIN <= value <= INT64_MAX:
        raise PayloadError(f"header integer {value} outside int64")
    return value


def _parse_float(text: str) -> float:
    value = float(text[:64]) if len(text) <= 64 else math.inf
    if not math.isfinite(value):
        raise PayloadError(f"header number {text[:32]!r} is not a finite float")
    return value


def _parse_constant(name: str) -> Any:
    raise PayloadError(f"header holds {name}, which is not JSON")


def _check_strings(value: Any) -> None:
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise PayloadError(f"header string {value[:32]!r} is not valid UTF-8 text (lone surrogate)") from None
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_strings(k)
            _check_strings(v)
    elif isinstance(value, list):
        for v in value:
            _check_strings(v)


def loads_header(raw: bytes, max_depth: int = MAX_DEPTH) -> Any:
    """Parse a wire header; any violation of the rules above (or malformed JSON) raises PayloadError."""
    _depth_ok(raw, max_depth)
    try:
        text = raw.decode("utf-8")
        value = json.loads(text, parse_int=_parse_int, parse_float=_parse_float, parse_constant=_parse_constant)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PayloadError(f"header is not JSON: {exc}") from None
    except RecursionError:  # not reachable after the depth scan; kept as a typed error all the same
        raise PayloadError("header is not JSON: nested too deeply") from None
    _check_strings(value)
    return value


def dumps_header(header: dict[str, Any]) -> bytes:
    """Standard JSON (no NaN/Infinity, ASCII with escapes) of a header; a non-finite number raises PayloadError."""
    try:
        return json.dumps(header, separators=(",", ":"), allow_nan=False, ensure_ascii=True).encode("ascii")
    except ValueError as exc:
        raise PayloadError(f"header does not serialise as strict JSON: {exc}") from None
