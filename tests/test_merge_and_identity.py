"""Identity at step 0, merge / unmerge / merged_copy, save / load: each on BERT, LLaMA and a timm ViT."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import FAMILIES, perturb, run

import doran

PRESETS = sorted(doran.PRESETS)


def adapted(family: str, preset: str, **overrides):
    factory, targets, head, _, _ = FAMILIES[family]
    base = factory()
    model = copy.deepcopy(base)
    cfg = doran.AdapterConfig.preset(preset, r=4, alpha=8, targets=targets, **overrides)
    doran.inject(model, cfg, trainable=head)
    return base, model.eval()


@pytest.mark.parametrize("preset", PRESETS)
def test_identity_at_step_zero(family, preset):
    base, model = adapted(family, preset)
    with torch.no_grad():
        torch.testing.assert_close(run(model, family), run(base, family), rtol=0, atol=1e-6)


@pytest.mark.parametrize("overrides", [dict(tau_mode="fixed", tau_init=0.5), dict(tau_granularity="row"),
                                       dict(sharing="none"), dict(sharing="global", targets=None)])
def test_identity_at_step_zero_variants(overrides):
    if overrides.get("targets", 1) is None:  # global sharing needs equal shapes: BERT query/value
        overrides = {k: v for k, v in overrides.items() if k != "targets"}
    base, model = adapted("bert", "doran", **overrides)
    with torch.no_grad():
        torch.testing.assert_close(run(model, "bert"), run(base, "bert"), rtol=0, atol=1e-6)


@pytest.mark.parametrize("preset", PRESETS)
def test_merged_equals_unmerged_and_unmerge_restores_w0(family, preset):
    base, model = adapted(family, preset)
    perturb(model)
    w0 = {n: m.weight.detach().clone() for n, m in doran.adapted_modules(model)}
    with torch.no_grad():
        y = run(model, family)
        y_base = run(base, family)
        assert (y - y_base).abs().max() > 1e-2 * y_base.abs().max()  # the perturbation changes the output
        doran.merge(model)
        torch.testing.assert_close(run(model, family), y, rtol=1e-5, atol=1e-5)
        changed = [n for n, m in doran.adapted_modules(model) if not torch.equal(m.weight, w0[n])]
        assert changed == list(w0)  # every adapted weight was rewritten
        doran.unmerge(model)
        for n, m in doran.adapted_modules(model):
            assert torch.equal(m.weight, w0[n])  # bit for bit
        torch.testing.assert_close(run(model, family), y, rtol=0, atol=0)


@pytest.mark.parametrize("preset", PRESETS)
def test_merged_copy_is_plain_and_equal(family, preset):
    _, model = adapted(family, preset)
    perturb(model)
    plain = doran.merged_copy(model)
    assert not any(isinstance(m, doran.AdaptedLinear) for m in plain.modules())
    assert not doran.is_injected(plain)
    with torch.no_grad():
        torch.testing.assert_close(run(plain, family), run(model, family), rtol=1e-5, atol=1e-5)
    assert doran.is_injected(model)  # the original keeps its adapters


@pytest.mark.parametrize("preset", PRESETS)
def test_save_load_reproduces_outputs_exactly(family, preset, tmp_path):
    factory, *_ = FAMILIES[family]
    _, model = adapted(family, preset)
    perturb(model)
    path = doran.save_adapter(model, tmp_path / "adapter.safetensors")
    fresh = factory().eval()  # same base weights (same seed), no adapters
    doran.load_adapter(fresh, path)
    with torch.no_grad():
        assert torch.equal(run(fresh, family), run(model, family))
    assert doran.get_config(fresh) == doran.get_config(model)
    # also into an already injected model of the same config
    _, other = adapted(family, preset)
    doran.load_adapter(other, path)
    with torch.no_grad():
        assert torch.equal(run(other, family), run(model, family))


def test_vit_k_rows_untouched_bit_for_bit():
    base, model = adapted("vit", "doran")
    perturb(model)
    qkv = model.blocks[0].attn.qkv
    d = qkv.in_features
    assert set(qkv.doran) == {"q", "v"}
    x = torch.randn(2, 5, d)
    with torch.no_grad():
        y = qkv(x)
        y_base = torch.nn.functional.linear(x, base.blocks[0].attn.qkv.weight, base.blocks[0].attn.qkv.bias)
        assert torch.equal(y[..., d : 2 * d], y_base[..., d : 2 * d])  # k output untouched
        assert not torch.allclose(y[..., :d], y_base[..., :d])  # q adapted
        assert not torch.allclose(y[..., 2 * d :], y_base[..., 2 * d :])  # v adapted
        doran.merge(model)
        assert torch.equal(qkv.weight[d : 2 * d], base.blocks[0].attn.qkv.weight[d : 2 * d])  # k weight rows
        doran.unmerge(model)


def test_training_while_merged_is_refused():
    _, model = adapted("bert", "dora")
    doran.merge(model)
    model.train()
    with pytest.raises(RuntimeError, match="unmerge"):
        run(model, "bert")
    doran.unmerge(model)
    run(model, "bert").sum().backward()


def test_eject_restores_the_plain_model():
    base, model = adapted("bert", "doran")
    perturb(model)
    doran.eject(model)
    assert not doran.is_injected(model)
    with torch.no_grad():
        assert torch.equal(run(model, "bert"), run(base, "bert"))


def test_only_adapters_and_head_train(family):
    _, model = adapted(family, "doran")
    head = FAMILIES[family][2][0]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable
    assert all(".doran." in n or head in n for n in trainable)
    run(model.train(), family).float().pow(2).mean().backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads <= trainable
