"""One raised alert, as the sinks send it (JSON; the snapshot as base64 or beside it)."""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from stream.contracts import Defect


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
            "snapshot": {"mime": self.snapshot_mime, "source": self.snapshot_source},
        }
        if with_snapshot:
            out["snapshot"]["base64"] = base64.b64encode(self.snapshot).decode("ascii")
        return out

    def to_json(self, with_snapshot: bool = True) -> bytes:
        return json.dumps(self.to_dict(with_snapshot), separators=(",", ":")).encode()
