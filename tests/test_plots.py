"""The figures: one line per variant in the sample-efficiency figure; accuracy intervals within 0-100%."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import pandas as pd
import pytest

from experiments import plots


def test_two_variants_of_one_method_are_two_lines(tmp_path, monkeypatch):
    rows = [
        {"variant": v, "method": m, "fraction": f, "seed": s, "status": "completed", "test_acc": acc + 0.01 * s,
         "majority_acc": 0.1, "device": "cpu"}
        for v, m, acc in (("lora", "lora", 0.9), ("doran", "doran", 0.8), ("doran, static factors", "doran", 0.2))
        for f in (0.1, 1.0)
        for s in range(3)
    ]
    csv = tmp_path / "runs.csv"
    pd.DataFrame(rows).to_csv(csv, index=False)
    drawn = {}
    real_save = plots.save

    def keep(fig, out, name):
        ax = fig.axes[0]
        drawn.update({c.get_label(): c for c in ax.containers})  # errorbar containers, by label
        return real_save(fig, out, name)

    monkeypatch.setattr(plots, "save", keep)
    plots.fig_sample_efficiency(csv, tmp_path)
    labels = {plots.label(v) for v in ("lora", "doran", "doran, static factors")}
    assert labels <= set(drawn)
    ys = {k: list(c.lines[0].get_ydata()) for k, c in drawn.items() if k in labels}
    assert ys[plots.label("doran")] == pytest.approx([81.0, 81.0])  # DoRAN's own runs, not mixed with the other
    assert ys[plots.label("doran, static factors")] == pytest.approx([21.0, 21.0])
    assert drawn[plots.label("doran, static factors")].lines[0].get_linestyle() == "--"
    plt.close("all")


def test_accuracy_intervals_stop_at_0_and_100():
    collapsed = [98.0, 12.0, 97.0]  # one seed of three at chance: the t-interval reaches past 100 and below 0
    mean, below, above = plots._mean_ci(collapsed)
    assert mean + above > 100 and mean - below < 0
    mean_c, below_c, above_c = plots._mean_ci(collapsed, plots.ACC_BOUNDS)
    assert mean_c == pytest.approx(mean)
    assert mean_c + above_c == pytest.approx(100.0)
    assert mean_c - below_c == pytest.approx(0.0)
    tight = [80.0, 81.0, 82.0]  # an interval inside the bounds is left as it is
    assert plots._mean_ci(tight, plots.ACC_BOUNDS) == pytest.approx(plots._mean_ci(tight))


def test_a_sweep_with_no_finished_run_is_skipped_not_a_crash(tmp_path, capsys):
    # a sweep stopped by its time limit before any run finished: collect writes runs.csv without result columns
    unit = tmp_path / "suite" / "trec6"
    (unit / "params_matched").mkdir(parents=True)
    (unit / "sample_efficiency").mkdir(parents=True)
    pd.DataFrame([{"sweep": "params_matched", "variant": "lora", "method": "lora", "seed": 0, "fraction": 0.1,
                   "run_id": "lora-s0", "status": "missing", "error": None}]).to_csv(
        unit / "params_matched" / "runs.csv", index=False)
    pd.DataFrame([{"variant": v, "method": v, "fraction": f, "seed": s, "status": "completed",
                   "test_acc": 0.8 + 0.01 * s, "majority_acc": 0.5, "device": "cpu"}
                  for v in ("lora", "doran") for f in (0.01, 1.0) for s in range(2)]).to_csv(
        unit / "sample_efficiency" / "runs.csv", index=False)
    written = plots.make_figures("suite/trec6", tmp_path, tmp_path / "figs")
    assert "params_matched" not in written and written["sample_efficiency_accuracy"]
    assert "no finished run yet" in capsys.readouterr().err
    plt.close("all")
