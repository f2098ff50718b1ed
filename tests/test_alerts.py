"""Alert service: debounce/cooldown logic, snapshots, and delivery to a real HTTP receiver, the real Redis and
the real Mosquitto broker on 127.0.0.1:1883 (with retries, backoff and counting when a sink fails)."""

from __future__ import annotations

import base64
import json
import socket
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import cv2
import numpy as np
import pytest
from conftest import free_port
from prometheus_client import CollectorRegistry

from stream.alerts.debounce import AlertDebouncer, Decision
from stream.alerts.delivery import SinkWorker
from stream.alerts.frames import FrameTail
from stream.alerts.mqtt import MqttSink, parse_mqtt_url
from stream.alerts.service import ALERT_GROUP, AlertService
from stream.alerts.sinks import RedisStreamSink, WebhookSink
from stream.contracts import Defect, Encoding, InspectionResult, Verdict
from stream.entries import PAYLOAD_FIELD
from stream.keys import line_keys
from stream.prometheus_metrics import AlertMetrics
from stream.wire import encode_frame, encode_label_mask, encode_result, image_to_frame

H, W = 60, 80
BOX = (20, 10, 40, 30)  # x0, y0, x1, y1


class FakeClock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def make_result(line: str, seq: int, defect: bool = True, capture_ts: float | None = None) -> InspectionResult:
    labels = np.zeros((H, W), np.uint8)
    defects: tuple[Defect, ...] = ()
    if defect:
        x0, y0, x1, y1 = BOX
        labels[y0:y1, x0:x1] = 1
        defects = (Defect(label=1, box=BOX, area=(x1 - x0) * (y1 - y0), score=2.5),)
    now = time.time()
    return InspectionResult(
        frame_id=f"cam1:s1:{seq}", line_id=line, camera_id="cam1", seq=seq,
        capture_ts=now if capture_ts is None else capture_ts, image_score=2.0 + seq / 100 if defect else 0.3,
        threshold=1.0, verdict=Verdict.DEFECT if defect else Verdict.OK, defects=defects,
        mask_png=encode_label_mask(labels) if defect else b"", processed_ts=now)


def publish(client, prefix: str, result: InspectionResult) -> None:
    client.xadd(line_keys(prefix, result.line_id).results, {PAYLOAD_FIELD: encode_result(result)})


class Receiver:
    """A local HTTP server answering POSTs with the next status of ``codes`` (the last one repeats);
    while ``hold`` is clear, requests wait (a hanging webhook)."""

    def __init__(self, codes=(200,)):
        self.codes = list(codes)
        self.bodies: list[dict] = []
        self.attempts = 0
        self.arrived = 0
        self.hold = threading.Event()
        self.hold.set()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.arrived += 1
                receiver.hold.wait(30)
                code = receiver.codes[min(receiver.attempts, len(receiver.codes) - 1)]
                receiver.attempts += 1
                if code == 200:
                    receiver.bodies.append(json.loads(body))
                self.send_response(code)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *a):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def close(self):
        self.hold.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver():
    made: list[Receiver] = []

    def make(codes=(200,)):
        made.append(Receiver(codes))
        return made[-1]

    yield make
    for r in made:
        r.close()


def wait_for(pred, timeout=10.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def sample(registry, name, **labels):
    return registry.get_sample_value(name, labels) or 0.0


def make_service(redis_client, prefix, sinks, registry, clock, lines=("L1",), count=3, window=10.0,
                 cooldown=60.0):
    metrics = AlertMetrics(registry)
    workers = [SinkWorker(s, metrics, queue_size=10, retry_initial_s=0.05, retry_max_s=0.2, max_retries=2)
               for s in sinks]
    svc = AlertService(redis_client, prefix, list(lines), AlertDebouncer(count, window, cooldown, clock), workers,
                       metrics, consumer="test")
    svc.setup()
    return svc


# ------------------------------------------------------------------------------------- pure logic


def test_debouncer_needs_count_within_window_then_cools_down():
    clock = FakeClock(0.0)
    d = AlertDebouncer(3, 10.0, 60.0, clock)
    got = []
    for t in (0, 1, 2, 3, 30, 61.9):
        clock.t = t
        got.append(d.observe("a", True))
    assert got == [Decision.DEBOUNCE, Decision.DEBOUNCE, Decision.RAISE, Decision.COOLDOWN, Decision.COOLDOWN,
                   Decision.COOLDOWN]
    assert d.cooldown_left("a") == pytest.approx(0.1)
    # after the cooldown the count starts from zero: defects during the cooldown did not count
    got = []
    for t in (62.5, 63, 64):
        clock.t = t
        got.append(d.observe("a", True))
    assert got == [Decision.DEBOUNCE, Decision.DEBOUNCE, Decision.RAISE]


def test_debouncer_window_expires_and_good_frames_do_not_reset():
    clock = FakeClock(0.0)
    d = AlertDebouncer(3, 10.0, 60.0, clock)
    for t in (0, 6, 12, 18, 24):  # never three within 10 s
        clock.t = t
        assert d.observe("a", True) is Decision.DEBOUNCE
    assert d.pending("a") == 2  # 18 and 24
    clock.t = 25
    assert d.observe("a", False) is Decision.OK  # a good frame between defects
    clock.t = 26
    assert d.observe("a", True) is Decision.RAISE


def test_debouncer_cooldown_is_per_line():
    clock = FakeClock(0.0)
    d = AlertDebouncer(1, 5.0, 100.0, clock)
    assert d.observe("a", True) is Decision.RAISE
    assert d.observe("a", True) is Decision.COOLDOWN
    assert d.observe("b", True) is Decision.RAISE


def test_parse_mqtt_url():
    t = parse_mqtt_url("mqtt://u:p%40ss@broker.local:1884/plant/{line}/alerts")
    assert (t.host, t.port, t.topic, t.username, t.password, t.tls) == (
        "broker.local", 1884, "plant/{line}/alerts", "u", "p@ss", False)
    assert parse_mqtt_url("mqtts://b").port == 8883
    assert parse_mqtt_url("mqtt://b").topic == "lineinspect/alerts/{line}"
    with pytest.raises(ValueError):
        parse_mqtt_url("http://b/x")


# ------------------------------------------------------------------------- service, real sinks


def test_webhook_gets_debounced_alerts_with_decodable_snapshot(redis_client, key_prefix, receiver):
    rec = receiver()
    reg = CollectorRegistry()
    clock = FakeClock()
    svc = make_service(redis_client, key_prefix, [WebhookSink(rec.url), RedisStreamSink(redis_client, key_prefix)],
                       reg, clock)
    try:
        publish(redis_client, key_prefix, make_result("L1", 0, defect=False))
        for seq in (1, 2, 3, 4, 5):  # 1, 2: debounce; 3: alert; 4, 5: cooldown
            clock.t += 1
            publish(redis_client, key_prefix, make_result("L1", seq))
        raised = svc.poll(block_ms=100)
        assert [a.frame_id for a in raised] == ["cam1:s1:3"]
        wait_for(lambda: len(rec.bodies) == 1, what="webhook delivery")
        clock.t += 61  # cooldown over: three more defects raise the next alert
        for seq in (6, 7, 8):
            clock.t += 1
            publish(redis_client, key_prefix, make_result("L1", seq))
        raised = svc.poll(block_ms=100)
        assert [a.frame_id for a in raised] == ["cam1:s1:8"]
        wait_for(lambda: len(rec.bodies) == 2, what="second webhook delivery")
        time.sleep(0.2)
        assert len(rec.bodies) == 2  # exactly two alerts, nothing else posted
    finally:
        svc.close()

    body = rec.bodies[0]
    assert body["line"] == "L1" and body["frame_id"] == "cam1:s1:3" and body["camera"] == "cam1"
    assert body["score"] == pytest.approx(2.03)
    assert body["defects"] == [{"label": 1, "box": list(BOX), "area": 400, "score": 2.5}]
    assert body["time"].startswith(time.strftime("%Y-", time.gmtime()))
    # the frame was never in the frames stream: the snapshot is the mask alone, as PNG
    assert body["snapshot"]["source"] == "mask" and body["snapshot"]["mime"] == "image/png"
    img = cv2.imdecode(np.frombuffer(base64.b64decode(body["snapshot"]["base64"]), np.uint8), cv2.IMREAD_COLOR)
    assert img is not None and img.shape == (H, W, 3)
    x0, y0, x1, y1 = BOX
    assert tuple(img[(y0 + y1) // 2, (x0 + x1) // 2]) == (0, 0, 255)  # inside the defect: red
    assert tuple(img[5, 5]) == (0, 0, 0)  # outside: black
    assert sample(reg, "lineinspect_alerts_raised_total", line="L1") == 2
    assert sample(reg, "lineinspect_alerts_suppressed_total", line="L1", reason="debounce") == 4
    assert sample(reg, "lineinspect_alerts_suppressed_total", line="L1", reason="cooldown") == 2
    assert sample(reg, "lineinspect_alert_results_read_total", line="L1") == 9
    assert sample(reg, "lineinspect_alert_deliveries_total", sink="webhook", outcome="delivered") == 2
    # the Redis stream sink wrote the same two alerts
    entries = redis_client.xrange(line_keys(key_prefix, "L1").alerts)
    assert [json.loads(f[b"alert"])["frame_id"] for _, f in entries] == ["cam1:s1:3", "cam1:s1:8"]
    assert entries[0][1][b"mime"] == b"image/png" and len(entries[0][1][b"snapshot"]) > 50
    # every result was acknowledged in the alerts group
    assert redis_client.xpending(line_keys(key_prefix, "L1").results, ALERT_GROUP)["pending"] == 0


def test_snapshot_is_drawn_on_the_frame_when_it_is_still_in_the_stream(redis_client, key_prefix, receiver):
    rec = receiver()
    reg = CollectorRegistry()
    svc = make_service(redis_client, key_prefix, [WebhookSink(rec.url)], reg, FakeClock(), count=1)
    image = np.full((H, W, 3), (0, 200, 0), np.uint8)  # a green frame
    result = make_result("L1", 42)
    frame = image_to_frame(image, line_id="L1", camera_id="cam1", seq=42, session="s1",
                           capture_ts=result.capture_ts)
    assert frame.frame_id == result.frame_id
    keys = line_keys(key_prefix, "L1")
    other = image_to_frame(image, line_id="L1", camera_id="cam1", seq=41, session="s1",
                           capture_ts=result.capture_ts)
    redis_client.xadd(keys.frames, {PAYLOAD_FIELD: encode_frame(other)})
    redis_client.xadd(keys.frames, {PAYLOAD_FIELD: encode_frame(frame)})
    try:
        publish(redis_client, key_prefix, result)
        assert len(svc.poll(block_ms=100)) == 1
        wait_for(lambda: len(rec.bodies) == 1, what="webhook delivery")
    finally:
        svc.close()
    snap = rec.bodies[0]["snapshot"]
    assert snap["source"] == "frame" and snap["mime"] == "image/jpeg"
    img = cv2.imdecode(np.frombuffer(base64.b64decode(snap["base64"]), np.uint8), cv2.IMREAD_COLOR)
    assert img.shape == (H, W, 3)
    b, g, r = (int(v) for v in img[20, 30])  # inside the defect: green frame tinted red
    assert r > 80 and g < 160
    b, g, r = (int(v) for v in img[50, 5])  # outside: the frame itself
    assert g > 180 and r < 40


def test_snapshot_uses_the_frame_tail_after_the_worker_deleted_the_frame(redis_client, key_prefix, receiver):
    """The worker XDELs a frame once its result is published; the service's FrameTail has kept a copy."""
    rec = receiver()
    reg = CollectorRegistry()
    metrics = AlertMetrics(reg)
    tail = FrameTail(redis_client, key_prefix, ["L1"], max_bytes=1 << 20, block_ms=100)
    svc = AlertService(redis_client, key_prefix, ["L1"], AlertDebouncer(1, 10.0, 0.0, FakeClock()),
                       [SinkWorker(WebhookSink(rec.url), metrics)], metrics, consumer="t", frame_tail=tail)
    svc.setup()
    keys = line_keys(key_prefix, "L1")
    image = np.full((H, W, 3), (0, 200, 0), np.uint8)
    result = make_result("L1", 5)
    try:
        frame = image_to_frame(image, line_id="L1", camera_id="cam1", seq=5, session="s1",
                               capture_ts=result.capture_ts)
        eid = redis_client.xadd(keys.frames, {PAYLOAD_FIELD: encode_frame(frame)})
        wait_for(lambda: tail.get(frame.frame_id) is not None, what="frame tail to read the frame")
        redis_client.xdel(keys.frames, eid)  # what the worker does on completion
        publish(redis_client, key_prefix, result)
        assert len(svc.poll(block_ms=100)) == 1
        wait_for(lambda: len(rec.bodies) == 1, what="webhook delivery")
    finally:
        svc.close()
    assert rec.bodies[0]["snapshot"]["source"] == "frame"


def test_frame_tail_keeps_to_its_byte_budget(redis_client, key_prefix):
    keys = line_keys(key_prefix, "L1")
    rng = np.random.default_rng(0)
    tail = FrameTail(redis_client, key_prefix, ["L1"], max_bytes=3 * H * W * 3, block_ms=100)
    tail.start()
    try:
        frames = [image_to_frame(rng.integers(0, 255, (H, W, 3), dtype=np.uint8), line_id="L1", camera_id="c",
                                 seq=i, session="s", capture_ts=time.time(), encoding=Encoding.RAW)
                  for i in range(6)]
        for f in frames:
            redis_client.xadd(keys.frames, {PAYLOAD_FIELD: encode_frame(f)})
        wait_for(lambda: tail.seen == 6, what="frame tail to read six frames")
    finally:
        tail.stop()
    assert [tail.get(f.frame_id) is not None for f in frames] == [False, False, False, True, True, True]
    assert tail.get(frames[5].frame_id) == frames[5]


def test_failing_webhook_is_retried_and_counted_while_redis_sink_delivers(redis_client, key_prefix, receiver):
    flaky = receiver(codes=(500, 500, 200))  # two failures, then accepted
    reg = CollectorRegistry()
    refused_url = f"http://127.0.0.1:{free_port()}/hook"  # nothing listens there
    clock = FakeClock()
    metrics_sinks = [WebhookSink(flaky.url), RedisStreamSink(redis_client, key_prefix)]
    svc = make_service(redis_client, key_prefix, metrics_sinks, reg, clock, count=1, cooldown=0.0)
    refusing = SinkWorker(WebhookSink(refused_url, timeout_s=1.0, name="webhook_refused"), svc.metrics,
                          retry_initial_s=0.05, retry_max_s=0.1, max_retries=2)
    svc.sinks.append(refusing)
    refusing.start()
    try:
        publish(redis_client, key_prefix, make_result("L1", 1))
        assert len(svc.poll(block_ms=100)) == 1
        wait_for(lambda: len(flaky.bodies) == 1, what="delivery after retries")
        wait_for(lambda: sample(reg, "lineinspect_alert_deliveries_total", sink="webhook_refused",
                                outcome="failed") == 1, what="refused webhook to give up")
    finally:
        svc.close()
    assert flaky.attempts == 3
    assert sample(reg, "lineinspect_alert_retries_total", sink="webhook") == 2
    assert sample(reg, "lineinspect_alert_deliveries_total", sink="webhook", outcome="delivered") == 1
    assert sample(reg, "lineinspect_alert_retries_total", sink="webhook_refused") == 2  # max_retries
    assert sample(reg, "lineinspect_alert_deliveries_total", sink="webhook_refused", outcome="delivered") == 0
    assert sample(reg, "lineinspect_alert_deliveries_total", sink="redis", outcome="delivered") == 1
    assert redis_client.xlen(line_keys(key_prefix, "L1").alerts) == 1


def test_hanging_webhook_blocks_neither_reading_nor_other_sinks(redis_client, key_prefix, receiver):
    slow = receiver()
    slow.hold.clear()  # the webhook accepts the connection but does not answer
    reg = CollectorRegistry()
    svc = make_service(redis_client, key_prefix, [WebhookSink(slow.url, timeout_s=20),
                                                  RedisStreamSink(redis_client, key_prefix)],
                       reg, FakeClock(), count=1, cooldown=0.0)
    try:
        t0 = time.monotonic()
        for seq in (1, 2, 3):
            publish(redis_client, key_prefix, make_result("L1", seq))
        assert len(svc.poll(block_ms=100)) == 3
        assert time.monotonic() - t0 < 5  # reading and debouncing did not wait for the webhook
        wait_for(lambda: redis_client.xlen(line_keys(key_prefix, "L1").alerts) == 3, what="redis sink")
        assert slow.bodies == []  # the webhook is still stuck on the first alert
        slow.hold.set()
        wait_for(lambda: len(slow.bodies) == 3, what="webhook after release")
    finally:
        svc.close()
    assert [b["frame_id"] for b in slow.bodies] == ["cam1:s1:1", "cam1:s1:2", "cam1:s1:3"]


def test_full_queue_drops_and_client_errors_are_not_retried(receiver):
    hang = receiver()
    hang.hold.clear()
    reg = CollectorRegistry()
    metrics = AlertMetrics(reg)
    w = SinkWorker(WebhookSink(hang.url, timeout_s=20), metrics, queue_size=1, retry_initial_s=0.05)
    w.start()
    svc_alert = _alert(1)
    assert w.submit(svc_alert)
    wait_for(lambda: hang.arrived == 1, what="first alert in flight")
    assert w.submit(_alert(2))  # waits in the queue
    assert not w.submit(_alert(3))  # queue full: dropped, counted
    assert sample(reg, "lineinspect_alert_deliveries_total", sink="webhook", outcome="dropped") == 1
    hang.hold.set()
    wait_for(lambda: sample(reg, "lineinspect_alert_deliveries_total", sink="webhook", outcome="delivered") == 2,
             what="queued deliveries")
    w.stop()

    bad = receiver(codes=(400,))
    reg2 = CollectorRegistry()
    w2 = SinkWorker(WebhookSink(bad.url), AlertMetrics(reg2), retry_initial_s=0.05, max_retries=3)
    w2.start()
    w2.submit(_alert(4))
    wait_for(lambda: sample(reg2, "lineinspect_alert_deliveries_total", sink="webhook", outcome="rejected") == 1,
             what="rejection")
    w2.stop()
    assert bad.attempts == 1 and sample(reg2, "lineinspect_alert_retries_total", sink="webhook") == 0


def _alert(seq: int):
    from stream.alerts.alert import Alert

    r = make_result("L1", seq)
    return Alert(alert_id=f"L1:{r.frame_id}", line="L1", frame_id=r.frame_id, camera="cam1", score=r.image_score,
                 threshold=1.0, defects=r.defects, capture_ts=r.capture_ts, raised_ts=time.time(),
                 defect_frames=1)


def test_consumer_group_resumes_and_stale_results_do_not_page(redis_client, key_prefix):
    reg = CollectorRegistry()
    clock = FakeClock()
    svc = make_service(redis_client, key_prefix, [RedisStreamSink(redis_client, key_prefix)], reg, clock,
                       count=1, cooldown=0.0)
    publish(redis_client, key_prefix, make_result("L1", 1))
    assert len(svc.poll(block_ms=100)) == 1
    svc.close()
    # a result published while no alert service runs is picked up by the next one (same group) ...
    publish(redis_client, key_prefix, make_result("L1", 2))
    old = make_result("L1", 3)
    old = InspectionResult(**{**old.__dict__, "processed_ts": time.time() - 3600})  # ... unless it is stale
    publish(redis_client, key_prefix, old)
    reg2 = CollectorRegistry()
    svc2 = make_service(redis_client, key_prefix, [RedisStreamSink(redis_client, key_prefix)], reg2, clock,
                        count=1, cooldown=0.0)
    try:
        assert [a.frame_id for a in svc2.poll(block_ms=100)] == ["cam1:s1:2"]
        assert sample(reg2, "lineinspect_alerts_suppressed_total", line="L1", reason="stale") == 1
        ok, reason = svc2.health()
        assert ok, reason
    finally:
        svc2.close()


# ------------------------------------------------------------------------------------------ MQTT


def _mosquitto_up() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 1883), timeout=1):
            return True
    except OSError:
        return False


def test_mqtt_sink_delivers_to_real_broker():
    if not _mosquitto_up():
        pytest.fail("Mosquitto does not answer on 127.0.0.1:1883")
    import paho.mqtt.client as mqtt

    topic_root = f"litest/{uuid.uuid4().hex[:8]}"
    got: list[tuple[str, bytes]] = []
    subscribed = threading.Event()
    sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"sub-{uuid.uuid4().hex[:6]}")
    sub.on_message = lambda c, u, m: got.append((m.topic, m.payload))
    sub.on_subscribe = lambda *a: subscribed.set()
    sub.on_connect = lambda c, u, f, rc, p: c.subscribe(f"{topic_root}/#", qos=1)
    sub.connect("127.0.0.1", 1883)
    sub.loop_start()
    reg = CollectorRegistry()
    w = SinkWorker(MqttSink(f"mqtt://127.0.0.1:1883/{topic_root}/{{line}}"), AlertMetrics(reg),
                   retry_initial_s=0.05)
    try:
        assert subscribed.wait(10), "subscription not acknowledged"
        w.start()
        r = make_result("L1", 7)
        from stream.alerts.alert import Alert
        from stream.alerts.snapshot import render_snapshot

        snap, mime, source = render_snapshot(r, None)
        w.submit(Alert(alert_id="L1:x", line="L1", frame_id=r.frame_id, camera="cam1", score=r.image_score,
                       threshold=1.0, defects=r.defects, capture_ts=r.capture_ts, raised_ts=time.time(),
                       defect_frames=3, snapshot=snap, snapshot_mime=mime, snapshot_source=source))
        wait_for(lambda: len(got) == 1, what="MQTT message")
    finally:
        w.stop()
        sub.loop_stop()
        sub.disconnect()
    topic, payload = got[0]
    assert topic == f"{topic_root}/L1"
    body = json.loads(payload)
    assert body["frame_id"] == "cam1:s1:7" and body["defects"][0]["box"] == list(BOX)
    img = cv2.imdecode(np.frombuffer(base64.b64decode(body["snapshot"]["base64"]), np.uint8), cv2.IMREAD_COLOR)
    assert img.shape == (H, W, 3)
    assert sample(reg, "lineinspect_alert_deliveries_total", sink="mqtt", outcome="delivered") == 1


def test_mqtt_sink_unreachable_broker_is_retried_then_failed():
    reg = CollectorRegistry()
    w = SinkWorker(MqttSink(f"mqtt://127.0.0.1:{free_port()}/x", timeout_s=1.0), AlertMetrics(reg),
                   retry_initial_s=0.05, retry_max_s=0.1, max_retries=2)
    w.start()
    w.submit(_alert(1))
    wait_for(lambda: sample(reg, "lineinspect_alert_deliveries_total", sink="mqtt", outcome="failed") == 1,
             what="MQTT failure")
    w.stop()
    assert sample(reg, "lineinspect_alert_retries_total", sink="mqtt") == 2


def test_alerts_module_stays_light():
    """The alert process imports neither the models nor paho (MQTT is imported when a sink needs it)."""
    import subprocess
    import sys

    from conftest import ROOT

    code = ("import sys, stream.alerts.run\n"
            "print(','.join(m for m in ('torch', 'open_clip', 'segment_anything', 'onnxruntime', 'paho') "
            "if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ""
