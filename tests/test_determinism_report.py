"""experiments.determinism_report: repeats of one run grouped by run id and mode, copies counted once."""

from __future__ import annotations

from experiments import determinism_report as dr
from doran.results import atomic_write_json


def _result(folder, run_id, acc, *, deterministic=False, finished="2026-12-06T19:00:00", wall=40.0):
    atomic_write_json(folder / f"{run_id}.json.gz", {
        "run_id": run_id, "finished_at": finished, "wall_time_s": wall,
        "config": {"runtime": {"deterministic": deterministic}},
        "metrics": {"test/acc": acc, "val/acc": 0.8, "train/loss": 0.3},
    })


def test_spread_within_each_mode_and_copies_counted_once(tmp_path, capsys):
    a, b, c = (tmp_path / n for n in "abc")
    for f in (a, b, c):
        f.mkdir()
    _result(a, "dora-s0-f1-x", 0.80, wall=40.1)
    _result(b, "dora-s0-f1-x", 0.81, wall=40.2)
    _result(c, "dora-s0-f1-x", 0.80, wall=40.1)          # a copy of a's file: the same run, once
    _result(a, "dora-s0-f1-x", 0.80, wall=40.1)
    _result(b, "lora-s0-f1-y", 0.79)                      # in one folder only: left out
    _result(a, "doran-s0-f1-z", 0.82, deterministic=True)
    _result(b, "doran-s0-f1-z", 0.82, deterministic=True, wall=41.0)
    _result(c, "doran-s0-f1-z", 0.83, deterministic=False, wall=39.0)
    groups = dr.repeated(dr.collect([a, b, c]))
    assert sorted(groups) == [("dora-s0-f1-x", False), ("doran-s0-f1-z", False), ("doran-s0-f1-z", True)]
    assert len(groups[("dora-s0-f1-x", False)]) == 2
    assert abs(dr.spread(groups[("dora-s0-f1-x", False)], "test/acc") - 0.01) < 1e-12
    assert dr.spread(groups[("doran-s0-f1-z", True)], "test/acc") == 0.0

    assert dr.main([str(a), str(b), str(c)]) == 0
    table = capsys.readouterr().out
    assert "| `dora-s0-f1-x` | False | 2 | 0.8000, 0.8100 | 0.01 / 0 / 0 |" in table
    assert "lora-s0-f1-y" not in table


def test_bad_folders_exit_2(tmp_path, capsys):
    assert dr.main([str(tmp_path / "missing")]) == 2
    assert "no such folder" in capsys.readouterr().err
    (tmp_path / "one").mkdir()
    _result(tmp_path / "one", "lora-s0-f1-y", 0.79)
    assert dr.main([str(tmp_path / "one")]) == 2
    assert "more than one" in capsys.readouterr().err
