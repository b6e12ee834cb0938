"""The across-task verdict: per-task paired differences, the pooled mean over tasks, wins/ties/losses, ranks."""

from __future__ import annotations

import pandas as pd
import pytest

from experiments import suite_report as sr


def _runs() -> pd.DataFrame:
    rows = []
    # task a: doran beats lora by 2 points on every seed (a win); task b: doran loses 1 point (a loss);
    # task c: +1, -1, +1 (a tie)
    deltas = {"a": [0.02, 0.02, 0.02], "b": [-0.01, -0.011, -0.009], "c": [0.01, -0.01, 0.01]}
    for task, ds in deltas.items():
        for seed, d in enumerate(ds):
            base = 0.7 + 0.01 * seed
            rows.append({"task": task, "fraction": 1.0, "variant": "lora", "seed": seed, "status": "completed",
                         "test_acc": base})
            rows.append({"task": task, "fraction": 1.0, "variant": "doran", "seed": seed, "status": "completed",
                         "test_acc": base + d})
    return pd.DataFrame(rows)


def test_per_task_differences_and_outcomes():
    table = sr.per_task(_runs(), "lora").set_index("task")
    assert table.loc["a", "diff_mean"] == pytest.approx(2.0) and table.loc["a", "outcome"] == "win"
    assert table.loc["b", "diff_mean"] == pytest.approx(-1.0) and table.loc["b", "outcome"] == "loss"
    assert table.loc["c", "diff_mean"] == pytest.approx(1 / 3) and table.loc["c", "outcome"] == "tie"
    assert (table["n_seeds"] == 3).all()


def test_pooled_is_the_mean_over_tasks_with_an_interval_over_tasks():
    pooled = sr.pooled(sr.per_task(_runs(), "lora")).iloc[0]
    assert pooled["diff_mean"] == pytest.approx((2.0 - 1.0 + 1 / 3) / 3)
    assert pooled["ci_low"] < pooled["diff_mean"] < pooled["ci_high"]
    assert (pooled["wins"], pooled["ties"], pooled["losses"], pooled["n_tasks"]) == (1, 1, 1, 3)


def test_mean_rank_over_tasks():
    ranks = sr.mean_ranks(_runs()).set_index("variant")["mean_rank"]
    assert ranks["doran"] == pytest.approx((1 + 2 + 1) / 3) and ranks["lora"] == pytest.approx((2 + 1 + 2) / 3)


def test_no_task_folder_is_a_clear_error(tmp_path, capsys):
    assert sr.main(["--profile", "suite", "--results", str(tmp_path)]) == 2
    assert "no task has a sample_efficiency folder" in capsys.readouterr().err


def test_several_baselines_share_one_table_and_get_a_forest_plot_each(tmp_path):
    runs = _runs()
    runs = pd.concat([runs, runs[runs["variant"] == "lora"].assign(variant="dora", test_acc=lambda d: d["test_acc"] + 0.01)])
    parts = [pd.concat([t, sr.pooled(t)]).assign(baseline=b) for b in ("lora", "dora") for t in [sr.per_task(runs, b)]]
    table = pd.concat(parts, ignore_index=True)
    doran_vs_dora = table[(table["baseline"] == "dora") & (table["variant"] == "doran")].set_index("task")
    assert doran_vs_dora.loc["a", "diff_mean"] == pytest.approx(1.0)  # 2 points over lora, lora + 1 = dora
    first = sr.forest(table, "p", "sample_efficiency", "lora", tmp_path)
    second = sr.forest(table, "p", "sample_efficiency", "dora", tmp_path, suffix="dora")
    assert [p.name for p in first] == ["sample_efficiency_forest.png", "sample_efficiency_forest.pdf"]
    assert [p.name for p in second] == ["sample_efficiency_forest_vs_dora.png", "sample_efficiency_forest_vs_dora.pdf"]
    assert first[0].read_bytes() != second[0].read_bytes()
