"""The streaming processes stay light: importing them must not pull in torch, open_clip or segment_anything."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import ROOT

HEAVY = ("torch", "open_clip", "segment_anything", "onnxruntime")


def _heavy_after(imports: str) -> tuple[str, str]:
    code = (f"import sys\n{imports}\n"
            f"print('heavy:' + ','.join(sorted(m for m in {HEAVY!r} if m in sys.modules)))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().splitlines()[-1].removeprefix("heavy:"), out.stdout


def test_every_stream_module_imports_without_torch():
    """Each module of stream/ (packages included) imported in one fresh interpreter: none of them may pull in
    torch or the other model packages (stream/ never imports torch)."""
    imports = ("import importlib, pkgutil, stream\n"
               "names = [m.name for m in pkgutil.walk_packages(stream.__path__, 'stream.')]\n"
               "for name in names:\n"
               "    importlib.import_module(name)\n"
               "print(len(names))")
    heavy, stdout = _heavy_after(imports)
    assert int(stdout.split()[0]) >= 40, stdout  # the walk found the modules (not an empty package)
    assert heavy == ""


def test_backbone_modules_do_not_import_heavy_packages():
    heavy, _ = _heavy_after("import stream.sources, stream.ingest, stream.queue, stream.bench, workers.worker, "
                            "workers.noop")
    assert heavy == ""
