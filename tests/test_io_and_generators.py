"""Adapter files that do not fit are refused without changing the model; generator initialisation."""

from __future__ import annotations

import pytest
import torch
from conftest import perturb, tiny_bert, tiny_llama
from test_inject_and_counts import assert_unchanged, snapshot
from torch import nn

import doran
from doran.generators import lora_a_std


@pytest.fixture()
def saved(tmp_path):
    model = tiny_bert()
    doran.inject(model, doran.AdapterConfig.preset("doran", r=4), trainable=("classifier",))
    perturb(model)
    return model, doran.save_adapter(model, tmp_path / "a.safetensors")


def test_load_into_other_shapes_is_refused(saved):
    _, path = saved
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    other = BertForSequenceClassification(BertConfig(vocab_size=97, hidden_size=48, num_hidden_layers=2,
                                                     num_attention_heads=4, intermediate_size=64,
                                                     num_labels=3))
    snap = snapshot(other)
    with pytest.raises(doran.AdapterFileError, match="shape"):
        doran.load_adapter(other, path)
    assert_unchanged(other, snap)


def test_load_into_other_architecture_is_refused(saved):
    _, path = saved
    other = tiny_llama()
    snap = snapshot(other)
    with pytest.raises(doran.AdapterFileError, match="does not have"):
        doran.load_adapter(other, path)
    assert_unchanged(other, snap)


def test_load_into_model_with_other_config_is_refused(saved):
    _, path = saved
    other = tiny_bert()
    doran.inject(other, doran.AdapterConfig.preset("dora", r=4), trainable=("classifier",))
    before = {n: p.detach().clone() for n, p in other.named_parameters()}
    with pytest.raises(doran.AdapterFileError, match="another config.*factors"):
        doran.load_adapter(other, path)
    assert all(torch.equal(p, before[n]) for n, p in other.named_parameters())


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty", "missing"])
def test_corrupt_adapter_file_is_refused(saved, tmp_path, damage):
    _, path = saved
    bad = tmp_path / "bad.safetensors"
    data = path.read_bytes()
    if damage == "truncate":
        bad.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        bad.write_bytes(b"\x00\x01not a safetensors file" * 10)
    elif damage == "empty":
        bad.write_bytes(b"")
    model = tiny_bert()
    snap = snapshot(model)
    with pytest.raises(doran.AdapterFileError, match="no adapter file|corrupt|not a"):
        doran.load_adapter(model, bad)
    assert_unchanged(model, snap)


def test_file_with_nan_is_refused(saved, tmp_path):
    model, _ = saved
    with torch.no_grad():
        next(p for n, p, g in doran.named_adapter_parameters(model) if g == "magnitude")[0] = float("nan")
    path = doran.save_adapter(model, tmp_path / "nan.safetensors")
    fresh = tiny_bert()
    snap = snapshot(fresh)
    with pytest.raises(doran.AdapterFileError, match="NaN"):
        doran.load_adapter(fresh, path)
    assert_unchanged(fresh, snap)


def test_save_is_atomic_and_overwrites(saved, tmp_path):
    model, path = saved
    size = path.stat().st_size
    doran.save_adapter(model, path)
    assert path.stat().st_size == size
    assert [p.name for p in path.parent.iterdir() if p.name.endswith(".tmp")] == []


# ------------------------------------------------------------------------------------------ generators
def test_generated_A_starts_at_loras_scale_and_B_at_zero():
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("proj", nn.Linear(256, 128))
    doran.inject(model, doran.AdapterConfig.preset("doran", r=16, targets=("proj",)))
    A, B = model.proj.doran["all"].factors()
    assert abs(A.std().item() - lora_a_std(256)) < 1e-6
    assert torch.equal(B, torch.zeros_like(B))


def one_step_update(preset: str, seed: int, lr: float = 1e-3, **overrides) -> tuple[float, float]:
    """||delta A||_F and ||delta (B A)||_F after Adam steps from the same data (relative to the init)."""
    torch.manual_seed(seed)
    d = 64
    model = nn.Sequential()
    model.add_module("proj", nn.Linear(d, d))
    doran.inject(model, doran.AdapterConfig.preset(preset, r=8, targets=("proj",), **overrides))
    ad = model.proj.doran["all"]
    A0, _ = (t.detach().clone() for t in ad.factors())
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    g = torch.Generator().manual_seed(99)
    x, target = torch.randn(32, d, generator=g), torch.randn(32, d, generator=g)
    for _ in range(5):
        loss = (model(x) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    A1, B1 = (t.detach() for t in ad.factors())
    return (A1 - A0).norm().item(), (B1 @ A1).norm().item()


def test_generated_factors_step_within_a_known_band_of_static_ones():
    """Under Adam at the same lr, the generator moves A about 1.3-1.8x and B A about 0.35-0.45x as far as
    static LoRA factors (r 4-16, hidden 16-64, measured when this test was written), independent of the
    hidden width thanks to the 1/hidden output multiplier. Methods are compared at their own tuned lr."""
    ratios_A, ratios_BA = [], []
    for seed in range(3):
        a_static, ba_static = one_step_update("lora", seed)
        a_gen, ba_gen = one_step_update("lora", seed, factors="generated", sharing="none")
        ratios_A.append(a_gen / a_static)
        ratios_BA.append(ba_gen / ba_static)
    mean_A, mean_BA = sum(ratios_A) / 3, sum(ratios_BA) / 3
    assert 1.0 < mean_A < 2.0, ratios_A
    assert 0.2 < mean_BA < 0.6, ratios_BA
