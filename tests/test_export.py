"""doran.export: PEFT folders both ways, merged models that load without doran, and the export command.

Every comparison is float32 on the tiny models of conftest.py, with adapters (and trainable heads) moved
away from their initial values, and each test checks that the adapter changes the output by far more than
its tolerance, so that a dropped or misplaced tensor fails.
"""

from __future__ import annotations

import functools
import json
import os
import re
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from conftest import FAMILIES, perturb, run
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import doran
from doran.export import ExportError, ExportWarning, export_merged, export_peft, import_peft, main

peft = pytest.importorskip("peft")

# float32 tolerances. Measured: LoRA through PEFT is bit-equal; DoRA differs by PEFT's materialised row norm
# against doran's factored one (<= 2.4e-6 on LLaMA logits up to 4.1); merged weights by summing
# (W0 + s B A) x in another order than W0 x + s B (A x) (<= 6.6e-7 on BERT and ViT, 6.1e-6 on LLaMA).
PEFT_TOL = dict(rtol=1e-5, atol=1e-5)
MERGED_TOL = dict(rtol=1e-5, atol=1e-5)


def adapted(family: str, preset: str, seed: int = 0, **overrides):
    """A tiny model of ``family`` with ``preset`` adapters and its head, all moved away from their init."""
    factory, targets, head, _, _ = FAMILIES[family]
    model = factory()
    targets = overrides.pop("targets", targets)
    doran.inject(
        model, doran.AdapterConfig.preset(preset, r=4, alpha=8, targets=targets, **overrides), trainable=head
    )
    perturb(model, seed=seed)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for _, p, group in doran.named_adapter_parameters(model):
            if group == "other":  # the head too: modules_to_save must carry it
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


def peft_load(family: str, folder):
    return peft.PeftModel.from_pretrained(FAMILIES[family][0](), str(folder)).eval()


@functools.cache
def base_output(family: str) -> torch.Tensor:
    with torch.no_grad():
        return run(FAMILIES[family][0](), family)


@torch.no_grad()
def assert_moved(model, family: str) -> torch.Tensor:
    """The adapted output, after checking that it differs from the base output far beyond the tolerances."""
    y, y_base = run(model, family), base_output(family)
    assert (y - y_base).abs().max() > 1e-2 * max(1.0, y_base.abs().max().item())
    return y


def adapter_tensors(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p, _ in doran.named_adapter_parameters(model)}


def lora_modules(peft_model) -> list:
    return [m for m in peft_model.modules() if hasattr(m, "lora_A") and "default" in m.lora_A]


# ============================================================================================== to PEFT
EXPORT_CASES = [
    ("bert", "lora", {}),
    ("bert", "dora", {}),
    ("llama", "lora", {}),
    ("llama", "dora", {}),
    ("vit", "lora", {}),  # fused qkv: q and v slices -> one block-diagonal LoRA on qkv
    ("vit", "dora", {}),  # ... with the k rows' magnitude at the base row norm
    ("vit", "lora", {"targets": ("qkv", "fc2")}),  # fused and plain modules: rank_pattern / alpha_pattern
]


@pytest.mark.parametrize(
    "family, preset, overrides",
    EXPORT_CASES,
    ids=[f"{f}-{p}{'-' + '+'.join(o['targets']) if o else ''}" for f, p, o in EXPORT_CASES],
)
def test_export_peft_loads_in_peft_with_the_same_outputs(family, preset, overrides, tmp_path):
    model = adapted(family, preset, **overrides)
    y = assert_moved(model, family)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExportWarning)
        export_peft(model, tmp_path / "peft")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["use_dora"] == (preset == "dora") and config["peft_type"] == "LORA"
    theirs = peft_load(family, tmp_path / "peft")
    with torch.no_grad():
        torch.testing.assert_close(run(theirs, family), y, **PEFT_TOL)
    layers = lora_modules(theirs)
    assert len(layers) == len(list(doran.adapted_modules(model)))
    assert all(m.scaling["default"] == 2.0 for m in layers)  # s = alpha / r = 8 / 4, fused ones too
    if family == "vit":
        qkv = theirs.base_model.model.blocks[0].attn.qkv
        B = qkv.lora_B["default"].weight
        assert B.shape == (144, 8) and torch.all(B[48:96] == 0)  # rank 2 r; the k rows untouched
        assert torch.all(B[:48, 4:] == 0) and torch.all(B[96:, :4] == 0)  # block-diagonal
    with torch.no_grad():  # the comparison can fail: a changed B (DoRA: magnitude) moves the output
        if preset == "dora":
            layers[0].lora_magnitude_vector["default"].weight.mul_(1.5)
        else:
            layers[0].lora_B["default"].weight[0] += 1.0
        assert (run(theirs, family) - y).abs().max() > 1e-3


def test_dora_training_differences_are_warned_eval_outputs_equal(tmp_path):
    model = adapted("bert", "dora", dropout=0.1, detach_norm=False)
    y = assert_moved(model, "bert")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        export_peft(model, tmp_path / "peft")
    notes = [str(w.message) for w in record if issubclass(w.category, ExportWarning)]
    assert len(notes) == 2, notes
    assert "dropout=0.1: in training PEFT's DoRA applies the dropout to the base input" in notes[0]
    assert "detach_norm=False: PEFT's DoRA always treats the row norm as a constant" in notes[1]
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["lora_dropout"] == 0.1
    with torch.no_grad():
        torch.testing.assert_close(run(peft_load("bert", tmp_path / "peft"), "bert"), y, **PEFT_TOL)


def test_export_peft_from_an_adapter_file(tmp_path):
    model = adapted("bert", "lora")
    path = doran.save_adapter(model, tmp_path / "adapter.safetensors")
    export_peft(path, tmp_path / "from_file")  # LoRA needs no base model
    export_peft(model, tmp_path / "from_model")
    with safe_open(str(tmp_path / "from_file" / "adapter_model.safetensors"), "pt") as f:
        from_file = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    from_model = load_file(str(tmp_path / "from_model" / "adapter_model.safetensors"))
    assert from_file.keys() == from_model.keys()
    assert all(torch.equal(from_file[k], from_model[k]) for k in from_file)

    vit = adapted("vit", "dora")
    path = doran.save_adapter(vit, tmp_path / "vit.safetensors")
    with pytest.raises(
        ExportError, match=r"DoRA on part of the rows of blocks\.0\.attn\.qkv .* needs the base"
    ):
        export_peft(path, tmp_path / "no_base")
    assert not (tmp_path / "no_base").exists()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExportWarning)
        export_peft(path, tmp_path / "with_base", base_model=FAMILIES["vit"][0]())
    with torch.no_grad():
        torch.testing.assert_close(
            run(peft_load("vit", tmp_path / "with_base"), "vit"), run(vit, "vit"), **PEFT_TOL
        )


@pytest.mark.parametrize(
    "preset, name",
    [("doran", "DoRAN"), ("replora", "RepLoRA"), ("hora", "HoRA"), ("prediag", "Pre-Diag"), ("sora", "SORA")],
)
def test_methods_without_a_peft_form_are_refused(preset, name, tmp_path):
    model = adapted("bert", preset)
    with pytest.raises(ExportError, match=rf"^{name} has no PEFT form; use --to merged .* Why: "):
        export_peft(model, tmp_path / "peft")
    path = doran.save_adapter(model, tmp_path / "a.safetensors")
    with pytest.raises(ExportError, match=rf"^{name} has no PEFT form"):
        export_peft(path, tmp_path / "peft")
    assert not (tmp_path / "peft").exists()


def test_export_refuses_a_non_empty_folder(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="exists and is not empty"):
        export_peft(adapted("bert", "lora"), tmp_path / "out")
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


# ============================================================================================== from PEFT
@pytest.mark.parametrize(
    "family, preset, overrides",
    [
        ("bert", "dora", {}),
        ("llama", "lora", {}),
        ("vit", "dora", {}),
        ("vit", "lora", {"targets": ("qkv", "fc2")}),
    ],
    ids=["bert-dora", "llama-lora", "vit-dora", "vit-lora-qkv+fc2"],
)
def test_round_trip_export_import_is_the_identity(family, preset, overrides, tmp_path):
    model = adapted(family, preset, **overrides)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExportWarning)
        export_peft(model, tmp_path / "peft")
    fresh = import_peft(FAMILIES[family][0](), tmp_path / "peft")
    assert doran.get_config(fresh) == doran.get_config(model)
    mine, back = adapter_tensors(model), adapter_tensors(fresh)
    assert mine.keys() == back.keys()
    assert all(torch.equal(mine[k], back[k]) for k in mine), [
        k for k in mine if not torch.equal(mine[k], back[k])
    ]
    with torch.no_grad():
        torch.testing.assert_close(run(fresh, family), run(model, family), rtol=0, atol=0)


def _peft_model(family: str, use_dora: bool, seed: int = 5, **config):
    """A PEFT model on a tiny base with every adapter tensor (and modules_to_save) randomised."""
    factory, targets, head, _, _ = FAMILIES[family]
    lora = peft.LoraConfig(
        r=config.pop("r", 4),
        lora_alpha=config.pop("lora_alpha", 8),
        lora_dropout=0.0,
        target_modules=list(config.pop("target_modules", targets)),
        use_dora=use_dora,
        modules_to_save=list(head),
        **config,
    )
    model = peft.get_peft_model(factory(), lora)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif "lora_" in name or "modules_to_save" in name:
                p.add_(0.3 * torch.randn(p.shape, generator=g) * (p.abs().mean() + 0.1))
    return model.eval()


IMPORT_CASES = [
    ("bert", False, dict(use_rslora=True, alpha_pattern={"value": 20})),  # per-module scales, folded into B
    ("bert", True, {}),
    ("llama", True, dict(rank_pattern={"v_proj": 2})),  # v_proj at rank 2: padded to 4 with zero factors
    ("vit", False, {}),  # PEFT's LoRA on the whole fused qkv: a whole-Linear doran adapter
    ("vit", True, {}),
]


@pytest.mark.parametrize(
    "family, use_dora, config",
    IMPORT_CASES,
    ids=["bert-lora-rslora-alpha_pattern", "bert-dora", "llama-dora-rank_pattern", "vit-lora", "vit-dora"],
)
def test_import_peft_gives_peft_outputs_and_exports_back(family, use_dora, config, tmp_path):
    theirs = _peft_model(family, use_dora, **config)
    theirs.save_pretrained(str(tmp_path / "peft"))
    y = assert_moved(theirs, family)
    mine = import_peft(FAMILIES[family][0](), tmp_path / "peft")
    cfg = doran.get_config(mine)
    assert cfg.magnitude == use_dora and cfg.fused_qkv == () and cfg.r == 4
    with torch.no_grad():
        torch.testing.assert_close(run(mine, family), y, **PEFT_TOL)
    export_peft(mine, tmp_path / "back")  # and back to PEFT: the same outputs again
    with torch.no_grad():
        torch.testing.assert_close(run(peft_load(family, tmp_path / "back"), family), y, **PEFT_TOL)


def _corrupt_config(folder: Path, **changes) -> None:
    path = folder / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


@pytest.mark.parametrize(
    "problem, match",
    [
        ("no_config", "no adapter_config.json"),
        ("ia3", "holds a IA3 adapter"),
        ("fan_in_fan_out", "fan_in_fan_out=True cannot be imported"),
        ("pissa", "init_lora_weights='pissa' may rewrite the base weights"),
        ("other_model", "adapts bert.encoder.layer.0.attention.self.query, which this model does not have"),
        ("injected", "already has doran adapters"),
        ("damaged", "not a readable safetensors file"),
    ],
)
def test_import_refuses_what_it_cannot_express_and_leaves_the_model(problem, match, tmp_path):
    folder = tmp_path / "peft"
    export_peft(adapted("bert", "lora"), folder)
    model = FAMILIES["bert"][0]()
    if problem == "no_config":
        (folder / "adapter_config.json").unlink()
    elif problem == "ia3":
        _corrupt_config(folder, peft_type="IA3")
    elif problem == "fan_in_fan_out":
        _corrupt_config(folder, fan_in_fan_out=True)
    elif problem == "pissa":
        _corrupt_config(folder, init_lora_weights="pissa")
    elif problem == "other_model":
        model = FAMILIES["llama"][0]()
    elif problem == "injected":
        doran.inject(model, doran.AdapterConfig.preset("lora", r=2))
    elif problem == "damaged":
        data = (folder / "adapter_model.safetensors").read_bytes()
        (folder / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ExportError, match=match):
        import_peft(model, folder)
    assert doran.is_injected(model) == (problem == "injected")
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


# ============================================================================================== merged
MERGED_CASES = [("bert", p) for p in sorted(doran.PRESETS)] + [
    ("vit", "doran"),
    ("vit", "hora"),
    ("vit", "sora"),
    ("llama", "doran"),
    ("llama", "hora"),
    ("llama", "sora"),
]

LOADER = textwrap.dedent("""
    import importlib.abc, json, sys
    from pathlib import Path

    class NoDoran(importlib.abc.MetaPathFinder):  # proof: any import of doran fails here
        def find_spec(self, name, path=None, target=None):
            if name == "doran" or name.startswith("doran."):
                raise ImportError("doran must not be needed to load an export")

    sys.meta_path.insert(0, NoDoran())
    import timm
    import torch
    import transformers
    from safetensors.torch import load_file, save_file

    torch.set_num_threads(2)
    jobs = json.loads(Path(sys.argv[1]).read_text())
    outputs = {}
    with torch.no_grad():
        for job in jobs:
            folder, inputs = job["folder"], load_file(job["inputs"])
            if job["kind"] == "timm":
                config = json.loads(Path(folder, "config.json").read_text())
                model = timm.create_model(config["architecture"], pretrained=False, **config["model_args"])
                model.load_state_dict(load_file(str(Path(folder, "model.safetensors"))))
                outputs[job["key"]] = model.eval()(**inputs).contiguous()
                hub_style = timm.create_model("local-dir:" + folder, pretrained=True).eval()
                outputs[job["key"] + "/local-dir"] = hub_style(**inputs).contiguous()
            else:
                model = getattr(transformers, job["auto"]).from_pretrained(folder).eval()
                outputs[job["key"]] = model(**inputs).logits.contiguous()
    assert "doran" not in sys.modules and not any(m.startswith("doran.") for m in sys.modules)
    save_file(outputs, sys.argv[2])
""")


def _fresh_python(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # and no path to this checkout
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="2")
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def test_merged_exports_load_without_doran_with_the_same_outputs(tmp_path):
    jobs, expected = [], {}
    auto = {"bert": "AutoModelForSequenceClassification", "llama": "AutoModelForCausalLM"}
    for family, preset in MERGED_CASES:
        model = adapted(family, preset)
        key = f"{family}-{preset}"
        expected[key] = assert_moved(model, family)
        folder = export_merged(model, tmp_path / key)
        inputs = FAMILIES[family][3](torch.Generator().manual_seed(123))  # what conftest.run feeds
        save_file(inputs, str(tmp_path / f"{key}.in.safetensors"))
        jobs.append(
            {
                "key": key,
                "folder": str(folder),
                "inputs": str(tmp_path / f"{key}.in.safetensors"),
                "kind": "timm" if family == "vit" else "transformers",
                "auto": auto.get(family),
            }
        )
        note = json.loads((folder / "doran_export.json").read_text())
        assert note["method"] == preset and note["kind"] == ("timm" if family == "vit" else "transformers")
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    done = _fresh_python(
        ["-c", LOADER, str(tmp_path / "jobs.json"), str(tmp_path / "out.safetensors")], cwd=tmp_path
    )  # a fresh process in which importing doran raises
    assert done.returncode == 0, done.stderr[-3000:]
    got = load_file(str(tmp_path / "out.safetensors"))
    for key, y in expected.items():
        torch.testing.assert_close(got[key], y, **MERGED_TOL, msg=key)
        if key.startswith("vit"):
            torch.testing.assert_close(got[key + "/local-dir"], y, **MERGED_TOL, msg=key)


def test_merged_timm_export_refuses_arguments_that_do_not_rebuild_it(tmp_path):
    model = adapted("vit", "lora")
    with pytest.raises(ExportError, match="does not rebuild this model"):
        export_merged(model, tmp_path / "vit", timm_kwargs={"num_classes": 3})  # default depth, width...
    assert not (tmp_path / "vit").exists()


# ============================================================================================== command
@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """A saved tiny BERT folder and a tiny ViT checkpoint, with the ViT's timm arguments."""
    root = tmp_path_factory.mktemp("bases")
    FAMILIES["bert"][0]().save_pretrained(str(root / "bert"))
    save_file(FAMILIES["vit"][0]().state_dict(), str(root / "vit.safetensors"))
    vit_kwargs = dict(img_size=32, patch_size=8, num_classes=3, depth=2, embed_dim=48, num_heads=3)
    return root, vit_kwargs


@pytest.mark.filterwarnings("ignore:'doran.export' found in sys.modules:RuntimeWarning")
def test_command_to_peft_end_to_end(bases, tmp_path, monkeypatch, capsys):
    import runpy

    root, _ = bases
    model = adapted("bert", "dora")
    doran.save_adapter(model, tmp_path / "adapter.safetensors")
    argv = [
        "python -m doran.export",
        str(tmp_path / "adapter.safetensors"),
        "--to",
        "peft",
        "--base",
        str(root / "bert"),
        "--out",
        str(tmp_path / "out"),
    ]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as done:  # what `python -m doran.export ...` runs
        runpy.run_module("doran.export", run_name="__main__", alter_sys=False)
    assert done.value.code == 0, capsys.readouterr().err
    assert "load it with peft.PeftModel.from_pretrained" in capsys.readouterr().out
    with torch.no_grad():
        torch.testing.assert_close(
            run(peft_load("bert", tmp_path / "out"), "bert"), run(model, "bert"), **PEFT_TOL
        )


def test_command_to_merged_timm(bases, tmp_path, capsys):
    import timm

    root, vit_kwargs = bases
    model = adapted("vit", "sora")
    doran.save_adapter(model, tmp_path / "adapter.safetensors")
    code = main(
        [
            str(tmp_path / "adapter.safetensors"),
            "--to",
            "merged",
            "--base",
            "timm:vit_tiny_patch16_224",
            "--base-kwargs",
            json.dumps(vit_kwargs),
            "--checkpoint",
            str(root / "vit.safetensors"),
            "--out",
            str(tmp_path / "out"),
        ]
    )
    assert code == 0, capsys.readouterr().err
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["architecture"] == "vit_tiny_patch16_224" and config["model_args"]["depth"] == 2
    loaded = timm.create_model(f"local-dir:{tmp_path / 'out'}", pretrained=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(run(loaded, "vit"), assert_moved(model, "vit"), **MERGED_TOL)


@pytest.mark.parametrize(
    "problem, match",
    [
        ("doran_to_peft", "DoRAN has no PEFT form; use --to merged"),
        ("out_not_empty", "exists and is not empty; give a new folder"),
        ("corrupt", "is corrupt or truncated|not a readable safetensors adapter file"),
        ("base_does_not_fit", "the base model does not fit the adapter: .* adapts module model.layers.0"),
        ("no_checkpoint", "needs --checkpoint FILE"),
        ("hub_name", "is not a local from_pretrained folder .* never downloads"),
        ("wrong_kwargs", "does not fit timm:vit_tiny_patch16_224 with --base-kwargs"),
        ("bad_json", "--base-kwargs is not valid JSON"),
    ],
)
def test_command_errors_exit_2_naming_problem_and_fix(problem, match, bases, tmp_path, capsys):
    root, vit_kwargs = bases
    family, preset = {"doran_to_peft": ("bert", "doran"), "base_does_not_fit": ("llama", "lora")}.get(
        problem, ("bert", "lora")
    )
    adapter = doran.save_adapter(adapted(family, preset), tmp_path / "adapter.safetensors")
    args = [str(adapter), "--to", "peft", "--base", str(root / "bert"), "--out", str(tmp_path / "out")]
    if problem == "out_not_empty":
        (tmp_path / "out").mkdir()
        (tmp_path / "out" / "x").write_text("")
    elif problem == "corrupt":
        adapter.write_bytes(adapter.read_bytes()[:100])
    elif problem == "no_checkpoint":
        args[4] = "timm:vit_tiny_patch16_224"
    elif problem == "hub_name":
        args[4] = "google-bert/bert-base-uncased"
    elif problem in ("wrong_kwargs", "bad_json"):
        kwargs = "{depth: 2" if problem == "bad_json" else json.dumps({**vit_kwargs, "embed_dim": 24})
        args[4:5] = [
            "timm:vit_tiny_patch16_224",
            "--base-kwargs",
            kwargs,
            "--checkpoint",
            str(root / "vit.safetensors"),
        ]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after any progress bar of transformers
    assert err.startswith("error: ") and re.search(match, err), err
    assert problem == "out_not_empty" or not (tmp_path / "out").exists()
