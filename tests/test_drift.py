"""Drift (stream/alerts/drift.py): the monitor on constructed score sequences, and the alert service on the real
Redis with a real HTTP receiver: a steady line and a burst of real defects raise no drift; a shift of most frames
over the threshold raises one "line appearance changed" event and suppresses (and counts) the line's per-frame
defect alerts until "line appearance restored"."""

from __future__ import annotations

import json
import math
import time

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from config.settings import DriftSettings, Settings, SettingsError
from stream.alerts.alert import DriftAlert
from stream.alerts.debounce import AlertDebouncer
from stream.alerts.delivery import SinkWorker
from stream.alerts.drift import DriftChange, DriftMonitor, DriftReason, binomial_tail
from stream.alerts.service import AlertService
from stream.alerts.sinks import RedisStreamSink, WebhookSink
from stream.contracts import Defect, InspectionResult, Verdict
from stream.entries import PAYLOAD_FIELD
from stream.keys import line_keys
from stream.prometheus_metrics import AlertMetrics
from stream.wire import encode_result
from tests.test_alerts import FakeClock, Receiver, wait_for

RATE = 0.01  # detector.false_alarm_rate
T0 = time.time()


def result(seq: int, ratio: float, line: str = "L1", ts: float | None = None) -> InspectionResult:
    """A result whose image score is ``ratio`` x the threshold (defect when over it), one a second."""
    defect = ratio > 1.0
    box = (10, 10, 20, 20)
    return InspectionResult(
        frame_id=f"cam1:s1:{seq}", line_id=line, camera_id="cam1", seq=seq, capture_ts=T0 + seq,
        image_score=2.0 * ratio, threshold=2.0, verdict=Verdict.DEFECT if defect else Verdict.OK,
        defects=(Defect(label=1, box=box, area=100, score=2.0 * ratio),) if defect else (),
        processed_ts=T0 + seq if ts is None else ts)


def normal_ratios(n: int, seed: int = 0) -> list[float]:
    """A healthy line: median ~0.7 of the threshold, every hundredth frame over it (the calibrated 1 %)."""
    rng = np.random.default_rng(seed)
    ratios = [float(x) for x in np.clip(rng.normal(0.7, 0.07, n), 0.3, 0.95)]
    for i in range(50, n, 100):
        ratios[i] = 1.1
    return ratios


# Measured with the default memory (neck+stage1+stage2+stage3, contrast readings): image score / threshold of
# held-out good images, memory from other good images of the same category (`lineinspect --set
# detector.cps_stages=0 predict IN --out OUT --normal MEM`, scores.csv; docs/operations.md, "Drift"). Hazelnut: 14
# train/good in the memory (stream/demo_data, the MEMORY_IMAGES of tests/test_drift_processes.py), the other 14 +
# 6 test/good scored; commutator (KolektorSDD) and metal plate (MPDD): the even 20 of the first 40 train/good
# (sorted) in the memory, the odd 20 + the first 20 test/good scored.
HAZELNUT = (
    0.450, 0.456, 0.429, 0.537, 0.690, 0.488, 0.500, 0.519, 0.579, 0.598, 0.549, 0.432, 0.506, 0.644, 0.467,
    0.683, 0.525, 0.497, 0.489, 0.552)
COMMUTATOR = (
    0.718, 0.665, 0.984, 0.677, 0.631, 0.612, 0.605, 0.911, 0.670, 0.665, 0.916, 0.667, 0.788, 0.742, 0.723,
    0.657, 0.629, 0.838, 0.674, 0.600, 0.651, 0.685, 0.622, 0.687, 0.596, 0.671, 0.896, 0.673, 2.911, 0.636,
    1.117, 0.696, 0.665, 0.647, 1.348, 1.753, 0.622, 1.766, 0.657, 0.675)
METAL_PLATE = (
    0.628, 0.760, 0.497, 0.505, 0.478, 0.477, 0.530, 0.510, 0.592, 0.619, 0.626, 0.566, 0.592, 0.472, 0.431,
    0.869, 0.463, 0.794, 0.573, 0.603, 0.620, 0.499, 0.590, 0.564, 0.561, 0.574, 0.418, 0.607, 0.659, 0.582,
    0.450, 0.965, 0.850, 0.720, 0.469, 0.519, 0.439, 0.557, 0.615, 0.667)
GAIN_2_6_RISE = 0.18  # the real median ratio's rise at gain 2.6: 0.578 -> 0.761 (tests/test_drift_processes.py)
GOOD_RATIOS = {
    "hazelnut": HAZELNUT,
    "commutator": COMMUTATOR,
    "metal_plate": METAL_PLATE,
}


def good_stream(name: str, n: int, seed: int = 0, rise: float = 0.0) -> list[float]:
    """``n`` frames drawn from the measured good ratios of ``name``, each moved up by ``rise``."""
    return [float(x) + rise for x in np.random.default_rng(seed).choice(GOOD_RATIOS[name], n)]


def shifted_ratios(n: int, seed: int = 1) -> list[float]:
    """A changed appearance: nearly every frame over the threshold."""
    return [float(x) for x in np.random.default_rng(seed).uniform(1.05, 1.6, n)]


def run(monitor: DriftMonitor, ratios: list[float], start: int = 0):
    return [monitor.observe(result(start + i, r)) for i, r in enumerate(ratios)]


def changes(updates) -> list[tuple[int, DriftChange]]:
    return [(i, u.change) for i, u in enumerate(updates) if u.change is not None]


# ------------------------------------------------------------------------------------------ the rule


def test_binomial_tail_matches_the_exact_sum():
    for k, n, p in ((5, 15, 0.01), (4, 10, 0.01), (17, 30, 0.3), (0, 5, 0.2), (3, 3, 0.5), (250, 1000, 0.2)):
        exact = sum(math.comb(n, i) * p ** i * (1 - p) ** (n - i) for i in range(k, n + 1))
        assert binomial_tail(k, n, p) == pytest.approx(exact, rel=1e-9)
    assert binomial_tail(6, 5, 0.5) == 0.0
    assert 0.0 < binomial_tail(5000, 10000, 0.01) < 1e-300 or binomial_tail(5000, 10000, 0.01) == 0.0


def test_steady_line_at_its_false_alarm_rate_never_drifts():
    m = DriftMonitor("L1", DriftSettings(), RATE)
    updates = run(m, normal_ratios(2000))
    assert changes(updates) == [] and not m.active
    f = updates[-1].figures
    assert f.frames == 30 and f.median_ratio == pytest.approx(0.7, abs=0.05)
    assert f.reference_median_ratio == pytest.approx(0.7, abs=0.04)  # the median of earlier calm frames


def test_burst_of_real_defects_is_no_drift():
    m = DriftMonitor("L1", DriftSettings(), RATE)
    ratios = normal_ratios(60)
    ratios[40:45] = [1.8, 2.2, 1.5, 1.9, 2.5]  # five defective parts in a row
    updates = run(m, ratios)
    assert changes(updates) == []
    # the share was far above the calibration (p tiny), but the median did not move: parts, not the line
    worst = max((u.figures for u in updates), key=lambda f: f.flagged)
    assert worst.flagged == 6 and worst.p_value < 1e-6 and worst.median_ratio < 0.8  # 5 + a false alarm


def test_shift_starts_drift_within_the_window_once_and_recovery_ends_it():
    s = DriftSettings()
    m = DriftMonitor("L1", s, RATE)
    before = run(m, normal_ratios(100))
    during = run(m, shifted_ratios(100), start=100)
    after = run(m, normal_ratios(100, seed=2), start=200)
    assert changes(before) == [] and changes(after[:1]) == []
    (started,) = changes(during)
    assert started[1] is DriftChange.STARTED and started[0] < s.window_frames  # recognised within one window
    assert started[0] + 1 == 15  # the median crosses 0.9 once half the window is shifted frames
    f = during[started[0]].figures
    assert f.flagged_share >= s.start_share and f.p_value <= s.max_p_value and f.median_ratio >= 0.9
    assert f.reference_median_ratio == pytest.approx(0.7, abs=0.05)  # how the line looked before
    assert all(u.active for u in during[started[0]:])
    (ended,) = changes(after)
    assert ended[1] is DriftChange.ENDED
    assert s.window_frames * (1 - s.end_share) <= ended[0] + 1 <= s.window_frames  # about a window of good frames
    episode = after[ended[0]].episode
    assert episode.frames == 100 - started[0] + ended[0] and episode.flagged == 100 - started[0]
    assert not m.active and all(not u.active for u in after[ended[0]:])


def test_a_median_that_was_always_high_is_no_drift():
    """Near the threshold from the start, 1 in 8 over it: too few flagged for the flood rule, and no rise: the
    line's own calm frames are its reference."""
    m = DriftMonitor("L1", DriftSettings(), RATE)
    ratios = [0.97] * 200
    ratios[::8] = [1.1] * 25
    updates = run(m, ratios)
    assert changes(updates) == []
    assert updates[-1].figures.reference_median_ratio == pytest.approx(0.97)


@pytest.mark.parametrize("name", sorted(GOOD_RATIOS))
def test_measured_good_streams_do_not_drift(name):
    """5000 frames drawn from a category's measured good ratios (defaults: window 30, >= 15 frames): the window
    median's rise over the reference stays under start_median_rise. (The flood rule is not asserted: the
    commutator's good frames were flagged at 10 %, not the calibrated 1 %, which it may call a change.)"""
    s = DriftSettings()
    m = DriftMonitor("L1", s, RATE)
    updates = run(m, good_stream(name, 5000))
    rises = np.array([u.figures.median_rise for u in updates if u.figures.median_rise is not None])
    print(f"{name}: window-median rise over the reference p50 {np.median(rises):+.3f} p99 "
          f"{np.percentile(rises, 99):+.3f} max {rises.max():+.3f} ({len(rises)} windows)")
    assert [c for c in changes(updates) if updates[c[0]].episode.reason is DriftReason.MEDIAN_RISE] == []
    assert len(rises) > 4900 and rises.max() < s.start_median_rise


def test_median_rise_without_flags_starts_drift_once_and_recovery_ends_it():
    """Hazelnut's measured good frames, then the same with the median rise gain 2.6 gave the real detector
    (under the threshold: nothing flagged), then good again."""
    s = DriftSettings()
    m = DriftMonitor("L1", s, RATE)
    before = run(m, good_stream("hazelnut", 200))
    during = run(m, [min(r, 0.99) for r in good_stream("hazelnut", 100, seed=1, rise=GAIN_2_6_RISE)], start=200)
    after = run(m, good_stream("hazelnut", 100, seed=2), start=300)
    assert changes(before) == [] and all(u.figures.flagged == 0 for u in during)
    (started,) = changes(during)
    assert started[1] is DriftChange.STARTED and started[0] < s.window_frames  # within one window
    f, episode = during[started[0]].figures, during[started[0]].episode
    assert episode.reason is DriftReason.MEDIAN_RISE and f.flagged == 0
    assert f.median_rise >= s.start_median_rise
    assert f.reference_median_ratio == pytest.approx(float(np.median(GOOD_RATIOS["hazelnut"])), abs=0.03)
    assert all(u.active for u in during[started[0]:])
    assert during[-1].figures.reference_median_ratio == f.reference_median_ratio  # frozen while it lasts
    (ended,) = changes(after)
    assert ended[1] is DriftChange.ENDED and ended[0] < s.window_frames
    assert after[ended[0]].figures.median_rise <= s.start_median_rise / 2
    assert after[ended[0]].episode.reason is DriftReason.MEDIAN_RISE and after[ended[0]].episode.flagged == 0
    assert not m.active and changes(run(m, good_stream("hazelnut", 300, seed=3), start=400)) == []


def test_a_drift_started_on_a_short_history_lasts_while_the_rise_does():
    """A line that has just started (few calm frames: starting forgets the window of the change itself and
    leaves fewer than min_frames for a reference) keeps the reference the drift started against: a median rise
    that lasts, nothing flagged, is one drift, not a drift and at once its end. The process test's scenario
    (tests/test_drift_processes.py: 19 good frames, then 8 at gain 2.6, window 8)."""
    s = DriftSettings(window_frames=8, min_frames=6)
    m = DriftMonitor("L1", s, RATE)
    before = run(m, good_stream("hazelnut", 19))
    during = run(m, [min(r, 0.99) for r in good_stream("hazelnut", 16, seed=1, rise=GAIN_2_6_RISE)], start=19)
    assert changes(before) == [] and all(u.figures.flagged == 0 for u in during)
    (started,) = changes(during)
    assert started[1] is DriftChange.STARTED and during[started[0]].episode.reason is DriftReason.MEDIAN_RISE
    held = during[started[0]].figures.reference_median_ratio
    assert held is not None and all(u.active for u in during[started[0]:])
    assert all(u.figures.reference_median_ratio == held for u in during[started[0]:])
    (ended,) = changes(run(m, good_stream("hazelnut", 16, seed=2), start=35))
    assert ended[1] is DriftChange.ENDED and not m.active


def test_burst_of_real_defects_on_a_line_with_a_reference_is_no_drift():
    m = DriftMonitor("L1", DriftSettings(), RATE)
    ratios = good_stream("hazelnut", 200)
    ratios[150:155] = [1.8, 2.2, 1.5, 1.9, 2.5]  # five defective parts in a row
    updates = run(m, ratios)
    assert changes(updates) == []
    # the median moves (5 of 30 in a row: ~+0.1 with hazelnut's spread), but stays under the rule
    assert max(u.figures.median_rise for u in updates[150:185]) < DriftSettings().start_median_rise


def test_a_line_calibrated_for_many_false_alarms_needs_more_evidence():
    """At false_alarm_rate 0.3, 16 of 30 flagged (53 %) is p = 0.006: no drift; 24 of 30 (p = 2e-8) is."""
    m = DriftMonitor("L1", DriftSettings(), 0.3)
    assert changes(run(m, [1.2 if i % 15 < 8 else 0.95 for i in range(30)])) == []
    assert m.figures().p_value > 1e-6
    m2 = DriftMonitor("L1", DriftSettings(), 0.3)
    assert [c for _, c in changes(run(m2, [1.2 if i % 5 else 0.95 for i in range(30)]))] == [DriftChange.STARTED]


def test_window_keeps_only_recent_seconds_and_decides_nothing_on_few_frames():
    s = DriftSettings(window_frames=30, window_s=20.0, min_frames=10)
    m = DriftMonitor("L1", s, RATE)
    for i in range(9):
        assert m.observe(result(i, 1.5)).change is None  # 9 frames: too few to say anything
    assert m.observe(result(9, 1.5)).change is DriftChange.STARTED
    # the line stops for a minute: the old frames leave the window, but drift only ends on evidence
    u = m.observe(result(70, 0.7))
    assert u.figures.frames == 1 and u.active and u.change is None
    for i in range(71, 80):
        u = m.observe(result(i, 0.7))
    assert u.change is DriftChange.ENDED and u.figures.frames == 10


def test_results_without_a_usable_threshold_are_not_counted():
    m = DriftMonitor("L1", DriftSettings(), RATE)
    r = result(1, 0.5)
    u = m.observe(InspectionResult(**{**r.__dict__, "threshold": 0.0}))
    assert u.figures is None and m.figures().frames == 0


@pytest.mark.parametrize("key, value", [
    ("alerts.drift.min_frames", 31), ("alerts.drift.min_frames", 2), ("alerts.drift.window_frames", 4),
    ("alerts.drift.end_share", 0.3), ("alerts.drift.max_p_value", 0), ("alerts.drift.max_p_value", 1),
    ("alerts.drift.start_share", 0), ("alerts.drift.start_median_ratio", float("nan")),
    ("alerts.drift.start_median_rise", 0), ("alerts.drift.start_median_rise", float("nan")),
    ("alerts.drift.window_s", 0), ("alerts.consumer_group", "a b")])
def test_drift_settings_are_range_checked(key, value):
    with pytest.raises(SettingsError) as info:
        Settings.load(env={}, overrides={key: value})
    assert info.value.key == key


def test_drift_settings_defaults_and_environment():
    d = Settings.load(env={}).alerts.drift
    assert (d.enabled, d.window_frames, d.min_frames, d.start_share, d.start_median_ratio, d.end_share,
            d.start_median_rise) == (True, 30, 15, 0.3, 0.9, 0.1, 0.15)
    assert not Settings.load(env={"LINEINSPECT__ALERTS__DRIFT__ENABLED": "false"}).alerts.drift.enabled


# ------------------------------------------------------------------------- the service, real Redis


def sample(registry, name, **labels):
    return registry.get_sample_value(name, labels) or 0.0


def service(redis_client, prefix, sinks, registry, drift: bool, clock):
    metrics = AlertMetrics(registry)
    workers = [SinkWorker(s, metrics, queue_size=200, retry_initial_s=0.05) for s in sinks]
    monitors = {"L1": DriftMonitor("L1", DriftSettings(), RATE)} if drift else {}
    svc = AlertService(redis_client, prefix, ["L1"], AlertDebouncer(3, 10.0, 20.0, clock), workers, metrics,
                       consumer="t", drift=monitors, group="alerts-drift" if drift else "alerts")
    svc.setup()
    return svc


def feed(redis_client, prefix, svcs, clock, ratios, start):
    keys = line_keys(prefix, "L1")
    raised: dict[int, list] = {id(s): [] for s in svcs}
    for i, r in enumerate(ratios):
        clock.t += 1.0  # one part a second
        redis_client.xadd(keys.results, {PAYLOAD_FIELD: encode_result(result(start + i, r, ts=time.time()))})
        if i % 10 == 9 or i == len(ratios) - 1:
            for s in svcs:
                while True:
                    got = s.poll(block_ms=50, count=100)
                    raised[id(s)] += got
                    if not got and s.client.xpending(keys.results, s.group)["pending"] == 0:
                        break
    return [raised[id(s)] for s in svcs]


@pytest.fixture
def hook():
    r = Receiver()
    yield r
    r.close()


def test_service_raises_one_drift_event_instead_of_a_storm_of_defect_alerts(redis_client, key_prefix, hook):
    """Two services on the same results (own consumer groups): drift detection on and off."""
    reg_on, reg_off, clock = CollectorRegistry(), CollectorRegistry(), FakeClock(0.0)
    on = service(redis_client, key_prefix, [WebhookSink(hook.url), RedisStreamSink(redis_client, key_prefix)],
                 reg_on, True, clock)
    off = service(redis_client, key_prefix, [], reg_off, False, clock)
    try:
        burst = normal_ratios(60)
        burst[40:44] = [1.8, 2.2, 1.5, 1.9]  # four real defects: a defect alert, as before
        phases = {"normal+burst": burst, "shift": shifted_ratios(200), "restored": normal_ratios(60, seed=3)}
        counts, seq = {}, 0
        for name, ratios in phases.items():
            got_on, got_off = feed(redis_client, key_prefix, [on, off], clock, ratios, seq)
            seq += len(ratios)
            counts[name] = {"on_defect": sum(not isinstance(a, DriftAlert) for a in got_on),
                            "on_drift": [a.title for a in got_on if isinstance(a, DriftAlert)],
                            "off_defect": len(got_off)}
        wait_for(lambda: len(hook.bodies) == sum(c["on_defect"] + len(c["on_drift"]) for c in counts.values()),
                 what="webhook deliveries")
    finally:
        on.close()
        off.close()
    print("drift scenario alert counts (unit, 60 normal+burst / 200 shifted / 60 normal):", json.dumps(counts))
    assert counts["normal+burst"] == {"on_defect": 1, "on_drift": [], "off_defect": 1}
    assert counts["shift"]["on_drift"] == ["line appearance changed"]
    assert counts["shift"]["on_defect"] <= 1  # only what came before the drift was recognised
    assert counts["shift"]["off_defect"] >= 8  # one per debounce + cooldown (22 parts) without drift detection
    assert counts["restored"]["on_drift"] == ["line appearance restored"] and counts["restored"]["on_defect"] == 0
    # what the receivers got: the drift events with the window's figures, through the webhook and the stream
    drift_bodies = [b for b in hook.bodies if b["type"] == "lineinspect.drift"]
    assert [b["title"] for b in drift_bodies] == ["line appearance changed", "line appearance restored"]
    changed, restored = drift_bodies
    assert changed["kind"] == "drift" and changed["event"] == "changed" and changed["line"] == "L1"
    assert changed["reason"] == restored["reason"] == "flagged_share"
    assert changed["window"]["flagged_share"] >= 0.3 and changed["window"]["median_ratio"] >= 0.9
    assert changed["window"]["expected_share"] == RATE and changed["window"]["p_value"] <= 1e-6
    assert restored["window"]["flagged_share"] <= 0.1
    suppressed = restored["drift"]["defects_suppressed"]
    assert suppressed >= 180
    assert sample(reg_on, "lineinspect_alerts_suppressed_total", line="L1", reason="drift") == suppressed
    assert sample(reg_on, "lineinspect_drift_events_total", line="L1", kind="started") == 1
    assert sample(reg_on, "lineinspect_drift_events_total", line="L1", kind="ended") == 1
    assert sample(reg_on, "lineinspect_line_drift_active", line="L1") == 0
    assert sample(reg_on, "lineinspect_line_flagged_share_ratio", line="L1") <= 0.1
    assert sample(reg_on, "lineinspect_line_expected_flagged_share_ratio", line="L1") == RATE
    assert 0.5 < sample(reg_on, "lineinspect_line_score_median_ratio", line="L1") < 0.9
    assert sample(reg_off, "lineinspect_line_drift_active", line="L1") == 0  # no monitor: no drift series
    stream = [json.loads(f[b"alert"]) for _, f in redis_client.xrange(line_keys(key_prefix, "L1").alerts)]
    assert [a["kind"] for a in stream].count("drift") == 2


def test_drift_gauges_while_it_lasts(redis_client, key_prefix):
    reg, clock = CollectorRegistry(), FakeClock(0.0)
    svc = service(redis_client, key_prefix, [RedisStreamSink(redis_client, key_prefix)], reg, True, clock)
    try:
        feed(redis_client, key_prefix, [svc], clock, normal_ratios(30) + shifted_ratios(30), 0)
    finally:
        svc.close()
    assert sample(reg, "lineinspect_line_drift_active", line="L1") == 1
    assert sample(reg, "lineinspect_line_flagged_share_ratio", line="L1") >= 0.9
    assert sample(reg, "lineinspect_line_score_median_ratio", line="L1") > 1.0
    assert sample(reg, "lineinspect_line_drift_window_frames", line="L1") == 30


def test_service_reports_a_median_rise_and_still_alerts_on_a_burst_of_defects(redis_client, key_prefix, hook):
    reg, clock = CollectorRegistry(), FakeClock(0.0)
    svc = service(redis_client, key_prefix, [WebhookSink(hook.url)], reg, True, clock)
    try:
        normal = good_stream("hazelnut", 100)
        normal[40:44] = [1.8, 2.2, 1.5, 1.9]  # four real defects: a defect alert
        raised = [min(r, 0.99) for r in good_stream("hazelnut", 60, seed=1, rise=GAIN_2_6_RISE)]
        phases = {"normal+burst": normal, "gain": raised, "restored": good_stream("hazelnut", 60, seed=2)}
        got, seq = {}, 0
        for name, ratios in phases.items():
            (alerts,) = feed(redis_client, key_prefix, [svc], clock, ratios, seq)
            seq += len(ratios)
            got[name] = [(a.change.value, a.to_dict()["reason"]) if isinstance(a, DriftAlert) else "defect"
                         for a in alerts]
        wait_for(lambda: len(hook.bodies) == sum(map(len, got.values())), what="webhook deliveries")
    finally:
        svc.close()
    print("median-rise scenario (unit, 100 hazelnut-like normal with 4 defects / 60 at +gain 2.6 / 60 normal):",
          json.dumps(got))
    assert got == {"normal+burst": ["defect"], "gain": [("started", "median_rise")],
                   "restored": [("ended", "median_rise")]}
    changed = next(b for b in hook.bodies if b["type"] == "lineinspect.drift")
    assert changed["reason"] == "median_rise" and changed["window"]["flagged"] == 0
    assert changed["window"]["median_ratio"] - changed["window"]["reference_median_ratio"] >= 0.15
    assert sample(reg, "lineinspect_drift_events_total", line="L1", kind="started") == 1
