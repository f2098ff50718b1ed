"""Frozen dataclasses passed between stages, and the typed errors of the streaming side.

Nothing here imports torch: ingest processes stay light.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum


class Encoding(str, Enum):
    JPEG = "jpeg"
    RAW = "raw"  # BGR uint8, C-contiguous H x W x 3 (or H x W for grey)


class Verdict(str, Enum):
    OK = "ok"
    DEFECT = "defect"


# ------------------------------------------------------------------------------------------ errors


class LineInspectError(Exception):
    """Base of every error lineinspect raises on purpose."""


class PayloadError(LineInspectError):
    """A payload on the wire does not decode; ``reason`` says why (it ends up in the dead-letter stream)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class SourceConnectionError(LineInspectError):
    """A camera source cannot be opened or stopped giving frames."""


class SourceExhausted(LineInspectError):
    """A finite source (file, folder without loop) has no more frames."""


class QueueUnavailableError(LineInspectError):
    """Redis cannot be reached."""


class QueueAccessError(LineInspectError):
    """Redis answers but refuses a command a process needs (ACL permissions)."""


class ModelLoadError(LineInspectError):
    """A model or its weights cannot be loaded; the process must not emit verdicts."""


# ------------------------------------------------------------------------------------------ frames


@dataclass(frozen=True)
class Frame:
    """One camera frame as it travels from ingest to the workers."""

    line_id: str
    camera_id: str
    seq: int  # per camera session, from 0
    session: str  # ingest session id (start time in ms): makes frame ids unique across restarts
    capture_ts: float  # unix seconds at capture
    encoding: Encoding
    shape: tuple[int, ...]  # (H, W, C) or (H, W) of the decoded image
    data: bytes = field(repr=False)

    @property
    def frame_id(self) -> str:
        return f"{self.camera_id}:{self.session}:{self.seq}"


@dataclass(frozen=True)
class Defect:
    """One connected defect region. ``label`` is its value in the result's label mask."""

    label: int
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 (inclusive-exclusive), input image pixels
    area: int  # pixels
    score: float  # max pixel score inside the region


@dataclass(frozen=True)
class InspectionResult:
    """What a worker publishes for one frame."""

    frame_id: str
    line_id: str
    camera_id: str
    seq: int
    capture_ts: float
    image_score: float
    threshold: float
    verdict: Verdict
    defects: tuple[Defect, ...] = ()
    # label mask (0 = good, i = defect with label i) as PNG bytes at the frame's size; b"" when no defect
    mask_png: bytes = field(default=b"", repr=False)
    timings: dict[str, float] = field(default_factory=dict)  # stage -> seconds
    models: dict[str, str] = field(default_factory=dict)  # role -> model identifier
    worker_id: str = ""
    processed_ts: float = 0.0

    @property
    def latency_s(self) -> float:
        """Capture to result, seconds."""
        return max(0.0, self.processed_ts - self.capture_ts) if self.processed_ts else 0.0
