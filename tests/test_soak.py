"""deploy/soak.py, small: 2 real RTSP cameras -> ingest -> Redis (private single node) -> noop workers for
15 s; every frame accounted for, nothing crashed, the figures printed."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT
from tests.rtspcam import gstreamer_missing

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


def test_soak_small_accounts_for_every_frame(tmp_path):
    why = gstreamer_missing()
    if why:
        pytest.skip(why)
    out = tmp_path / "soak.json"
    proc = subprocess.run([sys.executable, str(ROOT / "deploy" / "soak.py"), "--redis", "single", "--cameras", "2",
                           "--fps", "10", "--seconds", "15", "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=200)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    r = json.loads(out.read_text())
    assert r["uncounted"] == 0 and r["crashes"] == 0 and len(r["lines"]) == 2
    assert all(row["results"] > 50 and row["dup"] == 0 for row in r["lines"]), r["lines"]
    assert r["frames_results"] == r["frames_captured"] - sum(sum(row["dropped"].values()) for row in r["lines"])
    assert 0 < r["latency_p50_ms"] <= r["latency_p99_ms"] and r["redis_bytes_per_s"] > 0
    for words in ("captured", "latency", "ingest CPU per camera", "bytes through Redis"):
        assert words in proc.stdout
