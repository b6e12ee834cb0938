"""One run end to end (`python -m experiments.run`): config, validation, result file, resume, failure."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
from safetensors.torch import load_file

from doran import results
from doran.errors import ConfigError
from experiments.run import load_config, main, run, run_id_of

REPO = Path(__file__).resolve().parent.parent
SMOKE = str(REPO / "experiments" / "configs" / "smoke.yaml")


def _png(path, color, size=16):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), color).save(path)


def write_vtab(root: Path, task: str = "tiny", classes: int = 3, per_class: int = 6) -> Path:
    """A VTAB-1K task in its on-disk layout: images plus `path label` list files."""
    rng = random.Random(0)
    lines = []
    for c in range(classes):
        for i in range(per_class):
            rel = f"images/{c}_{i}.png"
            _png(root / task / rel, tuple(min(255, 100 * c + rng.randint(0, 30)) for _ in range(3)))
            lines.append(f"{rel} {c}")
    for name in ("train800val200", "train800", "val200", "test"):
        (root / task / f"{name}.txt").write_text("\n".join(lines) + "\n")
    return root


def write_table(path: Path, n: int = 48) -> Path:
    rng = random.Random(0)
    filler = ["the", "a", "film", "plot", "actor", "scene", "story", "music"]
    rows = ["text,label"]
    for i in range(n):
        words = rng.choices(filler, k=5) + ["great" if i % 2 else "awful"]
        rows.append(f"{' '.join(words)},{'pos' if i % 2 else 'neg'}")
    path.write_text("\n".join(rows) + "\n")
    return path


def tiny_text(tmp_path: Path, *extra: str) -> list[str]:
    """Overrides for a seconds-long text run: tiny random BERT on a synthetic CSV."""
    csv = tmp_path / "d.csv"
    if not csv.exists():
        tmp_path.mkdir(parents=True, exist_ok=True)
        write_table(csv)
    return [
        "model.name=random-bert",
        "data.kind=table",
        f"data.path={csv}",
        "train.epochs=1",
        "train.batch_size=8",
        "adapter.r=2",
        "adapter.alpha=4",
        "model.max_length=16",
        "lr=1e-2",
        "diagnostics.every_n_steps=1",
        "runtime.progress_bar=false",
        f"out={tmp_path / 'out'}",
        *extra,
    ]


def tiny_vit(root: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--config",
        SMOKE,
        "model.kind=image",
        "model.name=vit_tiny_patch16_224",
        "model.pretrained=false",
        "model.kwargs={img_size: 32, patch_size: 8, depth: 2}",
        "data.kind=vtab",
        f"data.path={root}",
        "data.task=tiny",
        "data.eval_limit=null",
        "fraction=1",
        "train.batch_size=6",
        "runtime.progress_bar=false",
        f"out={out}",
        *extra,
    ]


# --------------------------------------------------------------------------------------------- config
def test_overrides_are_typed_and_unique_leaf_names_resolve():
    cfg = load_config(
        None,
        [
            "train.lr=1e-3",
            "warmup_ratio=0.1",
            "seed=3",
            "fraction=0.5",
            "method=DoRA",
            "adapter.targets=[query, value]",
            "model.kwargs={hidden_size: 64}",
        ],
    )
    assert cfg.train.lr == 1e-3 and isinstance(cfg.train.lr, float)
    assert cfg.train.warmup_ratio == 0.1 and cfg.seed == 3 and cfg.fraction == 0.5
    assert cfg.method == "dora" and cfg.adapter["targets"] == ["query", "value"]
    assert cfg.model.kwargs == {"hidden_size": 64}
    assert cfg.model.trainable == ["classifier"] and cfg.model.head == "classifier"
    assert load_config(None, ["adapter.targets=qkv", "model.kind=image", "data.kind=vtab"]).adapter[
        "targets"
    ] == ["qkv"]


def test_smoke_profile_is_merged_over_the_defaults():
    cfg = load_config(SMOKE)
    assert cfg.train.epochs == 3 and cfg.fraction == 0.05 and cfg.train.lr == 5e-3
    assert cfg.train.weight_decay == 0.01  # the schema's default


@pytest.mark.parametrize(
    "override, pattern",
    [
        ("train.lrr=1", r"unknown key 'train.lrr' \(did you mean 'train.lr'"),
        ("name=x", r"ambiguous: \['data.name', 'model.name'\]"),
        ("train.epochs=two", "train.epochs must be an integer"),
        ("method=qlora", r"unknown method 'qlora'; valid: \[.*'doran'.*'lora'"),
        ("fraction=0", r"fraction must lie in \(0, 1\]"),
        ("fraction=1.5", r"fraction must lie in \(0, 1\]"),
        ("adapter.rank=4", r"adapter: unknown AdapterConfig field\(s\) \['rank'\]"),
        ("data.kind=vtab", "does not fit model.kind='text'"),
        ("data.path=/no/such/file.csv", "data.path='/no/such/file.csv' does not exist"),
        ("nonsense", "is not key=value"),
        ("runtime.compile=fast", r"runtime.compile: unknown compile mode 'fast'; choose one of .*'none'"),
    ],
)
def test_bad_config_values_are_errors_naming_the_fix(override, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(None, [override])


def test_unknown_key_in_a_config_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  epoch: 3\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown key 'train.epoch'"):
        load_config(bad)


def test_run_id_follows_the_computation_not_the_runtime():
    a = results.make_run_id(load_config(None, ["method=lora", "seed=1", "fraction=0.1"]).to_dict())
    b = results.make_run_id(
        load_config(
            None, ["method=lora", "seed=1", "fraction=0.1", "runtime.threads=1", "out=experiments/results/elsewhere"]
        ).to_dict()
    )
    c = results.make_run_id(load_config(None, ["method=lora", "seed=1", "fraction=0.1", "train.lr=5e-4"]).to_dict())
    assert a == b != c and a.startswith("lora-s1-f0.1-")
    # deterministic kernels give other numbers: another run; off, the id is the one without the key
    base = ["method=lora", "seed=1", "fraction=0.1"]
    det = results.make_run_id(load_config(None, [*base, "runtime.deterministic=true"]).to_dict())
    off = results.make_run_id(load_config(None, [*base, "runtime.deterministic=false"]).to_dict())
    assert det != a == off
    assert a == results.make_run_id({k: v for k, v in load_config(None, base).to_dict().items() if k != "runtime"})


def test_bad_input_exits_2_before_any_model_is_loaded(tmp_path, monkeypatch, capsys):
    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was validated")

    monkeypatch.setattr("doran.training.build_backbone", no_model)
    root = write_vtab(tmp_path / "vtab")
    (root / "tiny" / "images" / "1_2.png").unlink()  # line 9 of each list
    assert main(tiny_vit(root, tmp_path / "out")) == 2
    err = capsys.readouterr().err
    assert "train800val200.txt:9: image 'images/1_2.png' not found" in err
    assert main(["data.kind=table", f"data.path={write_table(tmp_path / 'e.csv', 0)}"]) == 2
    assert "has no examples" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------- end to end
def test_tiny_vit_on_a_vtab_layout_runs_end_to_end(tmp_path, capsys):
    root = write_vtab(tmp_path / "vtab")
    assert main(tiny_vit(root, tmp_path / "out")) == 0
    files = results.result_files(tmp_path / "out")
    assert len(files) == 1
    r = results.read_result(files[0])
    assert r["status"] == "completed" and r["method"] == "doran" and r["failure"] is None
    assert r["data"]["sizes"] == {"train": 18, "val": 18, "test": 18} and r["data"]["num_classes"] == 3
    assert r["data"]["subset"]["size"] == 18 and len(r["data"]["subset"]["sha256"]) == 64
    assert 0 <= r["metrics"]["test/acc"] <= 1 and r["model"] == {"pretrained": False, "weights": None}
    assert r["adapted_modules"] == ["blocks.0.attn.qkv", "blocks.1.attn.qkv"]
    assert set(r["tau"]["projection"]) == {"q", "v"} and r["params"]["tau"] == 4
    assert r["grad_norm"]["step"] == list(range(9))  # the smoke config: 3 epochs of 3 batches
    assert r["curves"]["epochs"]["epoch"] == [0, 1, 2] and r["epoch_train_wall_s"][0] > 0
    assert r["env"]["packages"]["timm"] and "commit" in r["env"]["git"] and r["device"]["type"] == "cpu"
    assert r["peak_memory"]["cpu_rss_peak_mib"] > 0
    tensors = load_file(r["artifacts"]["adapter"])
    assert any(k.endswith("tau_rho") for k in tensors)
    assert not (tmp_path / "out" / r["run_id"] / "checkpoints").exists()  # removed once finished
    # a second call finds the result and skips the run
    assert main(tiny_vit(root, tmp_path / "out")) == 0
    assert "exists, skipping" in capsys.readouterr().out


def test_methods_with_one_seed_share_the_subset(tmp_path):
    got = {
        m: run(load_config(None, tiny_text(tmp_path, f"method={m}", "seed=4", "fraction=0.5")), verbose=False)
        for m in ("lora", "doran")
    }
    subsets = [got[m]["data"]["subset"] for m in got]
    assert subsets[0] == subsets[1] and subsets[0]["size"] == 20
    assert got["lora"]["tau"] == {} and len(got["doran"]["tau"]["tau"]) > 0
    assert got["lora"]["run_id"] != got["doran"]["run_id"]


def test_resume_after_an_interruption_equals_an_uninterrupted_run(tmp_path):
    class Kill(pl.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            if trainer.current_epoch == 1:
                raise RuntimeError("simulated kill at the start of epoch 1")

    args = ["train.epochs=2", "method=doran", "seed=2", "runtime.ckpt_min_interval_s=0"]
    straight = run(load_config(None, tiny_text(tmp_path / "a", *args)), verbose=False)

    cfg = load_config(None, tiny_text(tmp_path / "b", *args))
    run_id = run_id_of(cfg)
    result_path = results.result_path(cfg.out, run_id)
    with pytest.raises(RuntimeError, match="simulated kill"):
        run(cfg, callbacks=[Kill()], verbose=False)
    assert not result_path.exists()
    ckpt = Path(cfg.out) / run_id / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()
    resumed = run(cfg, verbose=False)
    assert resumed["resumed_from_step"] == 5 and resumed["steps"] == straight["steps"] == 10  # 5 per epoch
    assert resumed["metrics"]["test/acc"] == straight["metrics"]["test/acc"]
    assert resumed["metrics"]["test/loss"] == pytest.approx(straight["metrics"]["test/loss"], rel=1e-6)
    assert resumed["curves"]["epochs"]["epoch"] == [0, 1]
    assert resumed["tau"]["tau"] == pytest.approx(straight["tau"]["tau"], rel=1e-6)
    a, b = load_file(straight["artifacts"]["adapter"]), load_file(resumed["artifacts"]["adapter"])
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k] - b[k]).abs().max().item() <= 1e-6, k


def test_a_nan_loss_writes_a_failed_result_with_step_and_cause(tmp_path):
    class Poison(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            def hook(mod, args, output):
                if pl_module.global_step >= 2:
                    output.logits = output.logits * float("nan")
                return output

            pl_module.model.register_forward_hook(hook)

    cfg = load_config(None, tiny_text(tmp_path, "train.epochs=3"))
    r = run(cfg, callbacks=[Poison()], verbose=False)
    assert r["status"] == "failed" and r["failure"]["step"] == 2 and "nan" in r["failure"]["cause"]
    assert "test/acc" not in r["metrics"] and r["curves"]["epochs"]["epoch"] == [0]
    assert results.read_result(results.result_path(cfg.out, r["run_id"]))["status"] == "failed"


@pytest.mark.slow
def test_embedded_default_beats_the_majority_class_clearly(tmp_path):
    r = run(
        load_config(
            None,
            [
                "method=lora",
                "fraction=0.1",
                "train.epochs=3",
                "data.eval_limit=400",
                f"out={tmp_path}",
                "runtime.progress_bar=false",
            ],
        ),
        verbose=False,
    )
    assert r["metrics"]["test/acc"] > r["metrics"]["test/majority_acc"] + 0.08


def test_embedded_default_smoke_profile_runs(tmp_path):
    r = run(
        load_config(SMOKE, ["method=lora", f"out={tmp_path}", "runtime.progress_bar=false"]), verbose=False
    )
    assert r["status"] == "completed" and r["data"]["sizes"] == {"train": 10202, "val": 1275, "test": 1275}
    assert r["model"]["pretrained"] and r["params"]["factors"] == 6 * 2 * 8 * (384 + 384)
    assert r["metrics"]["test/acc"] > r["metrics"]["test/majority_acc"] + 0.1  # 0.747 vs 0.576 when written


# --------------------------------------------------------------------------------------------- atomic write
def test_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "r.json"
    results.atomic_write_json(path, {"v": 1})

    def broken_fsync(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="disk full"):
        results.atomic_write_json(path, {"v": 2})
    with pytest.raises(OSError):
        results.atomic_write_json(tmp_path / "new.json", {"v": 2})
    assert json.loads(path.read_text()) == {"v": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]


def test_a_writer_killed_mid_write_leaves_the_old_file(tmp_path):
    path = tmp_path / "r.json"
    results.atomic_write_json(path, {"v": 1})
    code = (
        "import os, time, sys\n"
        "from doran import results\n"
        "real = os.fdopen\n"
        "class Slow:\n"
        "    def __init__(self, f): self.f = f\n"
        "    def __enter__(self): return self\n"
        "    def __exit__(self, *a): self.f.close()\n"
        "    def write(self, s):\n"
        "        self.f.write(s[:10]); self.f.flush(); print('writing', flush=True); time.sleep(60)\n"
        "    def __getattr__(self, k): return getattr(self.f, k)\n"
        "os.fdopen = lambda *a, **k: Slow(real(*a, **k))\n"
        f"results.atomic_write_json({str(path)!r}, {{'v': 2, 'pad': 'x' * 100000}})\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=REPO)
    assert proc.stdout.readline().strip() == "writing"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert json.loads(path.read_text()) == {"v": 1}  # the target is never half-written
    leftovers = [p for p in tmp_path.iterdir() if p.name != "r.json"]
    assert all(p.name.startswith(".r.json.") and p.suffix == ".tmp" for p in leftovers)


def test_result_json_has_no_nan():
    path_value = results._jsonable({"a": float("nan"), "b": [1.0, float("inf")], "c": Path("/x")})
    assert path_value == {"a": None, "b": [1.0, None], "c": "/x"}


def test_validate_result_rejects_incomplete_results():
    with pytest.raises(ValueError, match="missing keys"):
        results.validate_result({"status": "completed"})


def test_cli_help_runs():
    out = subprocess.run(
        [sys.executable, "-m", "experiments.run", "--help"],
        capture_output=True,
        text=True,
        check=False,
        cwd=REPO,
        timeout=120,
    )
    assert out.returncode == 0 and "key=value" in out.stdout


@pytest.mark.gpu
@pytest.mark.parametrize("method, precision", [("doran", "auto"), ("dora", "16-mixed"), ("lora", "auto")])
def test_tiny_vit_trains_in_mixed_precision_on_gpu(tmp_path, method, precision):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    root = write_vtab(tmp_path / "vtab")
    args = tiny_vit(
        root, tmp_path / "out", f"method={method}", f"train.precision={precision}", "train.epochs=2"
    )
    assert main(args) == 0
    r = results.read_result(next((tmp_path / "out").glob("*.json.gz")))
    expected = "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    assert r["status"] == "completed" and r["device"]["type"] == "cuda"
    assert r["device"]["precision"] == (expected if precision == "auto" else precision)
    assert r["peak_memory"]["cuda_peak_allocated_mib"] > 0
    totals = r["grad_norm"]["total"]
    # fp16's grad scaler may skip a few overflowing first steps (their norm is recorded as null)
    assert all(v is not None for v in totals) if precision == "auto" else any(v is not None for v in totals)


def test_git_state_counts_code_changes_but_not_result_files(tmp_path, monkeypatch):
    import subprocess

    from doran.results import git_state

    monkeypatch.delenv("DORAN_GIT_COMMIT", raising=False)

    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    git("init", "-q")
    git("config", "user.email", "t@example.org")
    git("config", "user.name", "t")
    (tmp_path / "experiments" / "results").mkdir(parents=True)
    (tmp_path / "doran").mkdir()
    (tmp_path / "experiments" / "results" / "sweep.json").write_text("{}")
    (tmp_path / "doran" / "core.py").write_text("x = 1\n")
    git("add", ".")
    git("commit", "-qm", "init")
    assert git_state(tmp_path)["dirty"] is False
    (tmp_path / "experiments" / "results" / "sweep.json").write_text('{"updated": 1}')
    assert git_state(tmp_path)["dirty"] is False  # a sweep rewriting its own state is not a code change
    (tmp_path / "doran" / "core.py").write_text("x = 2\n")
    assert git_state(tmp_path)["dirty"] is True


def test_stated_commit_wins_over_a_stale_history(tmp_path, monkeypatch):
    """On a copied tree (a machine without the repository's history) the history may be stale: the stated commit is recorded."""
    from doran.results import git_state

    monkeypatch.setenv("DORAN_GIT_COMMIT", "abc123")
    monkeypatch.setenv("DORAN_GIT_DIRTY", "0")
    state = git_state()  # this repository has a history, and it is not what gets recorded
    assert state == {"commit": "abc123", "dirty": False, "stated_by": "DORAN_GIT_COMMIT"}
    monkeypatch.setenv("DORAN_GIT_DIRTY", "1")
    assert git_state()["dirty"] is True


def test_the_deterministic_mode_is_recorded_and_repeats_exactly(tmp_path):
    a = run(load_config(None, tiny_text(tmp_path, "runtime.deterministic=true")), verbose=False)
    b = run(load_config(None, tiny_text(tmp_path, "runtime.deterministic=true", "runtime.force=true")), verbose=False)
    assert a["device"]["deterministic"] is True and a["run_id"] == b["run_id"]  # runtime: not the identity
    assert a["metrics"]["test/loss"] == b["metrics"]["test/loss"]
    assert a["curves"]["steps"]["train_loss"] == b["curves"]["steps"]["train_loss"]
