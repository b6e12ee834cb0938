"""The LightningModule and its callbacks, on a tiny random BERT and a tiny random timm ViT (CPU, seconds)."""

from __future__ import annotations

import math
import random

import lightning.pytorch as pl
import pytest
import torch

import doran
from doran.data import ClassificationDataModule, Split, TextCollate, TextDataset
from doran.training import (
    AdapterClassifier,
    GradNormRecorder,
    NonFiniteGuard,
    WeightsError,
    build_text_model,
    build_timm,
    default_callbacks,
    derive_seed,
    init_head,
    split_projection,
    warmup_cosine,
)

METHODS = ("lora", "dora", "doran")
WORDS = ["the", "a", "film", "plot", "actor", "scene", "story", "music", "camera", "score"]


def _texts(n: int, seed: int = 0) -> Split:
    rng = random.Random(seed)
    texts, labels = [], []
    for i in range(n):
        label = i % 2
        words = rng.choices(WORDS, k=6) + [("great" if label else "awful")] * 2
        rng.shuffle(words)
        texts.append(" ".join(words))
        labels.append(label)
    return Split(texts, labels, "synthetic")


@pytest.fixture(scope="module")
def tokenizer():
    return build_text_model("random-bert", 2)[1]


def _datamodule(tokenizer, n_train=24, seed=0, batch_size=8):
    sets = [TextDataset(_texts(n, s), tokenizer, 16) for n, s in ((n_train, 0), (8, 1), (8, 2))]
    return ClassificationDataModule(
        *sets,
        batch_size=batch_size,
        eval_batch_size=8,
        seed=seed,
        collate_fn=TextCollate(tokenizer.pad_token_id),
    )


def _module(method="doran", seed=0, lr=1e-2, **adapter):
    torch.manual_seed(123)  # the backbone's own random init (pretrained weights in real runs)
    model, _, _ = build_text_model("random-bert", 2)
    return AdapterClassifier(
        backbone={"kind": "text", "name": "random-bert"},
        method=method,
        adapter={"r": 2, "alpha": 4, **adapter},
        num_classes=2,
        head="classifier",
        trainable=["classifier"],
        lr=lr,
        weight_decay=0.01,
        warmup_ratio=0.1,
        seed=seed,
        model=model,
    )


def _trainer(callbacks=(), **kw):
    args = {
        "max_epochs": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        "accelerator": "cpu",
    }
    return pl.Trainer(callbacks=list(callbacks), **{**args, **kw})


# --------------------------------------------------------------------------------------------- the module
@pytest.mark.parametrize("method", METHODS)
def test_one_epoch_on_cpu_logs_the_standard_keys(tokenizer, method):
    module, dm = _module(method), _datamodule(tokenizer)
    trainer = _trainer()
    trainer.fit(module, datamodule=dm)
    assert {"train/loss", "val/acc", "val/loss"} <= set(trainer.callback_metrics)
    tested = trainer.test(module, datamodule=dm, verbose=False)[0]
    assert set(tested) == {"test/acc", "test/loss"} and 0 <= tested["test/acc"] <= 1
    assert trainer.global_step == 3


def test_hyperparameters_are_plain_values():
    module = _module("lora")
    assert "model" not in module.hparams
    assert module.hparams.method == "lora" and module.hparams.adapter == {"r": 2, "alpha": 4}


def test_no_weight_decay_on_one_dimensional_tensors(tokenizer):
    module = _module("doran")
    _trainer(max_steps=1).fit(module, datamodule=_datamodule(tokenizer))
    optimizer = module.optimizers().optimizer
    decays = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    trainable = [p for p in module.model.parameters() if p.requires_grad]
    assert set(decays) == {id(p) for p in trainable}
    assert doran.is_packed(module.model)  # the module packs in setup: a packed tensor's rows are the tensors
    for name, p, _ in doran.named_adapter_parameters(module.model):
        leaf = p if p.is_leaf else p._base
        assert decays[id(leaf)] == (0.01 if p.ndim >= 2 else 0.0), name


@pytest.mark.parametrize("step, expected", [(0, 0.1), (9, 1.0), (10, 1.0), (55, 0.5), (100, 0.0)])
def test_warmup_then_cosine(step, expected):
    assert warmup_cosine(step, total=100, warmup=10) == pytest.approx(expected, abs=1e-12)


def test_checkpoint_holds_adapter_tensors_only_and_reloads(tokenizer, tmp_path):
    module = _module("doran")
    trainer = _trainer(max_steps=2)
    trainer.fit(module, datamodule=_datamodule(tokenizer))
    path = tmp_path / "c.ckpt"
    trainer.save_checkpoint(path)
    ckpt = torch.load(path, weights_only=True)
    assert doran.is_packed(module.model)  # packed in setup; the checkpoint holds the unpacked names
    trainable = {f"model.{n}" for n in doran.packing.trainable_names(module.model)}
    unpacked = _module("doran")
    assert trainable == {f"model.{n}" for n, p in unpacked.model.named_parameters() if p.requires_grad}
    assert set(ckpt["state_dict"]) == trainable
    saved = sum(t.numel() for t in ckpt["state_dict"].values())
    assert saved < sum(t.numel() for t in module.state_dict().values()) / 10
    for fresh in (unpacked, _module("doran")):  # loads unpacked, and packed
        if fresh is not unpacked:
            doran.pack(fresh.model)
        fresh.load_state_dict(ckpt["state_dict"], strict=False)
        fresh.on_load_checkpoint(ckpt)
        got = fresh.model.state_dict()
        for name, p in module.model.state_dict().items():
            assert torch.equal(p, got[name]), name


# --------------------------------------------------------------------------------------------- callbacks
def test_tau_recorder_records_every_projection_by_layer(tokenizer):
    module, cbs = _module("doran"), default_callbacks(None, every_n_steps=1)
    _trainer(cbs.values()).fit(module, datamodule=_datamodule(tokenizer))
    cols = cbs["tau"].columns
    assert set(cols) == {"step", "layer", "projection", "module", "tau", "tau_abs"}
    assert sorted(set(cols["step"])) == [0, 1, 2, 3]
    assert len(cols["step"]) == 4 * 4  # 2 layers x (query, value) at each of 4 steps
    assert set(cols["projection"]) == {"query", "value"} and set(cols["layer"]) == {0, 1}
    first = [t for s, t in zip(cols["step"], cols["tau"]) if s == 0]
    assert first == pytest.approx([0.1] * 4)  # tau_init, relative units
    assert [t for s, t in zip(cols["step"], cols["tau"]) if s == 3] != pytest.approx(first)  # learned


def test_lora_records_no_tau_and_no_magnitude(tokenizer):
    module, cbs = _module("lora"), default_callbacks(None)
    _trainer(cbs.values()).fit(module, datamodule=_datamodule(tokenizer))
    assert cbs["tau"].columns == {} and cbs["magnitude"].columns == {}


def test_magnitude_statistics_start_unchanged_then_move(tokenizer):
    module, cbs = _module("dora"), default_callbacks(None, every_n_steps=1)
    _trainer(cbs.values()).fit(module, datamodule=_datamodule(tokenizer))
    cols = cbs["magnitude"].columns
    changes = {s: c for s, c in zip(cols["step"], cols["rel_change"])}
    assert changes[0] == 0.0 and changes[3] > 0.0
    assert all(lo <= mu <= hi for lo, mu, hi in zip(cols["min"], cols["mean"], cols["max"]))


@pytest.mark.parametrize(
    "method, groups", [("lora", {"factors", "other"}), ("doran", {"generator", "magnitude", "tau", "other"})]
)
def test_gradient_norm_per_group_every_step(tokenizer, method, groups):
    module, rec = _module(method), GradNormRecorder()
    _trainer([rec]).fit(module, datamodule=_datamodule(tokenizer))
    cols = rec.columns
    assert cols["step"] == [0, 1, 2] and set(cols) == {"step", "total", *groups}
    for row in range(3):
        parts = [cols[g][row] for g in groups]
        assert all(v > 0 for v in parts)
        assert math.sqrt(sum(v * v for v in parts)) == pytest.approx(cols["total"][row], rel=1e-6)


def test_gradient_norms_are_strided_past_the_cap(tokenizer):
    rec = GradNormRecorder(max_records=2)
    _trainer([rec]).fit(_module("lora"), datamodule=_datamodule(tokenizer))
    assert rec.stride == 2 and rec.columns["step"] == [0, 2]


def test_non_finite_loss_stops_the_run_and_records_step_and_cause(tokenizer):
    module, guard = _module("doran"), NonFiniteGuard()

    class PoisonAtStep2(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            def hook(mod, args, output):
                if pl_module.global_step >= 2:
                    output.logits = output.logits * float("nan")
                return output

            pl_module.model.register_forward_hook(hook)

    trainer = _trainer([PoisonAtStep2(), guard], max_epochs=5)
    trainer.fit(module, datamodule=_datamodule(tokenizer, n_train=64))  # 8 steps per epoch
    assert guard.failure is not None and guard.failure["step"] == 2
    assert "nan" in guard.failure["cause"]
    # stopped at once, not after 40 steps (the skipped step still counts as one optimizer call)
    assert trainer.global_step == 3
    assert all(torch.isfinite(p).all() for p in module.model.parameters())  # the bad step was not applied


def test_non_finite_gradient_is_dropped_and_recorded(tokenizer):
    module, guard = _module("lora"), NonFiniteGuard()

    class PoisonGrad(pl.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            if trainer.global_step == 1:
                next(p for p in pl_module.model.parameters() if p.requires_grad).grad.fill_(float("inf"))

    _trainer([PoisonGrad(), guard]).fit(module, datamodule=_datamodule(tokenizer))
    assert guard.failure["step"] == 1 and "non-finite gradient" in guard.failure["cause"]
    assert all(torch.isfinite(p).all() for p in module.model.parameters())


# --------------------------------------------------------------------------------------------- pairing
class _Recorder(pl.Callback):
    def __init__(self):
        self.indices, self.rng = [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.indices.append(batch["index"].tolist())
        self.rng.append(torch.get_rng_state())


def test_methods_with_the_same_seed_are_paired(tokenizer):
    """Same seed: same head initialisation, same batch order, same dropout stream for every method."""
    runs = {}
    for method in ("lora", "doran"):
        module, rec = _module(method, seed=5), _Recorder()
        head = module.model.classifier.weight.detach().clone()
        pl.seed_everything(derive_seed(5, "train"), verbose=False)
        _trainer([rec], max_epochs=2).fit(module, datamodule=_datamodule(tokenizer, seed=5))
        runs[method] = (head, rec)
    (head_a, rec_a), (head_b, rec_b) = runs["lora"], runs["doran"]
    assert torch.equal(head_a, head_b)
    assert rec_a.indices == rec_b.indices and len(rec_a.indices) == 6
    assert rec_a.indices[:3] != rec_a.indices[3:]  # a new order each epoch
    assert all(torch.equal(a, b) for a, b in zip(rec_a.rng, rec_b.rng))
    other = _module("lora", seed=6).model.classifier.weight
    assert not torch.equal(head_a, other)


def test_head_init_is_independent_of_the_global_rng():
    model_a, _, _ = build_text_model("random-bert", 2)
    model_b, _, _ = build_text_model("random-bert", 2)
    torch.manual_seed(0)
    init_head(model_a, "classifier", seed=11)
    torch.manual_seed(99)
    init_head(model_b, "classifier", seed=11)
    assert torch.equal(model_a.classifier.weight, model_b.classifier.weight)
    assert model_a.classifier.weight.std().item() == pytest.approx(0.02, rel=0.3)
    with pytest.raises(ValueError, match="no nn.Linear"):
        init_head(model_a, "nohead", seed=0)


def test_split_projection():
    assert split_projection("bert.encoder.layer.11.attention.self.value") == (11, "value")
    assert split_projection("blocks.3.attn.qkv.q") == (3, "q")
    assert split_projection("model.layers.0.self_attn.q_proj") == (0, "q_proj")


# --------------------------------------------------------------------------------------------- vision + weights
def test_tiny_vit_trains_through_the_same_module():
    from PIL import Image

    from doran.data import timm_transforms

    torch.manual_seed(0)
    model, info = build_timm("vit_tiny_patch16_224", 3, pretrained=False, img_size=32, patch_size=8, depth=2)
    assert info == {"pretrained": False, "weights": None}
    module = AdapterClassifier(
        backbone={},
        method="doran",
        adapter={"r": 2, "alpha": 4, "targets": ["qkv"]},
        num_classes=3,
        head="head",
        trainable=["head"],
        seed=0,
        model=model,
    )
    assert module.adapted == ["blocks.0.attn.qkv", "blocks.1.attn.qkv"]
    _, eval_tf = timm_transforms(model)
    images = [Image.new("RGB", (40, 40), (90 * (i % 3), 30, 60)) for i in range(6)]
    batch = {
        "pixel_values": torch.stack([eval_tf(im) for im in images]),  # (6, 3, 32, 32)
        "labels": torch.tensor([i % 3 for i in range(6)]),
    }
    loss, pred, _ = module.model_step(batch)
    assert batch["pixel_values"].shape == (6, 3, 32, 32) and pred.shape == (6,) and torch.isfinite(loss)
    loss.backward()
    assert set(doran.tau_values(module.model)) == {
        "blocks.0.attn.qkv.q",
        "blocks.0.attn.qkv.v",
        "blocks.1.attn.qkv.q",
        "blocks.1.attn.qkv.v",
    }


def test_pretrained_vit_without_weights_is_a_clear_error_not_a_random_init(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.try_to_load_from_cache", lambda *a, **k: None)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(WeightsError, match=r"not in the local hub cache.*model\.checkpoint="):
        build_timm("vit_base_patch16_224.orig_in21k", 10, pretrained=True)
    with pytest.raises(WeightsError, match="no such file"):
        build_timm("vit_tiny_patch16_224", 10, checkpoint=str(tmp_path / "missing.safetensors"))


def test_vit_loads_a_local_checkpoint_file(tmp_path):
    from safetensors.torch import save_file

    kw = {"img_size": 32, "patch_size": 8, "depth": 2}
    torch.manual_seed(1)
    source, _ = build_timm("vit_tiny_patch16_224", 3, pretrained=False, **kw)
    path = tmp_path / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    torch.manual_seed(2)
    loaded, info = build_timm("vit_tiny_patch16_224", 3, checkpoint=str(path), **kw)
    assert info["pretrained"] and info["weights"] == str(path)
    assert torch.equal(loaded.blocks[1].attn.qkv.weight, source.blocks[1].attn.qkv.weight)


# ------------------------------------------------------------------------------------- the loop's cost
def test_gradient_norms_equal_a_direct_computation(tokenizer):
    import doran

    class Direct(pl.Callback):  # the norms as the recorder used to compute them, one tensor at a time
        def __init__(self):
            self.rows = []

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            parts = {}
            for p, group, _ in doran.adapter_leaves(pl_module.model):
                if p.grad is not None:
                    parts[group] = parts.get(group, 0.0) + p.grad.double().pow(2).sum().item()
            self.rows.append({g: math.sqrt(v) for g, v in parts.items()})

    direct, rec = Direct(), GradNormRecorder(flush_every=2)
    _trainer([rec, direct]).fit(_module("doran"), datamodule=_datamodule(tokenizer))
    assert len(direct.rows) == 3 == len(rec.columns["step"])
    for i, row in enumerate(direct.rows):
        for group, value in row.items():
            assert rec.columns[group][i] == pytest.approx(value, rel=1e-5)


def test_gradient_norms_under_a_loss_scale_are_in_the_losss_units():
    """float16 mixed precision with an optimizer that unscales inside its step (fused AdamW on a GPU): at
    on_before_optimizer_step the gradients still carry the loss scale; the recorder divides it out and records
    it. Once unscaled (Lightning's own unscale_ before the hook), nothing is divided twice."""
    from types import SimpleNamespace

    import doran

    module = _module("doran")
    params = [p for p, _, _ in doran.adapter_leaves(module.model) if p.requires_grad]
    torch.manual_seed(0)
    true = [torch.randn_like(p) for p in params]
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    scaler.scale(torch.ones(()))  # the scale tensor exists once a loss was scaled
    optimizer = torch.optim.AdamW(params)
    trainer = SimpleNamespace(global_step=0, precision_plugin=SimpleNamespace(scaler=scaler))
    rec = GradNormRecorder()
    for p, g in zip(params, true):
        p.grad = g * 1024.0
    rec.on_before_optimizer_step(trainer, module, optimizer)
    scaler.unscale_(optimizer)  # now the gradients are the true ones, and the scaler knows it
    trainer.global_step = 1
    rec.on_before_optimizer_step(trainer, module, optimizer)
    rec._flush()
    expect = math.sqrt(sum(g.double().square().sum().item() for g in true))
    assert rec.columns["total"] == pytest.approx([expect, expect], rel=1e-5)
    assert rec.columns["loss_scale"] == [1024.0, None]
    plain = GradNormRecorder()  # no scaler (float32, bf16): no column
    plain.on_before_optimizer_step(SimpleNamespace(global_step=0, precision_plugin=SimpleNamespace()), module,
                                   optimizer)
    plain._flush()
    assert "loss_scale" not in plain.columns and plain.columns["total"] == pytest.approx([expect], rel=1e-5)


@pytest.mark.parametrize("epochs, most, validated", [(6, 2, {2, 5}), (38, 8, {4, 9, 13, 18, 23, 27, 32, 37}),
                                                     (3, 0, {0, 1, 2}), (3, 5, {0, 1, 2})])
def test_validation_schedule_spaces_validations_and_keeps_the_last(tokenizer, epochs, most, validated):
    from doran.training import HistoryRecorder, ValidationSchedule

    assert ValidationSchedule(epochs, most).epochs == validated
    if epochs > 6:
        return
    history = HistoryRecorder()
    _trainer([ValidationSchedule(epochs, most), history], max_epochs=epochs).fit(
        _module("lora"), datamodule=_datamodule(tokenizer))
    got = {e for e, acc in zip(history.epochs["epoch"], history.epochs["val_acc"]) if acc is not None}
    assert got == validated


def test_checkpoints_at_epoch_ends_wait_for_the_interval(tokenizer, tmp_path):
    from doran.training import AdapterCheckpoint

    often, rare = AdapterCheckpoint(tmp_path / "a"), AdapterCheckpoint(tmp_path / "b", min_interval_s=3600)
    saves = {"a": 0, "b": 0}
    for key, cb in (("a", often), ("b", rare)):
        original = cb._save

        def counted(trainer, _original=original, _key=key):
            saves[_key] += 1
            _original(trainer)

        cb._save = counted
        _trainer([cb], max_epochs=3).fit(_module("lora"), datamodule=_datamodule(tokenizer))
    assert saves == {"a": 3, "b": 0} and often.last.is_file() and not rare.last.exists()


def test_short_runs_are_not_compiled():
    from experiments.run import compile_mode, load_config

    cfg = load_config(None, ["runtime.compile_min_steps=300"])
    assert compile_mode(cfg, 299) == "none" and compile_mode(cfg, 300) == "auto"
    explicit = load_config(None, ["runtime.compile_min_steps=300", "runtime.compile=default"])
    assert compile_mode(explicit, 10) == "default"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("poison", ["loss", "grad"])
def test_on_a_gpu_a_non_finite_step_is_skipped_on_the_device_and_recorded(tokenizer, poison):
    module, guard = _module("doran"), NonFiniteGuard(poll_every=4)
    seen = {}

    class Poison(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            def hook(mod, args, output):
                if poison == "loss" and pl_module.global_step == 2:
                    output.logits = output.logits * float("nan")
                return output

            pl_module.model.register_forward_hook(hook)

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            if trainer.global_step == 2:
                if poison == "grad":
                    next(p for p in pl_module.model.parameters() if p.requires_grad and p.grad is not None).grad.fill_(
                        float("inf"))
                seen["before"] = [p.detach().clone() for p in pl_module.model.parameters() if p.requires_grad]

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 3 and "after" not in seen:
                seen["after"] = [p.detach().clone() for p in pl_module.model.parameters() if p.requires_grad]

    trainer = _trainer([Poison(), guard], max_epochs=5, accelerator="gpu", devices=1, precision="bf16-mixed")
    trainer.fit(module, datamodule=_datamodule(tokenizer, n_train=64))
    assert guard.failure is not None and guard.failure["step"] == 2 and "skipped" in guard.failure["cause"]
    assert trainer.global_step == 4  # stopped at the next poll, not after 40 steps
    for a, b in zip(seen["before"], seen["after"]):  # the poisoned step changed nothing
        assert torch.equal(a, b)
    assert all(torch.isfinite(p).all() for p in module.model.parameters())
