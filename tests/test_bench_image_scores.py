"""workers.bench.image_scores reporting from a dump: the table and where the product's threshold sits."""

from __future__ import annotations

import json

import numpy as np

from workers.bench import image_scores

KEYS = ("max@24", "max@64", "p90", "rel@24", "rel@64", "p90-p25")


def _frame(rng, lift: float = 0.0) -> dict:
    x = {k: float(1.0 + 0.05 * rng.standard_normal()) for k in KEYS}
    x["rel@24"] += lift
    return x


def test_report_from_a_dump_counts_the_missed_defects_at_the_product_threshold(tmp_path, capsys):
    rng = np.random.default_rng(3)
    dump = {"toy": {"good_loo": [_frame(rng) for _ in range(30)],
                    "test": [{"defect": False, **_frame(rng)} for _ in range(10)]
                    + [{"defect": True, **_frame(rng, lift=1.0)} for _ in range(8)]
                    + [{"defect": True, **_frame(rng)} for _ in range(2)]}}
    path = tmp_path / "dump.json"
    path.write_text(json.dumps(dump))
    assert image_scores.main(["--from-dump", str(path), "--false-alarm-rate", "0.01"]) == 0
    out = capsys.readouterr().out
    assert "toy: 30 good images calibrate, 20 test images (10 defective)" in out
    detail = [line for line in out.splitlines() if "threshold of 'rel@24+64, spread'" in line]
    assert len(detail) == 1, out
    # the two defects without a lift sit among the good frames, under the threshold; the eight lifted ones over it
    assert "defects missed 2 of 10" in detail[0], detail[0]
    row = [line for line in out.splitlines() if line.strip().startswith("rel@24+64, spread")][0]
    assert row.split()[-2] == "80.0%", row
