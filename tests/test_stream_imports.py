"""The streaming processes stay light: importing them must not pull in torch, open_clip or segment_anything."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import ROOT


def test_backbone_modules_do_not_import_heavy_packages():
    code = ("import sys\n"
            "import stream.sources, stream.ingest, stream.queue, stream.bench, workers.worker, workers.noop\n"
            "heavy = sorted(m for m in ('torch', 'open_clip', 'segment_anything', 'onnxruntime') if m in sys.modules)\n"
            "print(','.join(heavy))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ""
