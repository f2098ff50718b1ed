"""What the sinks send (JSON; the snapshot as base64 or beside it): a defect :class:`Alert`, or a
:class:`DriftAlert` when a line's appearance changed or was restored."""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Protocol

from stream.alerts.drift import DriftChange, DriftEpisode, DriftFigures
from stream.contracts import Defect


def _with_snapshot(out: dict[str, Any], alert: Any, with_snapshot: bool) -> dict[str, Any]:
    """``out`` with the alert's ``snapshot`` entry: its mime type and source, and the image as base64 when asked."""
    out["snapshot"] = {"mime": alert.snapshot_mime, "source": alert.snapshot_source}
    if with_snapshot:
        out["snapshot"]["base64"] = base64.b64encode(alert.snapshot).decode("ascii")
    return out


def _compact_json(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload, separators=(",", ":")).encode()


@dataclass(frozen=True)
class Alert:
    """One raised alert. ``snapshot`` is an encoded image (``snapshot_mime``), empty when none could be drawn."""

    alert_id: str
    line: str
    frame_id: str
    camera: str
    score: float
    threshold: float
    defects: tuple[Defect, ...]
    capture_ts: float
    raised_ts: float
    defect_frames: int  # defective frames in the window that raised it
    snapshot: bytes = field(default=b"", repr=False)
    snapshot_mime: str = ""
    snapshot_source: str = "none"  # "frame" (overlay on the frame), "mask" (mask alone) or "none"

    def to_dict(self, with_snapshot: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {
            "type": "lineinspect.defect",
            "kind": "defect",
            "alert_id": self.alert_id,
            "line": self.line,
            "frame_id": self.frame_id,
            "camera": self.camera,
            "score": self.score,
            "threshold": self.threshold,
            "defects": [{"label": d.label, "box": list(d.box), "area": d.area, "score": d.score}
                        for d in self.defects],
            "time": datetime.fromtimestamp(self.capture_ts, timezone.utc).isoformat(),
            "capture_ts": self.capture_ts,
            "raised_ts": self.raised_ts,
            "defect_frames": self.defect_frames,
        }
        return _with_snapshot(out, self, with_snapshot)

    def to_json(self, with_snapshot: bool = True) -> bytes:
        return _compact_json(self.to_dict(with_snapshot))


class Deliverable(Protocol):
    """What a sink delivers: a defect :class:`Alert` or a :class:`DriftAlert`."""

    @property
    def alert_id(self) -> str: ...

    @property
    def line(self) -> str: ...

    @property
    def snapshot(self) -> bytes: ...

    @property
    def snapshot_mime(self) -> str: ...

    def to_json(self, with_snapshot: bool = True) -> bytes: ...


DRIFT_TITLES = {DriftChange.STARTED: "line appearance changed", DriftChange.ENDED: "line appearance restored"}


@dataclass(frozen=True)
class DriftAlert:
    """"line appearance changed" (drift started: the line's per-frame defect alerts are suppressed from now on)
    or "line appearance restored" (drift ended), with the window's figures (:mod:`stream.alerts.drift`).
    ``frame_id`` is the result at which it was recognised; ``snapshot`` that frame, when the service has it."""

    alert_id: str
    line: str
    change: DriftChange
    frame_id: str
    camera: str
    raised_ts: float
    figures: DriftFigures
    episode: DriftEpisode
    snapshot: bytes = field(default=b"", repr=False)
    snapshot_mime: str = ""
    snapshot_source: str = "none"

    @property
    def title(self) -> str:
        return DRIFT_TITLES[self.change]

    def to_dict(self, with_snapshot: bool = True) -> dict[str, Any]:
        f, e = self.figures, self.episode
        out: dict[str, Any] = {
            "type": "lineinspect.drift",
            "kind": "drift",
            "event": "changed" if self.change is DriftChange.STARTED else "restored",
            "title": self.title,
            "reason": e.reason.value,  # the start rule: "flagged_share" or "median_rise"
            "alert_id": self.alert_id,
            "line": self.line,
            "frame_id": self.frame_id,
            "camera": self.camera,
            "time": datetime.fromtimestamp(self.raised_ts, timezone.utc).isoformat(),
            "raised_ts": self.raised_ts,
            "window": {"frames": f.frames, "flagged": f.flagged, "flagged_share": f.flagged_share,
                       "expected_share": f.expected_share, "p_value": f.p_value, "median_ratio": f.median_ratio,
                       "reference_median_ratio": f.reference_median_ratio, "span_s": f.window_s},
            "drift": {"started_ts": e.started_ts, "frames": e.frames, "defects_suppressed": e.flagged},
        }
        return _with_snapshot(out, self, with_snapshot)

    def to_json(self, with_snapshot: bool = True) -> bytes:
        return _compact_json(self.to_dict(with_snapshot))
