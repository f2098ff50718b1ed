"""Small helpers shared by the queue and worker tests (frames on the wire, waiting for a condition)."""

from __future__ import annotations

import time

import numpy as np

from stream import wire
from stream.contracts import Encoding


def raw_frame(seq: int, value: int = 50, side: int = 16, line: str = "L1") -> bytes:
    """A small raw (uncompressed) frame payload of line ``line``, camera ``c``, session ``1``."""
    img = np.full((side, side, 3), value, np.uint8)
    return wire.encode_frame(wire.image_to_frame(img, line_id=line, camera_id="c", seq=seq, session="1",
                                                 capture_ts=time.time(), encoding=Encoding.RAW))


def wait_for(pred, timeout: float, what: str, poll: float = 0.05) -> float:
    """Poll ``pred`` until it is true (returns the monotonic time it was seen) or fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return time.monotonic()
        time.sleep(poll)
    raise AssertionError(f"timed out waiting for {what}")
