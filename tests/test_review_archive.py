"""The review window (stream.review.archive), review requests and their audit entries (stream.review.requests)
and the labelled folder (workers.review.labelled), against the real Redis, in both key layouts."""

from __future__ import annotations

import time

import cv2
import numpy as np
import pytest

from stream.keys import line_keys
from stream.review.archive import ReviewArchive
from stream.review.requests import (
    FrameNotKept,
    ReviewInputError,
    ReviewOutcome,
    ReviewRequest,
    find_outcome,
    request_ms,
    submit_review,
    wait_outcome,
    write_outcome,
)
from tests.helpers import wait_for
from workers.review.labelled import LabelledFolder, safe_stem


@pytest.mark.parametrize("layout", ["plain", "line_tag"])
def test_archive_is_bounded_by_bytes_oldest_dropped_first(redis_client, key_prefix, layout):
    keys = line_keys(key_prefix, "L1", layout)
    arch = ReviewArchive(redis_client, keys, max_bytes=10_000)
    for i in range(5):  # 5 x 3000 bytes: the first two must go
        kept = arch.keep(f"c:1:{i}", b"f" * 2000, b"r" * 1000, 100.0 + i, defect=i % 2 == 1)
    assert kept == type(kept)(dropped=1, bytes=9000, frames=3, kept=True)
    assert arch.stats() == (9000, 3)
    assert arch.get("c:1:0") is None and arch.get("c:1:1") is None
    got = arch.get("c:1:4")
    assert got.frame == b"f" * 2000 and got.result == b"r" * 1000 and got.ts == 104.0
    assert [e.frame_id for e in arch.recent(10)] == ["c:1:4", "c:1:3", "c:1:2"]
    assert [e.frame_id for e in arch.recent(10, defects_only=True)] == ["c:1:3"]  # c:1:1 was dropped
    assert arch.recent(1)[0].frame == b"" and arch.recent(1)[0].result == b"r" * 1000
    # the same frame again replaces its copy (bytes counted once), and a verdict change moves it
    arch.keep("c:1:3", b"g" * 100, b"s" * 100, 200.0, defect=False)
    assert arch.stats() == (3000 + 3000 + 200, 3)
    assert arch.recent(10, defects_only=True) == []
    # a frame larger than the whole window is not kept, and the window is then empty, not negative
    big = arch.keep("c:1:9", b"x" * 20_000, b"", 300.0, defect=True)
    assert not big.kept and big.bytes == 0 and big.frames == 0
    assert arch.stats() == (0, 0)
    # every key of the line starts with its base (one cluster slot with line_tag)
    names = [k.decode() for k in redis_client.scan_iter(f"{key_prefix}:*")]
    assert names and all(n.startswith(keys.base + ":review:") for n in names)


def test_requests_are_plain_fields_and_checked(redis_client, key_prefix):
    keys = line_keys(key_prefix, "L1")
    arch = ReviewArchive(redis_client, keys, max_bytes=1 << 20)
    with pytest.raises(FrameNotKept, match=r"frame c:1:7 is no longer kept \(review window 1 MiB"):
        submit_review(redis_client, keys, arch, "c:1:7", "ok", "ann")
    arch.keep("c:1:7", b"f", b"r", 1.0, defect=True)
    with pytest.raises(ReviewInputError, match="decision"):
        submit_review(redis_client, keys, arch, "c:1:7", "maybe", "ann")
    with pytest.raises(ReviewInputError, match="operator name"):
        submit_review(redis_client, keys, arch, "c:1:7", "ok", " ")
    rid = submit_review(redis_client, keys, arch, "c:1:7", "defect", "ann")
    (entry_id, fields), = redis_client.xrange(keys.reviews)
    assert entry_id.decode() == rid and set(fields) == {b"line", b"frame_id", b"decision", b"who", b"requested_ts"}
    req = ReviewRequest.from_entry(entry_id, fields)
    assert (req.line, req.frame_id, req.decision, req.who, req.request_id) == ("L1", "c:1:7", "defect", "ann", rid)
    assert abs(req.requested_ts - time.time()) < 60 and request_ms(rid) > 0
    with pytest.raises(ReviewInputError, match="unreadable"):
        ReviewRequest.from_entry(b"1-0", {b"line": b"L1"})

    assert find_outcome(redis_client, keys, rid) is None
    out = ReviewOutcome(request_id=rid, line="L1", frame_id="c:1:7", decision="defect", who="ann",
                        requested_ts=req.requested_ts, outcome="applied", worker="w1", rows_added=3,
                        score_before=1.5, score_after=0.4, verdict_after="ok", latency_s=0.25,
                        files=("/x/a.png", "/x/a_mask.png"), applied_ts=5.0)
    write_outcome(redis_client, keys, ReviewOutcome(**{**out.__dict__, "request_id": "1-1"}))  # another one
    write_outcome(redis_client, keys, out)
    assert find_outcome(redis_client, keys, rid) == out
    assert wait_outcome(redis_client, keys, rid, 0.1) == out
    assert out.applied and out.as_json()["files"] == ["/x/a.png", "/x/a_mask.png"]


def test_labelled_folder_is_mvtec_layout(tmp_path):
    folder = LabelledFolder(tmp_path)
    img = np.full((20, 30, 3), 90, np.uint8)
    labels = np.zeros((20, 30), np.uint8)
    labels[5:10, 5:12] = 2
    assert safe_stem("cam0:17:3") == "cam0_17_3" and safe_stem("../x") == "_x"
    good = folder.write_good("L1", "cam0:17:3", img)
    im_p, mask_p = folder.write_confirmed("L1", "cam0:17:4", img, labels)
    assert good == tmp_path / "L1" / "test" / "good" / "cam0_17_3.png"
    assert im_p == tmp_path / "L1" / "test" / "confirmed" / "cam0_17_4.png"
    assert mask_p == tmp_path / "L1" / "ground_truth" / "confirmed" / "cam0_17_4_mask.png"
    mask = cv2.imread(str(mask_p), cv2.IMREAD_GRAYSCALE)
    assert set(np.unique(mask)) == {0, 255} and (mask == 255).sum() == 35
    assert (cv2.imread(str(im_p)) == img).all()
    _, empty = folder.write_confirmed("L1", "cam0:17:5", img, None)
    assert cv2.imread(str(empty), cv2.IMREAD_GRAYSCALE).max() == 0
    from workers.dataset import find_categories, test_images

    (cat,) = find_categories(tmp_path)
    items = test_images(cat)
    assert cat.name == "L1" and sorted(i.rel for i in items) == [
        "confirmed/cam0_17_4.png", "confirmed/cam0_17_5.png", "good/cam0_17_3.png"]
    assert all(i.mask is not None for i in items if i.is_defect)


@pytest.mark.slow
def test_review_window_requests_and_audit_on_a_cluster(redis_cluster):
    """With redis.key_layout line_tag each line's review keys share its slot: the keep script, requests and
    audit work on the cluster client (lines on different masters)."""
    from config.settings import RedisSettings
    from stream.redisclient import make_client

    client = make_client(RedisSettings(url=redis_cluster.url, key_prefix="lir", key_layout="line_tag"))
    try:
        for line in ("a", "b", "c"):
            keys = line_keys("lir", line, "line_tag")
            arch = ReviewArchive(client, keys, max_bytes=5000)
            for i in range(4):
                arch.keep(f"c:1:{i}", b"f" * 1500, b"r" * 500, float(i), defect=True)
            assert arch.stats() == (4000, 2) and [e.frame_id for e in arch.recent(5, True)] == ["c:1:3", "c:1:2"]
            rid = submit_review(client, keys, arch, "c:1:3", "ok", "ann")
            write_outcome(client, keys, ReviewOutcome(request_id=rid, line=line, frame_id="c:1:3", decision="ok",
                                                      who="ann", requested_ts=1.0, outcome="applied"))
            assert find_outcome(client, keys, rid).outcome == "applied"
    finally:
        client.close()


def test_consumer_survives_a_lost_group_and_applies_the_next_request(redis_client, key_prefix):
    """Redis restarted without its data (the reviews group is gone: NOGROUP): the worker's consumer neither
    raises nor stops; it makes the group again and applies the next request."""
    from prometheus_client import CollectorRegistry

    from workers.model_thread import ModelThread
    from workers.review.apply import Applied
    from workers.review.consumer import ReviewConsumer
    from workers.review.metrics import ReviewMetrics

    class Applier:
        def apply(self, request):
            return Applied("applied", reason=f"seen {request.frame_id}")

    keys = line_keys(key_prefix, "L1")
    arch = ReviewArchive(redis_client, keys, max_bytes=1 << 20)
    arch.keep("c:1:1", b"f", b"r", 1.0, defect=True)
    consumer = ReviewConsumer(redis_client, keys, "w1", Applier(), ReviewMetrics(CollectorRegistry()), 0.01)
    model = ModelThread().start()
    try:
        consumer.poll(model)  # makes the group
        redis_client.delete(keys.reviews)  # the group goes with the stream
        rid = submit_review(redis_client, keys, arch, "c:1:1", "defect", "ann")  # a new stream, no group
        wait_for(lambda: consumer.poll(model) or find_outcome(redis_client, keys, rid) is not None, 10,
                 "the request applied after the group was lost")
        assert find_outcome(redis_client, keys, rid).reason == "seen c:1:1"
    finally:
        model.shutdown()
