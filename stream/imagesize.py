"""Width and height of a JPEG or PNG from its first bytes, without decoding it.

The worker checks an encoded frame's real size against its header and ``queue.max_frame_pixels`` BEFORE
``cv2.imdecode`` allocates the pixels: a 70 KB PNG can hold an 8000 x 8000 image (192 MB decoded).
"""

from __future__ import annotations

import struct

from stream.contracts import PayloadError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
JPEG_SOI = b"\xff\xd8"
# start-of-frame markers: C0..CF except C4 (DHT), C8 (JPG), CC (DAC)
_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_STANDALONE = frozenset(range(0xD0, 0xDA)) | {0x01}  # RSTn, SOI, EOI, TEM: no length field


def image_kind(data: bytes) -> str | None:
    if data[:8] == PNG_SIGNATURE:
        return "png"
    if data[:2] == JPEG_SOI:
        return "jpeg"
    return None


def png_size(data: bytes) -> tuple[int, int]:
    """(height, width) from the IHDR chunk."""
    if len(data) < 24 or data[12:16] != b"IHDR":
        raise PayloadError(f"PNG body of {len(data)} bytes does not decode (no IHDR)")
    width, height = struct.unpack(">II", data[16:24])
    return height, width


def jpeg_size(data: bytes) -> tuple[int, int]:
    """(height, width) from the first start-of-frame segment."""
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            break
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in _STANDALONE:
            i += 2
            continue
        (length,) = struct.unpack(">H", data[i + 2:i + 4])
        if marker in _SOF:
            if i + 9 > n:
                break
            height, width = struct.unpack(">HH", data[i + 5:i + 9])
            return height, width
        if length < 2:
            break
        i += 2 + length
    raise PayloadError(f"JPEG body of {len(data)} bytes does not decode (no frame header)")


def encoded_size(data: bytes) -> tuple[int, int]:
    """(height, width) of a JPEG or PNG body; anything else raises PayloadError."""
    kind = image_kind(data)
    if kind == "png":
        return png_size(data)
    if kind == "jpeg":
        return jpeg_size(data)
    raise PayloadError(f"image body of {len(data)} bytes does not decode (neither JPEG nor PNG)")
