"""The chaos benchmark itself, small: real processes on private Redis servers; its table must account for
every frame (the full run: ``lineinspect bench --chaos``)."""

from __future__ import annotations

import pytest

from stream.chaos import _table, run_chaos


@pytest.mark.timeout(240)
def test_chaos_benchmark_accounts_for_every_frame(tmp_path, capsys):
    rows = run_chaos(["crash_loop", "restart_no_aof", "fuzz"], seconds=4.0, kill_every=2.0, fuzz=1000,
                     workdir=tmp_path)
    table = _table(rows)
    print(table)
    by = {r.scenario: r for r in rows}
    for r in rows:
        assert (r.uncounted, r.dup, r.crashes) == (0, 0, 0), table
    assert by["crash_loop"].frames_in > 0 and by["crash_loop"].results > 0
    assert "workers SIGKILLed" in by["crash_loop"].note
    assert by["restart_no_aof"].recovery_s and max(by["restart_no_aof"].recovery_s) <= 1.0, table
    assert by["restart_no_aof"].dropped.get("lost", 0) > 0, table  # the backlog the restart lost, counted
    assert by["fuzz"].frames_in == 1001 and by["fuzz"].dead > 500, table
