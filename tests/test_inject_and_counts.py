"""Bad input is refused before the model changes; parameter counts equal the closed form; pairing."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import FAMILIES, perturb, run, tiny_bert, tiny_llama, tiny_vit
from torch import nn

import doran


def snapshot(model):
    return ({n: (p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()},
            [(n, type(m)) for n, m in model.named_modules()])


def assert_unchanged(model, snap):
    params, modules = snapshot(model)
    assert modules == snap[1]
    assert params.keys() == snap[0].keys()
    for n, (t, rg) in snap[0].items():
        assert torch.equal(params[n][0], t) and params[n][1] == rg, n
    assert not hasattr(model, doran.inject.__globals__["STATE_ATTR"])


@pytest.mark.parametrize("kwargs, match", [
    (dict(targets=("qurey",)), r"nearest names: .*attention\.self\.query"),
    (dict(targets=("query", "valu")), r"nothing ends with 'valu'.*value"),
    (dict(targets=("attention",)), "not an nn.Linear"),
    (dict(r=64), r"rank r=64 is larger .* use r <= 32"),
    (dict(target_regex=r"nothing\.here"), "no nn.Linear matches target_regex"),
])
def test_bad_targets_and_rank_leave_model_unchanged(kwargs, match):
    model = tiny_bert()
    snap = snapshot(model)
    with pytest.raises(doran.InjectError, match=match):
        doran.inject(model, doran.AdapterConfig.preset("doran", **kwargs))
    assert_unchanged(model, snap)


@pytest.mark.parametrize("kwargs, match", [
    (dict(r=0), "positive integer"),
    (dict(r=-2), "positive integer"),
    (dict(alpha=0), "alpha"),
    (dict(tau_init=-0.1), "negative"),
    (dict(sharing="qv_fully"), "unknown sharing variant"),
    (dict(tau_mode="learnt"), "unknown tau_mode"),
    (dict(dropout=1.0), "dropout"),
    (dict(tau_init=0.0), "tau_init > 0"),
    (dict(gen_activation="swish"), "unknown gen_activation"),
    (dict(nonsense=1), "unknown AdapterConfig field"),
])
def test_bad_config_values_raise_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        doran.AdapterConfig.preset("doran", **kwargs)


def test_unknown_preset_and_lora_with_tau():
    with pytest.raises(doran.ConfigError, match="unknown preset 'dorann'.*'doran'"):
        doran.AdapterConfig.preset("dorann")
    with pytest.raises(doran.ConfigError, match="magnitude=True"):
        doran.AdapterConfig.preset("lora", tau_mode="learned")


def test_inject_twice_is_refused():
    model = tiny_bert()
    doran.inject(model, doran.AdapterConfig.preset("lora"))
    snap = snapshot(model)
    with pytest.raises(doran.InjectError, match="already has doran adapters"):
        doran.inject(model, doran.AdapterConfig.preset("dora"))
    _, modules = snapshot(model)
    assert modules == snap[1]


def test_fused_qkv_not_divisible_by_three():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = nn.Linear(8, 20)

    model = M()
    snap = snapshot(model)
    with pytest.raises(doran.InjectError, match="not divisible by 3.*fused_qkv=()"):
        doran.inject(model, doran.AdapterConfig.preset("lora", r=2, targets=("qkv",)))
    assert_unchanged(model, snap)
    doran.inject(model, doran.AdapterConfig.preset("lora", r=2, targets=("qkv",), fused_qkv=()))
    assert set(model.qkv.doran) == {"all"}


def test_sharing_that_needs_equal_widths_is_refused_on_gqa_llama():
    model = tiny_llama()  # v_proj is narrower than q_proj (grouped-query attention)
    snap = snapshot(model)
    with pytest.raises(doran.InjectError, match="equal widths.*qv_first"):
        doran.inject(model, doran.AdapterConfig.preset("doran", r=4, targets=("q_proj", "v_proj"),
                                                       sharing="qv_full"))
    assert_unchanged(model, snap)


def test_unknown_trainable_module():
    model = tiny_bert()
    snap = snapshot(model)
    with pytest.raises(doran.InjectError, match="classifer.*classifier"):
        doran.inject(model, doran.AdapterConfig.preset("lora"), trainable=("classifer",))
    assert_unchanged(model, snap)


# ------------------------------------------------------------------------------------------ counts
def closed_form(cfg, shapes_by_block, head=0):
    """Trainable parameters from the shapes alone. shapes_by_block: {block: [(d_in, d_out), ...]}."""
    r, k, h = cfg.r, cfg.gen_embed, cfg.gen_hidden
    total = head
    first = 2 * (k * h + h)  # first layers for A and B (weight + bias)
    global_done = False
    for projs in shapes_by_block.values():
        for d_in, d_out in projs:
            if cfg.factors == "static":
                total += r * (d_in + d_out)
            else:
                total += 2 * r * k  # embeddings e_A, e_B
                if cfg.sharing == "none":
                    total += first + h * (d_in + d_out)
                elif cfg.sharing == "qv_first":
                    total += h * (d_in + d_out)
            if cfg.magnitude:
                total += d_out
                if cfg.tau_mode == "learned":
                    total += d_out if cfg.tau_granularity == "row" else 1
        if cfg.factors == "generated":
            d_in, d_out = projs[0]
            if cfg.sharing == "qv_first":
                total += first
            elif cfg.sharing == "qv_full":
                total += first + h * (d_in + d_out)
            elif cfg.sharing == "global" and not global_done:
                total += first + h * (d_in + d_out)
                global_done = True
    return total


VARIANTS = [("lora", {}), ("dora", {}), ("doran", {}), ("doran", dict(tau_granularity="row")),
            ("doran", dict(tau_mode="fixed")), ("doran", dict(factors="static")),
            ("doran", dict(sharing="none")), ("doran", dict(sharing="qv_full")),
            ("doran", dict(sharing="global")), ("lora", dict(factors="generated", sharing="none"))]


@pytest.mark.parametrize("preset, overrides", VARIANTS, ids=lambda v: str(v))
@pytest.mark.parametrize("fam", ["bert", "vit"])
def test_trainable_counts_equal_closed_form(fam, preset, overrides):
    factory, targets, head, _, _ = FAMILIES[fam]
    model = factory()
    cfg = doran.AdapterConfig.preset(preset, r=4, targets=targets, **overrides)
    doran.inject(model, cfg, trainable=head)
    d = 32 if fam == "bert" else 48
    blocks = {i: [(d, d), (d, d)] for i in range(2)}  # q and v per block, both d x d
    head_params = sum(p.numel() for p in model.get_submodule(head[0]).parameters())
    counts = doran.trainable_parameter_counts(model)
    assert counts["trainable"] == closed_form(cfg, blocks, head_params)
    assert counts["trainable"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert counts["other"] == head_params


def test_qv_first_shares_first_layers_within_a_block_only():
    model = tiny_bert()
    doran.inject(model, doran.AdapterConfig.preset("doran", r=4))
    layer0 = model.bert.encoder.layer[0].attention.self
    layer1 = model.bert.encoder.layer[1].attention.self
    gq, gv = layer0.query.doran["all"].generator, layer0.value.doran["all"].generator
    assert gq.first_A is gv.first_A and gq.first_B is gv.first_B
    assert gq.second_A is not gv.second_A and gq.emb_A is not gv.emb_A
    assert gq.first_A is not layer1.query.doran["all"].generator.first_A


def test_block_regex_overrides_pairing():
    model = tiny_bert()
    # one block for the whole encoder: every projection shares one first layer
    doran.inject(model, doran.AdapterConfig.preset("doran", r=4, block_regex=r"encoder"))
    gens = [ad.generator for _, ad, _ in doran.slice_adapters(model)]
    assert all(g.first_A is gens[0].first_A for g in gens)


def test_vit_q_and_v_slices_share_like_a_block():
    model = tiny_vit()
    doran.inject(model, doran.AdapterConfig.preset("doran", r=4, targets=("qkv",)))
    qkv = model.blocks[0].attn.qkv
    assert qkv.doran["q"].generator.first_A is qkv.doran["v"].generator.first_A


# ------------------------------------------------------------------------------------------ utilities
def test_tau_values_and_param_groups_with_own_tau_lr():
    model = tiny_bert()
    doran.inject(model, doran.AdapterConfig.preset("doran", r=4, tau_init=0.25, tau_lr=0.05),
                 trainable=("classifier",))
    taus = doran.tau_values(model)
    assert len(taus) == 4 and all(abs(t - 0.25) < 1e-6 for t in taus.values())
    absolute = doran.tau_values(model, absolute=True)
    for name, t in absolute.items():
        w = model.get_submodule(name).weight
        assert abs(t - 0.25 * torch.linalg.vector_norm(w, dim=1).mean().item()) < 1e-6
    groups = {g["name"]: g for g in doran.param_groups(model, lr=1e-3, weight_decay=0.1)}
    assert groups["tau"]["lr"] == 0.05 and groups["tau"]["weight_decay"] == 0
    assert all(p.ndim < 2 for p in groups["no_decay"]["params"])  # magnitudes, biases
    assert all(p.ndim >= 2 for p in groups["decay"]["params"])
    n_groups = sum(len(g["params"]) for g in groups.values())
    assert n_groups == sum(1 for p in model.parameters() if p.requires_grad)


def test_tau_is_learned_and_moves():
    model = tiny_bert()
    doran.inject(model, doran.AdapterConfig.preset("doran", r=4), trainable=("classifier",))
    perturb(model)
    opt = torch.optim.AdamW(doran.param_groups(model, lr=1e-2))
    before = doran.tau_values(model)
    model.train()
    for _ in range(3):
        loss = torch.nn.functional.cross_entropy(run(model, "bert"), torch.tensor([0, 1]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = doran.tau_values(model)
    assert all(after[k] != before[k] for k in before)


def test_dropout_only_on_low_rank_input():
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("proj", nn.Linear(16, 8))
    doran.inject(model, doran.AdapterConfig.preset("dora", r=2, targets=("proj",), dropout=0.5))
    perturb(model)
    x = torch.randn(4, 16)
    layer = model.proj
    ad = layer.doran["all"]
    layer.train()
    torch.manual_seed(1)
    y = layer(x)
    torch.manual_seed(1)
    xd = ad.drop(x)
    A, B = ad.factors()
    g = ad.norm_scale(layer.weight, A, B)
    expected = g * (x @ layer.weight.t() + ad.s * xd @ A.t() @ B.t()) + layer.bias
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-6)


def test_cached_row_norm_follows_weight_changes():
    model = tiny_bert()
    doran.inject(model, doran.AdapterConfig.preset("dora", r=4))
    q = model.bert.encoder.layer[0].attention.self.query
    ad = q.doran["all"]
    w0_sq, _ = ad._weight_stats(q.weight)
    with torch.no_grad():
        q.weight.mul_(2.0)
    w1_sq, _ = ad._weight_stats(q.weight)
    torch.testing.assert_close(w1_sq, 4 * w0_sq)


def test_model_copy_keeps_generator_sharing():
    model = tiny_bert()
    doran.inject(model, doran.AdapterConfig.preset("doran", r=4))
    clone = copy.deepcopy(model)
    sa = clone.bert.encoder.layer[0].attention.self
    assert sa.query.doran["all"].generator.first_A is sa.value.doran["all"].generator.first_A
