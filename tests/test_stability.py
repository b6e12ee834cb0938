"""The stability study on the smoke profile: the learning-rate grid, zeroed rows, divergence, the report."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from experiments import grid, stability_report, sweep


def test_the_learning_rate_grid_expands_every_method():
    spec = grid.load_sweep("stability", grid.load_profile("default"))
    lrs = sorted({v.tags["lr"] for v in spec.variants})
    assert len(lrs) >= 7 and lrs[0] <= 1e-4 and lrs[-1] >= 0.3
    assert {v.tags["family"] for v in spec.variants} == set(stability_report.FAMILIES)
    assert len(spec.variants) == 5 * len(lrs) and spec.baseline == "dora, lr=0.001"
    doran = next(v for v in spec.variants if v.label == "doran, static factors, lr=0.01")
    assert doran.set == {"adapter.factors": "static", "train.lr": 0.01} and doran.tuned == "dora"


@pytest.fixture(scope="module")
def smoke_study(tmp_path_factory):
    root = tmp_path_factory.mktemp("stability")
    common = ["--profile", "smoke", "--seeds", "0", "--no-tuned", "--no-progress", "--no-estimate",
              "--results", str(root)]
    status = sweep.main(["stability", *common, "--variants", "lora, lr=0.001", "lora, lr=0.3", "dora, lr=0.001",
                         "dora, lr=0.3", "doran, lr=0.001", "doran, lr=0.3"])
    assert status == 0
    # DoRA refuses a layer with a zero row: recorded as the run's outcome (not an error of the sweep), the others run
    assert sweep.main(["stability_init", *common, "--variants", "dora, zero rows", "doran, zero rows"]) == 0
    out = stability_report.report("smoke", root, figures_dir=root / "figures")
    return root, out, common


def test_a_refusal_is_kept_not_retried_unless_asked(smoke_study, capsys):
    import json

    root, _, common = smoke_study
    [record] = (root / "smoke" / "stability_init").glob("dora-*.error.json")
    assert json.loads(record.read_text())["error"] == "InjectError"
    args = ["stability_init", *common, "--variants", "dora, zero rows"]
    assert sweep.main(args) == 0
    out = capsys.readouterr().out
    assert "1 refused, 0 to retry" in out and "1 already finished" in out
    assert json.loads(record.read_text())["attempts"] == 1
    assert sweep.main([*args, "--retry-failed"]) == 0  # asked: run again, refused again
    assert "1 refused (the library rejects the configuration; kept)" in capsys.readouterr().out
    assert json.loads(record.read_text())["attempts"] == 2


def test_the_report_counts_divergence_and_does_not_average_diverged_runs(smoke_study):
    root, out, _ = smoke_study
    table = out["lr"]
    assert set(table["method"]) == {"lora", "dora", "doran"} and set(table["lr"]) == {1e-3, 0.3}
    for _, r in table.iterrows():
        assert r["runs"] == 1 and r["diverged"] in (0, 1)
        assert math.isnan(r["acc_mean"]) == bool(r["diverged"])  # a diverged run is counted, not averaged
    assert (root / "smoke" / "stability_lr.csv").is_file() and (root / "figures" / "stability_lr.png").is_file()
    width = out["width"].set_index("method")
    assert (width["width_decades"] >= 0).all() and set(width.index) == {"lora", "dora", "doran"}


def test_zeroed_rows_are_refused_by_dora_and_trained_by_doran(smoke_study):
    root, out, _ = smoke_study
    init = out["init"].set_index("method")
    assert init.loc["dora", "refused"] == 1 and init.loc["doran", "refused"] == 0
    runs = pd.read_csv(root / "smoke" / "stability_init" / "runs.csv")
    doran = runs[runs["variant"] == "doran, zero rows"].iloc[0]
    assert doran["status"] in ("completed", "diverged") and not math.isnan(doran["test_acc"])
    assert (root / "figures" / "stability_init.png").is_file()


def test_stable_width_counts_consecutive_good_grid_points():
    table = pd.DataFrame({"method": ["m"] * 5, "lr": [1e-4, 3e-4, 1e-3, 3e-3, 1e-2],
                          "acc_mean": [70.0, 79.5, 80.0, 79.2, 60.0], "diverged": [0, 0, 0, 0, 1],
                          "errors": [0] * 5, "runs": [3] * 5, "not_run": [0] * 5})
    r = stability_report.stable_width(table).iloc[0]
    assert r["stable_points"] == 3 and r["lr_low"] == 3e-4 and r["lr_high"] == 3e-3
    assert r["width_decades"] == pytest.approx(3 * 0.5, abs=0.03)
    # a grid point whose seeds have not all run is no evidence of stability: it breaks the range
    partial = table.assign(not_run=[0, 0, 1, 0, 0], runs=[3, 3, 2, 3, 3])
    r = stability_report.stable_width(partial).iloc[0]
    assert r["stable_points"] == 1


def test_lr_table_counts_finished_runs_only(tmp_path):
    runs = pd.DataFrame({
        "tag_family": ["dora"] * 4, "tag_lr": ["0.1"] * 4, "seed": [0, 1, 2, 3],
        "status": ["completed", "diverged", "missing", "completed"], "diverged": [False, True, False, True],
        "nonfinite": [False, True, None, False], "refused": [False] * 4, "test_acc": [0.8, None, None, 0.58],
        "grad_norm_median": [1.0, 2.0, None, 1.5], "grad_norm_p95": [2.0, 9.0, None, 3.0],
        "grad_spike_ratio": [3.0, 40.0, None, 4.0], "loss_spikes": [0, 2, None, 0],
    })
    r = stability_report.lr_table(runs).iloc[0]
    assert (r["runs"], r["diverged"], r["nonfinite"], r["not_run"]) == (3, 2, 1, 1)
    assert r["divergence_rate"] == pytest.approx(2 / 3) and r["acc_mean"] == pytest.approx(80.0)


def _grid(method, diverged, acc):
    lrs = [1e-3, 3e-3, 1e-2, 3e-2]
    return pd.DataFrame({"method": [method] * 4, "lr": lrs, "diverged": diverged, "acc_mean": acc,
                         "errors": [0] * 4, "runs": [5] * 4, "not_run": [0] * 4})


def _verdict(a, b):
    table = pd.concat([a, b], ignore_index=True)
    return stability_report.verdict(table, stability_report.stable_width(table))


def test_verdict_applies_the_three_criteria_fixed_before_the_runs():
    dora = _grid("dora", [0, 0, 5, 5], [80.0, 80.5, math.nan, math.nan])
    # DoRAN: one grid point wider, never more divergent, and learning where DoRA failed -> supported
    v = _verdict(_grid("doran", [0, 0, 0, 5], [80.0, 80.2, 79.8, math.nan]), dora)
    assert (v["c1_wider"], v["c2_never_more_divergent"], v["c3_learned_where_b_failed"]) == (True, True, True)
    assert v["verdict"] == "supported" and v["rescued_lrs"] == "0.01"
    # survives 1e-2 without learning (more than 1 point below its best): criterion 3 fails; still wider (3 points
    # count only where within 1 point, so the range is 2 points, as wide as DoRA's): criterion 1 fails too
    v = _verdict(_grid("doran", [0, 0, 0, 5], [80.0, 80.2, 70.0, math.nan]), dora)
    assert (v["c1_wider"], v["c3_learned_where_b_failed"], v["verdict"]) == (False, False, "not supported")
    # wider range, but one seed more divergent at the lowest rate: criterion 2 fails
    v = _verdict(_grid("doran", [1, 0, 0, 0], [80.0, 80.2, 80.1, 79.9]), dora)
    assert (v["c1_wider"], v["c2_never_more_divergent"], v["verdict"]) == (True, False, "not supported")
    # DoRA wider and never more divergent: contradicted
    v = _verdict(_grid("doran", [0, 5, 5, 5], [80.0, math.nan, math.nan, math.nan]), dora)
    assert v["verdict"] == "contradicted"
    # a grid point not run yet: no verdict
    unfinished = _grid("doran", [0, 0, 0, 5], [80.0, 80.2, 79.8, math.nan]).assign(not_run=[0, 0, 1, 0])
    assert _verdict(unfinished, dora)["verdict"] == "incomplete"


def test_the_verdict_across_tasks_needs_two_of_three_and_no_contradiction():
    across = stability_report.across
    assert across({"a": "supported", "b": "supported", "c": "not supported"}) == "supported"
    assert across({"a": "supported", "b": "not supported", "c": "not supported"}) == "not supported"
    assert across({"a": "supported", "b": "supported", "c": "contradicted"}).startswith("not supported (contradicted")
    assert across({"a": "supported", "b": "incomplete", "c": "supported"}) == "incomplete"


def test_the_smoke_report_writes_a_verdict(smoke_study, capsys):
    root, out, _ = smoke_study
    v = out["verdict"].iloc[0]
    assert v["sweep"] == "stability" and v["verdict"] in ("supported", "not supported", "contradicted")
    assert (root / "smoke" / "stability_verdict.csv").is_file()
    assert stability_report.main(["--results", str(root), "--across", "smoke"]) == 0
    assert "across 1 task(s)" in capsys.readouterr().out
    assert stability_report.main(["--results", str(root), "--across", "nothing"]) == 2


def test_float16_gradient_norms_count_only_in_the_losss_units():
    """A float16 run's norms count only when recorded with the loss scale divided out (a `loss_scale`
    column); older ones, multiplied by the scale, give no norm and no spike ratio rather than wrong ones."""
    from experiments.collect import grad_norms, stability

    norms = {"step": [0, 1, 2], "total": [1.0, 2.0, 8.0]}

    def run(precision, grad):
        return {"status": "completed", "config": {"train": {"precision": precision}}, "grad_norm": grad,
                "metrics": {"test/acc": 0.8, "test/majority_acc": 0.5}}

    for precision, grad, ratio in (("bf16-mixed", norms, 4.0), ("16-mixed", {**norms, "loss_scale": [8.0] * 3}, 4.0),
                                   ("16-mixed", norms, None)):
        got = stability(run(precision, grad))
        assert got["grad_spike_ratio"] == ratio and got["diverged"] is False
        assert (got["grad_norm_median"] is None) == (ratio is None)
        assert bool(grad_norms(run(precision, grad))) == (ratio is not None)


def test_a_run_that_learned_then_trained_to_chance_counts_as_collapsed_not_diverged():
    """The MNIST failure mode: the loss falls, then returns to ln(10) with finite values and ends at 12.6%,
    not at the majority class; `diverged` stays False (the rule fixed before the runs), `collapsed` sees it."""
    from experiments.collect import collapsed, stability, summarize

    learned_then_lost = [1.67, 0.9, 0.4, 0.29, 0.5, 2.2, 3.3, 2.5] + [2.30] * 30
    learned = [1.67, 0.9, 0.4, 0.29, 0.2] + [0.05] * 30
    never = [2.30, 2.29, 2.31, 2.30, 2.29, 2.30]  # a rate too low: no learning, no collapse

    def run(losses, acc):
        return {"status": "completed", "metrics": {"test/acc": acc, "test/majority_acc": 0.1},
                "curves": {"steps": {"step": list(range(len(losses))), "train_loss": losses}}}

    got = stability(run(learned_then_lost, 0.126))
    assert got["collapsed"] is True and got["diverged"] is False
    assert stability(run(learned, 0.97))["collapsed"] is False
    assert stability(run(never, 0.11))["collapsed"] is False
    assert collapsed([2.3, 0.1, 2.3]) is None  # too few records to say
    # the last tenth decides: a spike that recovers is not a collapse
    assert collapsed([2.0, 0.5, 0.3, 2.5, 0.3] + [0.2] * 20) is False
    rows = [{"fraction": 1.0, "variant": "dora", "method": "dora", "status": "completed", "test_acc": a,
             "collapsed": c, "params_trainable": 1, "params_adapter": 1, "tuned": ""}
            for a, c in ((0.126, True), (0.97, False), (0.96, None))]
    assert summarize(pd.DataFrame(rows)).iloc[0]["n_collapsed"] == 1
