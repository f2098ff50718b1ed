"""The review parts of a worker, built from the settings once its detector is loaded."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from config.settings import Settings
from stream.keys import LineKeys
from stream.review.archive import ReviewArchive
from workers.review.apply import ReviewApplier
from workers.review.consumer import ReviewConsumer
from workers.review.keeper import FrameKeeper
from workers.review.labelled import LabelledFolder
from workers.review.metrics import ReviewMetrics


def review_parts(settings: Settings, client: Any, keys: LineKeys, worker_id: str, detector: Any,
                 registry) -> tuple[FrameKeeper, ReviewConsumer]:
    """The sink that keeps each published frame, and the consumer of the line's review requests."""
    r = settings.review
    metrics = ReviewMetrics(registry)
    archive = ReviewArchive(client, keys, r.keep_bytes)
    applier = ReviewApplier(detector, archive, LabelledFolder(Path(r.labelled_dir)), keys.line,
                            settings.queue.max_frame_pixels)
    consumer = ReviewConsumer(client, keys, worker_id, applier, metrics, r.poll_interval_s, r.audit_maxlen)
    return FrameKeeper(archive, metrics, keys.line), consumer
