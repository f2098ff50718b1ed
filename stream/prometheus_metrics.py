"""Prometheus metrics of every process. Each class takes a registry (tests use their own).

Names carry units (``_seconds``, ``_total``, ``_bytes``); labels are bounded (line, camera, stage, reason,
verdict), never frame ids.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class IngestMetrics:
    def __init__(self, registry: CollectorRegistry):
        self.frames_captured = Counter(
            "lineinspect_frames_captured_total", "Frames read from the camera source",
            ["line", "camera"], registry=registry)
        self.frames_missed = Counter(
            "lineinspect_frames_missed_total",
            "Frame slots at camera.fps that passed while ingest was blocked (e.g. on a frozen Redis): frames a "
            "live camera produced and nobody read (not captured, so not in frames_dropped)",
            ["line", "camera"], registry=registry)
        self.frames_enqueued = Counter(
            "lineinspect_frames_enqueued_total", "Frames added to the line's Redis stream",
            ["line", "camera"], registry=registry)
        self.frames_dropped = Counter(
            "lineinspect_frames_dropped_total",
            "Frames lost before inspection, by reason (unreadable, encode_error, trimmed_oldest, redis_error, "
            "redis_unconfirmed, redis_oom, redis_lost)",
            ["line", "camera", "reason"], registry=registry)
        self.camera_reconnects = Counter(
            "lineinspect_camera_reconnects_total", "Times the camera source was reopened",
            ["line", "camera"], registry=registry)
        self.camera_up = Gauge(
            "lineinspect_camera_up", "1 while the camera source gives frames", ["line", "camera"],
            registry=registry)
        self.encode_seconds = Histogram(
            "lineinspect_ingest_encode_seconds", "Time to encode one frame", ["line", "camera"],
            buckets=LATENCY_BUCKETS, registry=registry)


class WorkerMetrics:
    def __init__(self, registry: CollectorRegistry):
        self.frames_processed = Counter(
            "lineinspect_frames_processed_total", "Frames with a published result", ["line"],
            registry=registry)
        self.duplicates_skipped = Counter(
            "lineinspect_duplicate_results_skipped_total",
            "Frames whose result already existed (reclaimed after a slow worker finished)", ["line"],
            registry=registry)
        self.frames_reclaimed = Counter(
            "lineinspect_frames_reclaimed_total", "Pending entries taken over from idle consumers", ["line"],
            registry=registry)
        self.frames_dead_lettered = Counter(
            "lineinspect_frames_dead_lettered_total", "Frames moved to the dead-letter stream, by reason",
            ["line", "reason"], registry=registry)
        self.frames_failed = Counter(
            "lineinspect_frames_failed_total", "Processing attempts that raised (left for retry)", ["line"],
            registry=registry)
        self.verdicts = Counter(
            "lineinspect_verdicts_total", "Published verdicts", ["line", "verdict"], registry=registry)
        self.defects = Counter(
            "lineinspect_defects_total", "Defect regions found", ["line"], registry=registry)
        self.stage_seconds = Histogram(
            "lineinspect_stage_seconds",
            "Per-stage processing time (decode, map, sam_encode, ppg, cps1, cps2, cps3, fuse, publish)",
            ["line", "stage"], buckets=LATENCY_BUCKETS, registry=registry)
        self.end_to_end_seconds = Histogram(
            "lineinspect_end_to_end_seconds", "Capture to published result", ["line"],
            buckets=LATENCY_BUCKETS, registry=registry)
        self.cache_hits = Counter(
            "lineinspect_embedding_cache_hits_total", "SAM embedding cache hits", ["line"], registry=registry)
        self.cache_misses = Counter(
            "lineinspect_embedding_cache_misses_total", "SAM embedding cache misses", ["line"],
            registry=registry)
        self.model_load_seconds = Gauge(
            "lineinspect_model_load_seconds", "Time taken to load the models at start-up", ["line"],
            registry=registry)
        self.model_info = Info(
            "lineinspect_model", "Models, weights and map source of this worker", registry=registry)
        self.queue_length = Gauge(
            "lineinspect_queue_length", "Entries in the line's frame stream", ["line"], registry=registry)
        self.group_lag = Gauge(
            "lineinspect_consumer_group_lag", "Entries not yet delivered to the worker group", ["line"],
            registry=registry)
        self.pending = Gauge(
            "lineinspect_pending_entries", "Entries delivered but not acknowledged", ["line"],
            registry=registry)
        self.busy = Gauge(
            "lineinspect_worker_busy", "1 while the worker processes a frame", ["line"], registry=registry)


class AlertMetrics:
    def __init__(self, registry: CollectorRegistry):
        self.alerts_raised = Counter(
            "lineinspect_alerts_raised_total", "Alerts raised after debounce", ["line"], registry=registry)
        self.alerts_suppressed = Counter(
            "lineinspect_alerts_suppressed_total", "Defect results that raised no alert, by reason",
            ["line", "reason"], registry=registry)
        self.sink_deliveries = Counter(
            "lineinspect_alert_deliveries_total", "Alert deliveries by sink and outcome",
            ["sink", "outcome"], registry=registry)
        self.sink_retries = Counter(
            "lineinspect_alert_retries_total", "Retried alert deliveries", ["sink"], registry=registry)
        self.results_read = Counter(
            "lineinspect_alert_results_read_total", "Results read by the alert service", ["line"],
            registry=registry)
        self.sink_queue_length = Gauge(
            "lineinspect_alert_queue_length", "Alerts waiting in a sink's queue", ["sink"], registry=registry)
        # drift (stream.alerts.drift): the line's rolling window of results against its calibration
        self.flagged_share = Gauge(
            "lineinspect_line_flagged_share_ratio",
            "Share of the line's results in the drift window over the image threshold", ["line"], registry=registry)
        self.expected_share = Gauge(
            "lineinspect_line_expected_flagged_share_ratio",
            "Share of good frames the calibration expects over the threshold (detector.false_alarm_rate)", ["line"],
            registry=registry)
        self.score_median = Gauge(
            "lineinspect_line_score_median_ratio",
            "Median image score / threshold of the line's results in the drift window", ["line"], registry=registry)
        self.drift_window_frames = Gauge(
            "lineinspect_line_drift_window_frames", "Results in the line's drift window", ["line"], registry=registry)
        self.drift_active = Gauge(
            "lineinspect_line_drift_active",
            "1 while the line's appearance has changed (drift): its per-frame defect alerts are suppressed",
            ["line"], registry=registry)
        self.drift_events = Counter(
            "lineinspect_drift_events_total", "Drift events by kind (started: appearance changed, ended: restored)",
            ["line", "kind"], registry=registry)
