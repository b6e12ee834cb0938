"""Bad input is refused before any long work starts, with a message that names the problem and the fix, and
interrupted work loses nothing: one test per behaviour of docs/data.md (what bad input does)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

from doran.data import DataError, DataWarning, load_splits, read_text_table
from doran.errors import ConfigError
from experiments import run as run_mod
from experiments import run_lm

REPO = Path(__file__).resolve().parent.parent
SMOKE = str(REPO / "experiments" / "configs" / "smoke.yaml")
LM_SMOKE = str(REPO / "experiments" / "configs" / "lm_smoke.yaml")


def _table(path: Path, rows: list[tuple[str, str]], header: str = "text,label") -> Path:
    path.write_text(header + "\n" + "".join(f"{t},{y}\n" for t, y in rows), encoding="utf-8")
    return path


def _words(i: int) -> str:
    vocab = ["film", "plot", "actor", "scene", "story", "music", "cast", "score", "light", "sound"]
    return " ".join(vocab[(i // 10**k) % 10] for k in range(4))


def _balanced(path: Path, n: int = 40) -> Path:
    return _table(path, [(_words(i) + (" great" if i % 2 else " awful"), "pos" if i % 2 else "neg") for i in range(n)])


def _tiny(tmp_path: Path, *extra: str) -> list[str]:
    return ["model.name=random-bert", "train.epochs=1", "train.batch_size=8", "adapter.r=2", "adapter.alpha=4",
            "model.max_length=16", "runtime.progress_bar=false", f"out={tmp_path / 'out'}", *extra]


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if any model is built: bad input must be refused before."""

    def boom(*args, **kwargs):
        raise AssertionError("a model was loaded before the bad input was refused")

    monkeypatch.setattr("doran.training.build_backbone", boom)
    monkeypatch.setattr("doran.training.causal_lm.build_causal_lm", boom)


def _exit2(argv: list[str], capsys, pattern: str, main=run_mod.main) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    import re

    assert re.search(pattern, err), err
    return err


# ------------------------------------------------------------------ 1. the language-model arm's records
def _records(path: Path, records: list, task: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records, indent=2))
    return path


GOOD = {"instruction": "pick", "input": "", "output": "the correct answer is ending2", "answer": "ending2"}


@pytest.mark.parametrize(
    "records, where, pattern",
    [
        ("[\n" + json.dumps(GOOD) + ",\n{\"instruction\": \"x\",\n \"answer\": }\n]", "test",
         r"hellaswag/test\.json:4: not valid JSON"),
        ([GOOD, {k: v for k, v in GOOD.items() if k != "answer"}], "test",
         r"hellaswag/test\.json:\d+: record 1 has no 'answer'"),
        ([GOOD, {**GOOD, "answer": "Ending4"}], "test", r"record 1: gold answer 'Ending4' is not an answer of hellaswag"),
        ([GOOD, {**GOOD, "answer": "4"}], "test", r"gold answer '4' is not an answer of hellaswag \(ending1/"),
        ([{**GOOD, "answer": "ending7"}], "test", r"test\.json:2: record 0: gold answer 'ending7'"),
        ([GOOD, {k: v for k, v in GOOD.items() if k != "output"}], "train", r"train\.json:\d+: record 1 has no 'output'"),
        ([GOOD, {**GOOD, "answer": "ending9"}], "train", r"hellaswag/train\.json:\d+: record 1: gold answer 'ending9'"),
        ([GOOD, {**GOOD, "instruction": 3}], "train", r"'instruction' must be text"),
    ],
)
def test_lm_records_are_checked_before_any_model_loads(tmp_path, capsys, no_model, records, where, pattern):
    good = _records(tmp_path / "hellaswag" / ("train.json" if where == "test" else "test.json"), [GOOD])
    bad = tmp_path / "hellaswag" / f"{where}.json"
    if isinstance(records, str):
        bad.write_text(records)
    else:
        _records(bad, records)
    train, test = (good, bad) if where == "test" else (bad, good)
    argv = ["--config", LM_SMOKE, "data.synthetic=null", f"data.train_paths=[{train}]", f"data.test_paths=[{test}]",
            f"out={tmp_path / 'out'}"]
    _exit2(argv, capsys, pattern, main=run_lm.main)


def test_real_commonsense_files_pass_the_record_checks():
    from doran.data import commonsense as cs

    root = REPO.parent / "shared" / "data" / "commonsense"
    if not root.is_dir():
        pytest.skip("../shared/data/commonsense is absent")
    counts = cs.validate_files(sorted(map(str, root.glob("*/train.json"))), sorted(map(str, root.glob("*/test.json"))))
    assert counts[str(root / "boolq" / "test.json")] == 3270 and counts[str(root / "boolq" / "train.json")] == 9427
    assert cs.load_records(root / "piqa" / "test.json", require_answer=True, task="piqa") == json.loads(
        (root / "piqa" / "test.json").read_text())


def test_lm_smoke_can_turn_its_synthetic_data_off(capsys, no_model):
    _exit2(["--config", LM_SMOKE, "data.synthetic=null"], capsys, r"no training data: set data\.train_paths",
           main=run_lm.main)


# ---------------------------------------------------------------------------- 2. a given path is used
def test_a_data_path_without_a_kind_is_read_as_a_table(tmp_path):
    csv = _balanced(tmp_path / "my.csv")
    cfg = run_mod.load_config(None, _tiny(tmp_path, f"data.path={csv}"))
    assert cfg.data.kind == "table"
    splits, _ = run_mod.read_data(cfg)
    assert splits.description.startswith(str(csv)) and sum(splits.sizes().values()) == 40


def test_a_folder_path_without_a_kind_is_refused_with_the_fix(tmp_path, capsys, no_model):
    _exit2(_tiny(tmp_path, f"data.path={tmp_path}"), capsys,
           r"data\.kind is 'embedded'.*set data\.kind=table .* or vtab / fgvc / imagefolder")


# ------------------------------------------------------------------------------- 3. SIGTERM: resumable
@pytest.mark.parametrize("script", ["run", "run_lm"])
def test_sigterm_exits_nonzero_keeps_the_checkpoint_and_the_same_command_resumes(tmp_path, script):
    out = tmp_path / "out"
    if script == "run":
        csv = _balanced(tmp_path / "d.csv", 64)
        argv = [*_tiny(tmp_path, f"data.path={csv}", "train.epochs=400", "runtime.ckpt_every_n_steps=2")]
    else:
        argv = ["--config", LM_SMOKE, "train.epochs=1000", "train.max_steps=4000", "runtime.ckpt_every_n_steps=2",
                "eval.limit=1",
                f"out={out}", "runtime.progress_bar=false"]
    cmd = [sys.executable, "-m", f"experiments.{script}", *argv]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    ckpt_glob = list(out.glob("*/checkpoints/last.ckpt"))
    start = time.monotonic()
    while not ckpt_glob:
        if proc.poll() is not None or time.monotonic() - start > 240:
            proc.kill()
            raise AssertionError(f"no checkpoint appeared: {proc.communicate()}")
        time.sleep(0.2)
        ckpt_glob = list(out.glob("*/checkpoints/last.ckpt"))
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, (proc.returncode, stderr[-2000:])
    assert "SIGTERM at step" in stderr and "run the same command again to resume" in stderr
    assert "Traceback" not in stderr
    assert ckpt_glob[0].is_file()
    assert not list(out.glob("*.json*")), "an interrupted run wrote a result"


# ------------------------------------------------------------------- 4. the identity follows the data
def test_editing_the_data_in_place_is_a_new_run(tmp_path):
    csv = _balanced(tmp_path / "d.csv")
    cfg = run_mod.load_config(None, _tiny(tmp_path, f"data.path={csv}"))
    first = run_mod.run_id_of(cfg)
    assert run_mod.run_id_of(cfg) == first
    text = csv.read_text().replace("great", "superb", 1)
    csv.write_text(text)
    assert run_mod.run_id_of(cfg) != first


def test_the_result_records_the_data_hash_and_the_cleaning(tmp_path):
    csv = _balanced(tmp_path / "d.csv", 48)
    with csv.open("a") as f:
        f.write(f"{_words(1)} great,pos\n")  # an exact duplicate
        f.write("contested line,pos\ncontested line,neg\n")  # conflicting labels: both removed
    cfg = run_mod.load_config(None, _tiny(tmp_path, f"data.path={csv}"))
    result = run_mod.run(cfg, verbose=False)
    splits, _ = run_mod.read_data(cfg)
    assert result["data"]["sha256"] == splits.fingerprint()
    assert result["run_id"] == run_mod.run_id_of(cfg)
    assert result["data"]["cleaning"]["file"] == {
        "rows": 51, "duplicates_removed": 1, "conflicting_texts_removed": 1, "conflicting_rows_removed": 2}
    assert sum(result["data"]["sizes"].values()) == 48


# ------------------------------------------------------------------------ 5. exit 2, not a traceback
@pytest.mark.parametrize(
    "make, extra, pattern",
    [
        (lambda p: p.write_bytes("text,label\ncaf\xe9 au lait,pos\nok,neg\n".encode("latin-1")), [],
         r"d\.csv:2: not UTF-8 .*save the file as UTF-8"),
        (lambda p: p.write_text('text,label\nok,pos\n"never closed,neg\n' + "x" * 1_100_000 + "\n"), [],
         r"d\.csv:3: .*quote .* never closed"),
        (lambda p: _balanced(p), ["data.train_path={p}", "data.test_path={p}"], r"exclude each other"),
        (lambda p: _balanced(p), ["data.path=null", "data.kind=table"], r"data\.kind=table needs a file"),
        (lambda p: _balanced(p), ["data.split=[0.8,0.1,0.05]"], r"sums to 0\.95, not 1"),
        (lambda p: _balanced(p), ["data.split=[0.9,0.1,0]"], r"leaves a split empty"),
        (lambda p: _table(p, [("a b", "pos"), ("c d", "neg"), ("e f", "pos"), ("g h", "neg")]), [],
         r"the (val|test) split is empty .* too small for data\.split"),
        (lambda p: _balanced(p), ["model.max_length=0"], r"model\.max_length must be an integer >= 2"),
    ],
)
def test_bad_files_and_settings_exit_2_with_a_message_before_any_model(tmp_path, capsys, no_model, make, extra, pattern):
    csv = tmp_path / "d.csv"
    make(csv)
    extra = [e.format(p=csv) for e in extra]
    _exit2(_tiny(tmp_path, f"data.path={csv}", *extra), capsys, pattern)


# ------------------------------------------------------------------------- 6. labels that are mistakes
@pytest.mark.parametrize(
    "labels, pattern",
    [
        (["pos", "neg", "NaN", "pos"], r"d\.csv:4: label 'NaN' .* looks like a missing value"),
        (["0", "1", "pos", "1"], r"d\.csv:4: label 'pos' .* is a word, but line 2 has the number '0'"),
        (["0.5", "1", "0", "1"], r"d\.csv:2: label '0\.5' .* is not a class"),
        (["1", "2", "1", "2"], r"leave class\(es\) 0 of 0\.\.2 without a single example"),
        (["0", "10", "0", "10"], r"leave class\(es\) 1, 2, 3, 4, 5, 6, 7, 8, 9 of 0\.\.10"),
        (["pos", "pos", "pos", "pos"], r"every example has the label 'pos'.*at least 2 classes"),
    ],
)
def test_labels_that_are_almost_certainly_mistakes_are_refused(tmp_path, labels, pattern):
    path = _table(tmp_path / "d.csv", [(f"text {i}", y) for i, y in enumerate(labels)])
    with pytest.raises(DataError, match=pattern):
        read_text_table(path)


def test_one_based_labels_map_by_name_when_the_names_are_given(tmp_path):
    path = _table(tmp_path / "d.csv", [(f"text {i}", y) for i, y in enumerate(["1", "2", "3", "1"])])
    split, names = read_text_table(path, label_names=[1, 2, 3])
    assert names == ["1", "2", "3"] and split.labels == [0, 1, 2, 0]


def test_integral_float_labels_are_read_as_integers_with_a_loud_warning(tmp_path):
    path = _table(tmp_path / "d.csv", [(f"text {i}", y) for i, y in enumerate(["0.0", "1.0", "2.0", "1.0"])])
    with pytest.warns(DataWarning, match=r"written as floats \('0\.0', \.\.\.\); they are read as the integers"):
        split, names = read_text_table(path)
    assert split.labels == [0, 1, 2, 1] and names == ["0", "1", "2"]


def test_data_warnings_are_recorded_in_the_result(tmp_path, capsys):
    rows = [(_words(i) + (" great" if i % 2 else " awful"), "1.0" if i % 2 else "0.0") for i in range(40)]
    csv = _table(tmp_path / "d.csv", rows)
    cfg = run_mod.load_config(None, _tiny(tmp_path, f"data.path={csv}", "train.max_steps=1"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataWarning)  # read_data records them instead of raising
        result = run_mod.run(cfg, verbose=False)
    assert len(result["data"]["warnings"]) == 1 and "written as floats" in result["data"]["warnings"][0]
    assert "warning: " in capsys.readouterr().err


# ---------------------------------------------------------------------------------- 7. duplicates
def test_duplicates_and_conflicts_are_dropped_before_the_split_and_can_be_kept(tmp_path):
    rows = [(_words(i), "pos" if i % 2 else "neg") for i in range(30)]
    rows += [rows[0], rows[1], rows[1], ("torn", "pos"), ("torn", "neg"), ("torn", "pos")]
    path = _table(tmp_path / "d.csv", rows)
    splits = load_splits("table", str(path))
    assert splits.cleaning["file"] == {
        "rows": 36, "duplicates_removed": 3, "conflicting_texts_removed": 1, "conflicting_rows_removed": 3}
    texts = [t for s in (splits.train, splits.val, splits.test) for t in s.inputs]
    assert len(texts) == len(set(texts)) == 30 and "torn" not in texts
    kept = load_splits("table", str(path), dedup=False)
    assert sum(kept.sizes().values()) == 36 and kept.cleaning == {"dedup": False}


def test_test_texts_are_removed_from_training_and_validation_files(tmp_path):
    train = _table(tmp_path / "train.csv", [(_words(i), "pos" if i % 2 else "neg") for i in range(20)])
    val = _table(tmp_path / "val.csv", [(_words(i), "pos" if i % 2 else "neg") for i in range(15, 25)])
    test = _table(tmp_path / "test.csv", [(_words(i), "pos" if i % 2 else "neg") for i in range(18, 30)])
    splits = load_splits("table", train_path=str(train), val_path=str(val), test_path=str(test))
    assert splits.cleaning["train"]["in_test_removed"] == 2  # 18, 19
    assert splits.cleaning["val"]["in_test_removed"] == 7  # 18..24
    assert splits.cleaning["train"]["in_val_removed"] == 3  # 15, 16, 17
    assert splits.sizes() == {"train": 15, "val": 3, "test": 12}
    assert not set(splits.train.inputs) & set(splits.test.inputs)


# ------------------------------------------------------------------------------------- rough edges
def test_overrides_go_before_and_after_the_config_option(capsys):
    assert run_mod.main(["method=lora", "--config", SMOKE, "seed=1", "--print-config"]) == 0
    printed = capsys.readouterr().out
    assert "method: lora" in printed and "seed: 1" in printed and printed.startswith("run_id: lora-s1-")


@pytest.mark.parametrize(
    "override, suggestion",
    [("trian.lr=1e-3", "'train.lr'"), ("train.epoch=2", "'train.epochs'"), ("lrate=1e-3", "'train.lr'"),
     ("data.lable_column=y", "'data.label_column'")],
)
def test_unknown_keys_say_did_you_mean(capsys, override, suggestion):
    err = _exit2([override], capsys, r"unknown key")
    assert f"did you mean {suggestion}" in err


def test_unknown_key_in_a_config_file_says_did_you_mean(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"unknown key 'train\.learning_rate' \(did you mean"):
        run_mod.load_config(bad)


def test_a_cpu_sweep_says_its_estimated_time_before_it_starts(monkeypatch):
    from experiments import grid, progress

    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    profile = grid.load_profile("smoke")
    points = grid.build_grid(grid.load_sweep("sample_efficiency", profile), profile, tuned_dir=None, seeds=[0],
                             variants=["lora"], fractions=[0.05])
    line = progress.estimate(points, jobs=1)
    assert line.startswith("[sweep] estimate: 1 runs to do, about ") and "s per optimizer step of lora" in line
    assert "warning" not in line
    seen = []
    monkeypatch.setattr(progress, "measure_step", lambda cfg, steps=3, threads=None: seen.append(threads) or 100.0)
    assert "[sweep] warning: that is long for a CPU" in progress.estimate(points, jobs=1)  # slow: over an hour
    # the step is measured with the threads each run will have: the sweep's --threads, else the run's own
    progress.estimate(points, jobs=2, threads=1)
    progress.estimate([replace_threads(p, 3) for p in points], jobs=2)
    assert seen[1:] == [1, 3]


def replace_threads(point, n):
    import dataclasses

    from experiments.config import replace

    return dataclasses.replace(point, cfg=replace(point.cfg, **{"runtime.threads": n}))


def test_the_estimate_leaves_out_runs_another_sweep_finished(tmp_path, monkeypatch):
    from experiments import sweep

    counted = []
    monkeypatch.setattr(sweep, "estimate", lambda todo, jobs, threads=None: counted.append(len(todo)) or None)
    common = ["--profile", "smoke", "--seeds", "0", "--fractions", "0.02", "--no-tuned", "--no-progress",
              "--results", str(tmp_path)]
    assert sweep.main(["ablation_tau", "--variants", "static, tau=0, detached", *common]) == 0  # = DoRA
    # sample_efficiency's dora run is copied from the tau ablation: only lora is left to estimate
    assert sweep.main(["sample_efficiency", "--variants", "lora", "dora", *common]) == 0
    assert counted == [1, 1]


def test_make_figures_regenerates_every_committed_figure_from_saved_results(tmp_path):
    tracked = subprocess.run(["git", "ls-files", "figures"], cwd=REPO, capture_output=True, text=True).stdout.split()
    if not tracked:
        pytest.skip("not a git checkout")
    out = subprocess.run(["make", "figures", f"FIGURES={tmp_path}", f"PY={sys.executable}"], cwd=REPO,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    made = {p.name for p in tmp_path.iterdir()}
    assert {Path(t).name for t in tracked if "/" not in t[len("figures/"):]} <= made


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "dora", "doran", "replora", "hora", "prediag", "sora"])
def test_make_smoke_shows_learning_for_every_method(tmp_path, method):
    result = run_mod.run(run_mod.load_config(SMOKE, [f"method={method}", f"out={tmp_path}"]), verbose=False)
    assert result["metrics"]["test/acc"] > result["metrics"]["test/majority_acc"] + 0.05, result["metrics"]


def test_an_unknown_adapter_target_exits_2_with_the_nearest_names(tmp_path, capsys):
    err = _exit2(_tiny(tmp_path, "adapter.targets=[qury]", "train.max_steps=1"), capsys, r"no nn.Linear matches")
    assert "query" in err


def test_the_estimate_counts_a_run_two_sweeps_share_once(tmp_path, monkeypatch):
    from experiments import sweep

    counted = []
    monkeypatch.setattr(sweep, "estimate", lambda todo, jobs, threads=None: counted.append(len(todo)) or None)
    specs = []
    for name in ("first", "second"):  # two sweeps that both hold the same lora run (same config, same data)
        path = tmp_path / f"{name}.yaml"
        path.write_text(f"name: {name}\ndescription: one lora run\nfractions: [0.02]\nmethods: [lora]\n")
        specs.append(str(path))
    common = ["--profile", "smoke", "--seeds", "0", "--no-tuned", "--no-progress", "--results", str(tmp_path / "r")]
    assert sweep.main([*specs, *common]) == 0
    assert counted == [1]  # it runs once, so it is estimated once
    assert len(list((tmp_path / "r" / "smoke").glob("*/lora-s0-*.json*"))) == 2  # and both sweeps have its result
