"""The workers' benchmarks: each prints figures (as ratios to a limit measured in the same run) and asserts
nothing. Run as ``python -m workers.bench.<name>``; ``lineinspect bench`` (stream.bench) measures the
streaming pipeline and calls :func:`workers.bench.clip_maps.bench_prompt_modes` for ``--prompt-modes``.
"""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
DEMO = REPO_ROOT / "stream" / "demo_data" / "hazelnut_toy"  # the bundled images: default frames of the benchmarks
