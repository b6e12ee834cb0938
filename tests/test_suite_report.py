"""The across-task verdict: per-task paired differences, the pooled mean over tasks with its two intervals, the
resolution target and the seeds that would meet it, wins/ties/losses, ranks."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

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


def test_a_report_against_one_more_baseline_keeps_the_others_rows(tmp_path):
    runs = _runs()
    runs = pd.concat([runs, runs[runs["variant"] == "lora"].assign(variant="dora", test_acc=lambda d: d["test_acc"] + 0.01)])
    first = pd.concat([sr.per_task(runs, "lora"), sr.pooled(sr.per_task(runs, "lora"))]).assign(baseline="lora")
    path = tmp_path / "sample_efficiency_across_tasks.csv"
    first.to_csv(path, index=False)
    second = pd.concat([sr.per_task(runs, "dora"), sr.pooled(sr.per_task(runs, "dora"))]).assign(baseline="dora")
    merged = sr.keep_other_baselines(path, second, ["dora"])
    assert list(dict.fromkeys(merged["baseline"])) == ["lora", "dora"] and len(merged) == len(first) + len(second)
    again = sr.keep_other_baselines(path, first.assign(diff_mean=0.0), ["lora"])  # the same baseline is replaced
    assert len(again) == len(first) and (again["diff_mean"] == 0.0).all()
    assert sr.keep_other_baselines(tmp_path / "none.csv", second, ["dora"]) is second


def test_the_markdown_table_quotes_the_csv_numbers():
    runs = _runs()
    table = sr.per_task(runs, "lora")
    table = pd.concat([table, sr.pooled(table)], ignore_index=True).assign(baseline="lora")
    text = sr.markdown(table, "p", "sample_efficiency", sr.mean_ranks(runs))
    [row] = [line for line in text.splitlines() if line.startswith("| doran - lora |")]
    cells = [c.strip() for c in row.strip("|").split("|")]
    a = table[(table["task"] == "a")].iloc[0]
    pool = table[table["task"] == sr.POOLED].iloc[0]
    assert cells[1] == f"{a['diff_mean']:+.1f} [{a['ci_low']:+.1f}, {a['ci_high']:+.1f}]" == "+2.0 [+2.0, +2.0]"
    assert cells[4] == f"{pool['diff_mean']:+.1f} [{pool['ci_low']:+.1f}, {pool['ci_high']:+.1f}]"
    assert cells[5].startswith(f"{pool['diff_mean']:+.1f} [") and cells[6] == "1 / 1 / 1"
    assert cells[7].startswith("+-0.5: ")  # 100% of the data: the +-0.5 target
    assert "## 100% of the training data" in text and "Mean rank over tasks" in text and "doran 1.33" in text
    assert "; " in text.split("Mean rank over tasks")[1].splitlines()[0]  # a variant name may hold a comma


def test_pooled_seeds_only_interval_is_the_noise_of_the_task_means():
    table = sr.per_task(_runs(), "lora")
    pooled = sr.pooled(table).iloc[0]
    sds = [float(np.std(100 * np.asarray(d), ddof=1)) for d in ([0.02] * 3, [-0.01, -0.011, -0.009], [0.01, -0.01, 0.01])]
    assert table.set_index("task")["diff_sd"].tolist() == pytest.approx(sds)
    v = np.asarray(sds) ** 2 / 3
    df = v.sum() ** 2 / (v**2 / 2).sum()  # Welch-Satterthwaite
    half = stats.t.ppf(0.975, df) * math.sqrt(v.sum()) / 3
    assert pooled["ci_high_seeds"] - pooled["diff_mean"] == pytest.approx(half)
    assert pooled["diff_mean"] - pooled["ci_low_seeds"] == pytest.approx(half)
    # the tasks disagree far more than seeds do: the interval over tasks is the wider one
    assert pooled["ci_high"] - pooled["ci_low"] > pooled["ci_high_seeds"] - pooled["ci_low_seeds"]


def test_resolution_target_and_the_seeds_that_would_meet_it():
    pooled = sr.pooled(sr.per_task(_runs(), "lora")).iloc[0]  # fraction 1.0: target +-0.5 points
    assert pooled["target"] == 0.5
    assert not pooled["meets_target"]  # the three tasks disagree by 3 points
    # task c's seeds differ by 2 points: 3 seeds are not enough for +-0.5, the planner says how many are
    assert not pooled["meets_target_seeds"]
    sds = sr.per_task(_runs(), "lora")["diff_sd"].tolist()
    n = pooled["seeds_for_target"]
    assert sr.seeds_half_width(sds, [n] * 3) <= 0.5 < sr.seeds_half_width(sds, [n - 1] * 3)
    # no target at 1% of the data
    runs = _runs().assign(fraction=0.01)
    assert math.isnan(sr.pooled(sr.per_task(runs, "lora")).iloc[0]["target"])


def test_seeds_half_width_edge_cases():
    assert math.isnan(sr.seeds_half_width([1.0, 1.0], [5, 1]))  # a task with one seed has no spread
    assert sr.seeds_half_width([0.0, 0.0], [3, 3]) == 0.0
    assert math.isnan(sr.seeds_for_half_width([100.0], 0.01, most=50))


def test_a_forest_panel_cuts_an_interval_that_one_failed_seed_made_tens_of_points_wide():
    # six tasks with intervals about 2 points wide, one (a seed at chance) 80 points wide
    means = [0.5, -0.3, 1.0, -1.0, 0.2, -13.4]
    lows = [-0.5, -1.2, 0.1, -2.0, -0.8, -53.8]
    highs = [1.5, 0.6, 2.0, 0.0, 1.2, 27.0]
    lo, hi = sr.axis_range(means, lows, highs)
    assert -53.8 < lo < -13.4 and 2.0 < hi < 27.0  # every point estimate inside, the wide whisker cut
    assert lo == pytest.approx(-13.4 - 0.08 * 15.4) and hi == pytest.approx(2.0 + 0.08 * 15.4)
    # without the outlier nothing is cut: the range is the intervals' own, padded
    lo, hi = sr.axis_range(means[:5], lows[:5], highs[:5])
    assert lo == pytest.approx(-2.0 - 0.08 * 4.0) and hi == pytest.approx(2.0 + 0.08 * 4.0)
    # zero is always on the axis, and missing intervals are ignored
    lo, hi = sr.axis_range([1.0, 2.0], [0.5, math.nan], [1.5, math.nan])
    assert lo < 0.0 < hi


@pytest.mark.parametrize("sweep", ["sample_efficiency", "params_matched"])
def test_the_committed_verdict_across_tasks_is_what_the_committed_results_give(tmp_path, sweep):
    """Every number of the text suite's verdict (docs/text-suite.md quotes these tables) regenerates from the
    committed result files: the report run on a copy of them writes the committed markdown, byte for byte."""
    import shutil

    from experiments.constants import RESULTS_DIR
    from experiments.figures import ACROSS_TASKS

    committed = RESULTS_DIR / "suite" / f"{sweep}_across_tasks.md"
    if not committed.is_file():
        pytest.skip("no committed suite results")
    shutil.copytree(RESULTS_DIR / "suite", tmp_path / "results" / "suite")
    (tmp_path / "results" / "suite" / committed.name).unlink()
    args = ["--profile", "suite", "--results", str(tmp_path / "results"), "--sweep", sweep,
            "--figures", str(tmp_path / "figures"), "--baseline", *ACROSS_TASKS[sweep]]
    assert sr.main(args) == 0
    assert (tmp_path / "results" / "suite" / committed.name).read_text() == committed.read_text()
