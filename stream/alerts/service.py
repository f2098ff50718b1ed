"""The alert service: reads the results of its lines as consumer group ``alerts``, follows each line's drift
(:mod:`stream.alerts.drift`), debounces defect results while the line does not drift, and hands the alerts it
raises to the sinks (see :mod:`stream.alerts`)."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

from stream.alerts.alert import Alert, Deliverable, DriftAlert
from stream.alerts.debounce import AlertDebouncer, Clock, Decision
from stream.alerts.delivery import SinkWorker
from stream.alerts.drift import DriftChange, DriftMonitor, DriftUpdate
from stream.alerts.frames import FrameTail, find_frame
from stream.alerts.snapshot import render_snapshot
from stream.backoff import Backoff
from stream.contracts import InspectionResult, PayloadError, Verdict
from stream.entries import Entry, entry_of, text
from stream.keys import line_keys, slot_groups
from stream.prometheus_metrics import AlertMetrics
from stream.reader import read_group
from stream.wire import decode_result, frame_to_image

log = logging.getLogger(__name__)

ALERT_GROUP = "alerts"
STALE_READ_S = 15.0  # no successful Redis read for this long: unhealthy


class AlertService:
    """Reads results of ``lines`` (consumer group ``group``), follows drift (``drift``: a monitor per line; a
    line without one never drifts), debounces, and hands alerts to the sinks."""

    def __init__(self, client: Any, prefix: str, lines: Sequence[str], debouncer: AlertDebouncer,
                 sinks: Sequence[SinkWorker], metrics: AlertMetrics, *, consumer: str = "",
                 stale_after_s: float = 300.0, wall_clock: Clock = time.time,
                 frame_tail: FrameTail | None = None, layout: str = "plain",
                 drift: Mapping[str, DriftMonitor] | None = None, group: str = ALERT_GROUP):
        from stream.redisclient import is_cluster

        if not lines:
            raise ValueError("the alert service needs at least one line")
        self.client = client
        self.prefix = prefix
        self.lines = list(dict.fromkeys(lines))
        self.debouncer = debouncer
        self.sinks = list(sinks)
        self.metrics = metrics
        self.consumer = consumer or f"{socket.gethostname()}-{os.getpid()}"
        self.stale_after_s = stale_after_s
        self._wall = wall_clock
        self.frame_tail = frame_tail
        self.layout = layout
        self.drift = dict(drift or {})
        self.group = group
        self._streams = {line_keys(prefix, line, layout).results: line for line in self.lines}
        self._groups = slot_groups(self._streams, is_cluster(client))  # one XREADGROUP per cluster slot
        self._last_ok = 0.0  # monotonic time of the last successful Redis read
        self._last_error = "not started"
        self._ready = False

    # -------------------------------------------------------------------------------- lifecycle
    def setup(self) -> list[Deliverable]:
        """Create the consumer groups, start the sinks, take over entries a dead instance left pending."""
        import redis

        for stream in self._streams:
            try:
                self.client.xgroup_create(stream, self.group, id="$", mkstream=True)
            except redis.ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise
        for s in self.sinks:
            if not s.alive():
                s.start()
        if self.frame_tail is not None and not self.frame_tail.alive():
            self.frame_tail.start()
        self._ready = True
        self._last_ok = time.monotonic()
        return [alert for stream in self._streams for alert in self._handle_entries(self._claim_pending(stream))]

    def _claim_pending(self, stream: str) -> list[Entry]:
        """The entries of ``stream`` earlier (crashed) instances left pending, now this consumer's."""
        start, claimed = "0-0", []
        while True:
            reply = self.client.xautoclaim(stream, self.group, self.consumer, min_idle_time=0, start_id=start,
                                           count=100)
            start, entries = text(reply[0]), reply[1]
            claimed += [entry_of(stream, eid, fields) for eid, fields in entries]
            if not entries or start == "0-0":
                return claimed

    def close(self, timeout: float = 5.0) -> None:
        if self.frame_tail is not None:
            self.frame_tail.stop(timeout)
        for s in self.sinks:
            s.stop(timeout)

    # ---------------------------------------------------------------------------------- reading
    def poll(self, block_ms: int = 1000, count: int = 50) -> list[Deliverable]:
        """Read new results once (waiting up to ``block_ms``); returns the alerts raised."""
        import redis

        try:
            entries = read_group(self.client, self.group, self.consumer, self._groups, count=count,
                                 block_ms=block_ms)
        except redis.ResponseError as exc:
            if "NOGROUP" in str(exc):  # Redis lost its data (restart without persistence): recreate
                log.warning("alerts: consumer group missing, creating it again")
                self.setup()
                return []
            raise
        self._last_ok = time.monotonic()
        return self._handle_entries(entries)

    def _handle_entries(self, entries: list[Entry]) -> list[Deliverable]:
        raised: list[Deliverable] = []
        for entry in entries:
            if not entry.deleted:  # a deleted one was trimmed away while pending: acknowledged only
                raised += self._handle_entry(entry)
            self.client.xack(entry.stream, self.group, entry.entry_id)
        return raised

    def _handle_entry(self, entry: Entry) -> list[Deliverable]:
        self.metrics.results_read.labels(self._streams[entry.stream]).inc()
        try:
            if entry.payload is None:
                raise PayloadError("no wire payload among the entry's fields")
            result = decode_result(entry.payload)
        except PayloadError as exc:
            log.warning("alerts: unreadable result %s on %s: %s", entry.entry_id, entry.stream, exc.reason)
            return []
        return self.handle(result)

    def handle(self, result: InspectionResult) -> list[Deliverable]:
        """One result: the line's drift first (a drift event goes to every sink), then, unless the line drifts,
        the debouncer (an alert, with snapshot, goes to every sink). Returns what was raised."""
        line = result.line_id
        defective = result.verdict is Verdict.DEFECT
        if result.processed_ts and self._wall() - result.processed_ts > self.stale_after_s:
            if defective:  # a stale result neither pages nor moves the drift window
                self.metrics.alerts_suppressed.labels(line, "stale").inc()
            return []
        raised: list[Deliverable] = []
        drifting = False
        monitor = self.drift.get(line)
        if monitor is not None:
            update = monitor.observe(result)
            self._record_drift(line, update)
            if update.change is not None:
                raised.append(self._drift_alert(result, update))
                if update.change is DriftChange.STARTED:
                    self.debouncer.forget(line)  # defects before the drift do not count towards alerts after it
            drifting = update.active
        if defective and drifting:
            self.metrics.alerts_suppressed.labels(line, "drift").inc()
        elif defective:
            alert = self._debounce(result)
            if alert is not None:
                raised.append(alert)
        for item in raised:
            for s in self.sinks:
                s.submit(item)
        return raised

    def _debounce(self, result: InspectionResult) -> Alert | None:
        line = result.line_id
        decision = self.debouncer.observe(line, True)
        if decision is not Decision.RAISE:
            self.metrics.alerts_suppressed.labels(line, decision.value).inc()
            return None
        alert = self._build(result)
        self.metrics.alerts_raised.labels(line).inc()
        log.warning("ALERT line %s: frame %s score %.3f, %d defect(s), snapshot from %s", line, result.frame_id,
                    result.image_score, len(result.defects), alert.snapshot_source)
        return alert

    def _record_drift(self, line: str, update: DriftUpdate) -> None:
        m, f = self.metrics, update.figures
        m.drift_active.labels(line).set(1 if update.active else 0)
        if f is not None:
            m.flagged_share.labels(line).set(f.flagged_share)
            m.expected_share.labels(line).set(f.expected_share)
            m.score_median.labels(line).set(f.median_ratio)
            m.drift_window_frames.labels(line).set(f.frames)
        if update.change is not None:
            m.drift_events.labels(line, update.change.value).inc()

    def _drift_alert(self, result: InspectionResult, update: DriftUpdate) -> DriftAlert:
        assert update.change is not None and update.figures is not None and update.episode is not None
        image = self._frame_image(result)
        snapshot, mime, source = b"", "", "none"
        if image is not None:  # the frame shows what changed; without it the event goes without a picture
            try:
                snapshot, mime, source = render_snapshot(result, image)
            except Exception as exc:
                log.warning("alerts: drift snapshot of %s failed: %s", result.frame_id, exc)
        event = DriftAlert(
            alert_id=f"{result.line_id}:drift:{update.change.value}:{result.frame_id}", line=result.line_id,
            change=update.change, frame_id=result.frame_id, camera=result.camera_id, raised_ts=self._wall(),
            figures=update.figures, episode=update.episode, snapshot=snapshot, snapshot_mime=mime,
            snapshot_source=source)
        f, e = update.figures, update.episode
        ref = "?" if f.reference_median_ratio is None else f"{f.reference_median_ratio:.2f}"
        log.warning("DRIFT line %s: %s (%s) at frame %s: %d of %d frames over the threshold (calibration "
                    "expects %.1f%%, p=%.1e), median score %.2f x threshold (reference %s); %d defect result(s) "
                    "suppressed so far", result.line_id, event.title, e.reason.value, result.frame_id, f.flagged,
                    f.frames, 100 * f.expected_share, f.p_value, f.median_ratio, ref, e.flagged)
        return event

    def _frame_image(self, result: InspectionResult):
        """The result's frame as an image (from the tail, else the frames stream), or None."""
        try:
            frame = self.frame_tail.get(result.frame_id) if self.frame_tail is not None else None
            if frame is None:
                frame = find_frame(self.client, self.prefix, result, layout=self.layout)
            return frame_to_image(frame) if frame is not None else None
        except PayloadError as exc:
            log.info("alerts: frame %s does not decode (%s): drawing the mask alone", result.frame_id, exc.reason)
        except Exception as exc:  # a snapshot problem must never stop the alert itself
            log.warning("alerts: frame lookup for %s failed: %s", result.frame_id, exc)
        return None

    def _build(self, result: InspectionResult) -> Alert:
        try:
            snapshot, mime, source = render_snapshot(result, self._frame_image(result))
        except Exception as exc:
            log.warning("alerts: snapshot of %s failed: %s", result.frame_id, exc)
            snapshot, mime, source = b"", "", "none"
        return Alert(
            alert_id=f"{result.line_id}:{result.frame_id}", line=result.line_id, frame_id=result.frame_id,
            camera=result.camera_id, score=result.image_score, threshold=result.threshold,
            defects=result.defects, capture_ts=result.capture_ts, raised_ts=self._wall(),
            defect_frames=self.debouncer.debounce_count, snapshot=snapshot, snapshot_mime=mime,
            snapshot_source=source)

    # ---------------------------------------------------------------------------------- running
    def health(self) -> tuple[bool, str]:
        if not self._ready:
            return False, f"alerts: not connected ({self._last_error})"
        age = time.monotonic() - self._last_ok
        if age > STALE_READ_S:
            return False, f"alerts: no successful Redis read for {age:.0f}s ({self._last_error})"
        dead = [s.name for s in self.sinks if not s.alive()]
        if dead:
            return False, f"alerts: sink thread(s) stopped: {', '.join(dead)}"
        return True, f"ok: watching {', '.join(self.lines)}"

    def run(self, stop: threading.Event, block_ms: int = 1000) -> None:
        """Poll until ``stop`` is set; Redis outages are logged and retried with backoff."""
        import redis

        backoff = Backoff(0.5, 10.0)
        while not stop.is_set():
            try:
                if not self._ready:
                    self.setup()
                self.poll(block_ms)
                backoff.reset()
            except redis.RedisError as exc:
                self._last_error = f"{type(exc).__name__}: {exc}"
                self._ready = False
                delay = backoff.next_delay()
                log.warning("alerts: Redis error (%s); retrying in %.1fs", self._last_error, delay)
                stop.wait(delay)
