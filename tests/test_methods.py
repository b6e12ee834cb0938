"""RepLoRA, HoRA, Pre-Diag and SORA as switches of the one core: counts, gradients, rotation, heads, merge.

Identity at step 0, merge / merged_copy and save / load of every preset on BERT, LLaMA and ViT run in
test_merge_and_identity.py (parametrised over doran.PRESETS); the float64 materialising reference of every
form is in test_oracles.py.
"""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import pytest
import torch
from conftest import FAMILIES, perturb, run, tiny_bert, tiny_llama
from test_inject_and_counts import assert_unchanged, snapshot
from torch import nn

import doran
from doran.layers import OutputRotation

NEW = ("replora", "hora", "prediag", "sora")


def load_param_table():
    path = Path(__file__).resolve().parents[1] / "experiments" / "param_table.py"
    spec = importlib.util.spec_from_file_location("param_table", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Wrap(nn.Module):
    def __init__(self, d_in=12, d_out=10, bias=True, dtype=torch.float64):
        super().__init__()
        self.proj = nn.Linear(d_in, d_out, bias=bias, dtype=dtype)


# ------------------------------------------------------------------------------------------ config
def test_new_presets_are_switches_of_the_one_config():
    assert set(NEW) <= set(doran.PRESETS)
    assert set(doran.PRESET_FORMS) == set(doran.PRESETS)
    replora, hora = doran.AdapterConfig.preset("replora"), doran.AdapterConfig.preset("hora")
    prediag, sora = doran.AdapterConfig.preset("prediag"), doran.AdapterConfig.preset("sora")
    assert (replora.factors, replora.sharing, replora.magnitude) == ("generated", "none", False)
    assert replora.heads is None
    assert (hora.factors, hora.sharing, hora.heads) == ("generated", "qv_full", "auto")
    assert prediag.diag and not prediag.magnitude and prediag.rotation_rank == 0
    assert sora.diag and sora.rotation_rank > 0 and not sora.rotate_bias
    assert sora.replace(rotation_rank=0, method="prediag") == prediag  # SORA = Pre-Diag + rotation


@pytest.mark.parametrize("kwargs, match", [
    (dict(diag=True, magnitude=True), "redundant"),
    (dict(rotate_bias=True), "needs a rotation"),
    (dict(rotation_rank=-1), "rotation_rank"),
    (dict(rotation_rank=2, rotation_s0=0.0), "rotation_s0"),
    (dict(heads=0), "heads=0"),
    (dict(heads="many"), "heads='many'"),
    (dict(heads=True), "heads=True"),
    (dict(diag=1), "True or False"),
])
def test_bad_new_fields_raise_config_error(kwargs, match):
    with pytest.raises(doran.ConfigError, match=match):
        doran.AdapterConfig.preset("lora", **kwargs)


def test_rotation_rank_larger_than_width_is_refused():
    model = Wrap()
    snap = snapshot(model)
    with pytest.raises(doran.InjectError, match=r"rotation_rank=11 .* width 10 of proj"):
        doran.inject(model, doran.AdapterConfig.preset("sora", r=2, targets=("proj",), rotation_rank=11))
    assert_unchanged(model, snap)


# ------------------------------------------------------------------------------------------ heads
def test_bad_head_count_is_refused_before_the_model_changes():
    model = tiny_bert()  # query / value of width 32
    snap = snapshot(model)
    with pytest.raises(doran.InjectError, match=r"heads=3 does not divide the output width 32 of "
                                                r"bert\.encoder\.layer\.0\.attention\.self\.query"):
        doran.inject(model, doran.AdapterConfig.preset("hora", r=2, heads=3))
    assert_unchanged(model, snap)


def test_narrower_projection_not_a_multiple_of_the_head_width_is_refused():
    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.q = nn.Linear(12, 12)
            self.v = nn.Linear(12, 8)

    model = nn.Sequential(Attn())
    snap = snapshot(model)
    with pytest.raises(doran.InjectError, match=r"0\.v has output width 8, not a multiple of the head width 3 "
                                                r"= 12 \(0\.q\) / heads=4"):
        doran.inject(model, doran.AdapterConfig.preset("hora", r=2, targets=("q", "v"), heads=4))
    assert_unchanged(model, snap)
    with pytest.raises(doran.InjectError, match="heads='auto' cannot find the head width of 0.q"):
        doran.inject(model, doran.AdapterConfig.preset("hora", r=2, targets=("q", "v")))
    assert_unchanged(model, snap)


@pytest.mark.parametrize("heads", ["auto", 4])
def test_hora_on_gqa_llama_shares_one_generator_per_block(heads):
    model = tiny_llama()  # 4 query heads, 2 kv heads, head width 8: q_proj 32 rows, v_proj 16 rows
    doran.inject(model, doran.AdapterConfig.preset("hora", r=2, targets=("q_proj", "v_proj"), heads=heads))
    attn = model.model.layers[0].self_attn
    q, v = attn.q_proj.doran["all"], attn.v_proj.doran["all"]
    assert (q.heads, v.heads) == (4, 2)
    gq, gv = q.generator, v.generator
    for part in ("first_A", "first_B", "second_A", "second_B"):
        assert getattr(gq, part) is getattr(gv, part), part  # one generator for the block
    assert gq.emb_A is not gv.emb_A  # per-head embeddings belong to the projection
    assert gq.first_A is not model.model.layers[1].self_attn.q_proj.doran["all"].generator.first_A
    A, B = q.factors()
    assert A.shape == (4, 2, 32) and B.shape == (4, 8, 2)
    assert v.factors()[1].shape == (2, 8, 2)
    assert doran.get_config(model).heads == heads
    assert model._doran_state["targets"]["model.layers.0.self_attn.v_proj"]["heads"] == {"all": 2}


def test_hora_update_is_block_diagonal_by_head_rows():
    torch.manual_seed(0)
    model = Wrap()
    doran.inject(model, doran.AdapterConfig.preset("hora", r=3, targets=("proj",), heads=2))
    perturb(model)
    ad = model.proj.doran["all"]
    A, B = ad.factors()  # A (2, 3, 12), B (2, 5, 3)
    dW = ad.delta_weight()
    for h in range(2):
        torch.testing.assert_close(dW[5 * h : 5 * h + 5], ad.s * B[h] @ A[h], rtol=1e-12, atol=1e-12)
    # heads are coupled through the shared generator: one head's embedding moves only its own rows
    with torch.no_grad():
        ad.generator.emb_A[1].add_(1.0)
    dW2 = ad.delta_weight()
    assert torch.equal(dW2[:5], dW[:5]) and not torch.allclose(dW2[5:], dW[5:])


def test_hora_generated_A_has_loras_scale_and_B_is_zero():
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("proj", nn.Linear(256, 128))
    doran.inject(model, doran.AdapterConfig.preset("hora", r=8, targets=("proj",), heads=4))
    A, B = model.proj.doran["all"].factors()
    assert abs(A.std().item() - 1 / (3 * 256) ** 0.5) < 1e-6
    assert torch.equal(B, torch.zeros_like(B))


# ------------------------------------------------------------------------------------------ SORA
def test_sora_is_identity_at_step_zero_exactly_with_bias():
    torch.manual_seed(0)
    model = Wrap(dtype=torch.float32)
    with torch.no_grad():
        model.proj.bias.normal_()
    base = copy.deepcopy(model)
    doran.inject(model, doran.AdapterConfig.preset("sora", r=2, targets=("proj",), rotate_bias=True))
    rot = model.proj.doran["all"].rotation
    assert torch.equal(rot.C, rot.D)
    x = torch.randn(4, 12)
    assert torch.equal(model.proj(x), base.proj(x))


@pytest.mark.parametrize("rotate_bias", [False, True])
def test_sora_merged_equals_unmerged_with_nonzero_bias(rotate_bias):
    torch.manual_seed(0)
    model = Wrap()
    with torch.no_grad():
        model.proj.bias.normal_(0, 3.0)  # a large bias: rotating it or not changes the output visibly
    doran.inject(model, doran.AdapterConfig.preset("sora", r=2, targets=("proj",), rotation_s0=2.0,
                                                   rotate_bias=rotate_bias))
    perturb(model, scale=1.0)
    layer, ad = model.proj, model.proj.doran["all"]
    assert 0.05 < ad.rotation.scale().item() < 1
    w0, b0 = layer.weight.detach().clone(), layer.bias.detach().clone()
    x = torch.randn(6, 12, dtype=torch.float64)
    with torch.no_grad():
        y = layer(x)
        plain = doran.merged_copy(model)
        torch.testing.assert_close(plain.proj(x), y, rtol=1e-12, atol=1e-12)
        doran.merge(model)
        torch.testing.assert_close(layer(x), y, rtol=1e-12, atol=1e-12)
        assert torch.equal(layer.bias, b0) != rotate_bias  # the bias is rewritten iff it is rotated
        # the public code's merge drops the identity term of R = I + K: that weight disagrees with the forward
        K = ad.rotation.matrix() - torch.eye(10, dtype=torch.float64)
        inner = ad.diag[:, None] * w0 + ad.delta_weight()
        assert (x @ (K @ inner).t() + b0 - y).abs().max() > 0.1
        doran.unmerge(model)
        assert torch.equal(layer.weight, w0) and torch.equal(layer.bias, b0)  # bit for bit
        assert torch.equal(layer(x), y)
        # rotating the bias or not is a real difference (so the test above can tell them apart)
        other = copy.deepcopy(model)
        other.proj.doran["all"].cfg = ad.cfg.replace(rotate_bias=not rotate_bias)
        assert (other.proj(x) - y).abs().max() > 1e-3


def _rotation_with_scale(s_p: float, out: int = 64, rank: int = 4, seed: int = 0) -> OutputRotation:
    g = torch.Generator().manual_seed(seed)
    rot = OutputRotation(out, rank, 1.0, torch.float64)
    with torch.no_grad():
        # the scale of our init (columns of unit norm), D != C: a real rotation
        rot.C.copy_(torch.randn(out, rank, generator=g, dtype=torch.float64) / out**0.5)
        rot.D.copy_(torch.randn(out, rank, generator=g, dtype=torch.float64) / out**0.5)
        rot.s0 = s_p * (rot.C.norm() + rot.D.norm() + 1e-6).item()
    assert abs(rot.scale().item() - s_p) < 1e-12 * max(1.0, s_p)
    return rot


def test_sora_rotation_preserves_norm_to_second_order():
    y = torch.randn(32, 64, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    deviation = {}
    for s_p in (1e-2, 1e-3):
        rot = _rotation_with_scale(s_p)
        with torch.no_grad():
            y_rot = y + rot.delta(y)
            deviation[s_p] = ((y_rot.norm(dim=1) - y.norm(dim=1)).abs() / y.norm(dim=1)).max().item()
            change = ((y_rot - y).norm(dim=1) / y.norm(dim=1)).max().item()
        assert change > 10 * deviation[s_p]  # the output really turns (first order), its norm barely moves
    ratio = deviation[1e-2] / deviation[1e-3]
    assert 80 < ratio < 120, deviation  # O(s_p^2): ten times smaller s_p, a hundred times smaller deviation
    assert deviation[1e-2] < 1e-2**2  # a constant of order one times s_p^2 (~0.2 here); the change is O(s_p)
    # K is skew-symmetric, so ||(I + K) y||^2 = ||y||^2 + ||K y||^2 exactly
    rot = _rotation_with_scale(1e-2)
    K = rot.matrix() - torch.eye(64, dtype=torch.float64)
    torch.testing.assert_close(K, -K.t(), rtol=0, atol=1e-15)


# ------------------------------------------------------------------------------------------ gradients
@pytest.mark.parametrize("preset", NEW)
def test_gradients_reach_every_trainable_tensor(family, preset):
    factory, targets, head, _, _ = FAMILIES[family]
    model = factory()
    doran.inject(model, doran.AdapterConfig.preset(preset, r=2, alpha=4, targets=targets), trainable=head)
    perturb(model)
    run(model.train(), family).float().pow(2).mean().backward()
    for name, p, group in doran.named_adapter_parameters(model):
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().max() > 0, (name, group)
            assert torch.isfinite(p.grad).all(), name
    groups = {g for _, p, g in doran.named_adapter_parameters(model) if p.requires_grad}
    expected = {"replora": {"generator"}, "hora": {"generator"}, "prediag": {"factors", "diag"},
                "sora": {"factors", "diag", "rotation"}}[preset]
    assert groups == expected | {"other"}


GRADCHECK = [
    dict(method="hora", heads=2),
    dict(method="hora", heads=2, sharing="none", gen_activation="tanh"),
    dict(method="sora"),
    dict(method="sora", rotate_bias=True),
]


@pytest.mark.parametrize("case", GRADCHECK, ids=lambda c: "-".join(str(v) for v in c.values()))
def test_gradcheck_hora_and_sora_float64(case):
    torch.manual_seed(0)
    model = Wrap(d_in=8, d_out=6)
    overrides = {k: v for k, v in case.items() if k != "method"}
    cfg = doran.AdapterConfig.preset(case["method"], r=2, alpha=4, targets=("proj",), gen_hidden=4,
                                     gen_embed=3, **overrides)
    doran.inject(model, cfg)
    perturb(model, scale=0.5, seed=1)
    layer = model.proj
    names = [n for n, p in layer.named_parameters() if p.requires_grad]
    params = dict(layer.named_parameters())
    x = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)

    def f(x, *values):
        return torch.func.functional_call(layer, dict(zip(names, values)), (x,))

    inputs = (x, *[params[n].detach().clone().requires_grad_(True) for n in names])
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)


# ------------------------------------------------------------------------------------------ counts
def closed_form(cfg, blocks) -> int:
    """Adapter parameters from the shapes alone. blocks: {block: [(d_in, d_out, heads or None), ...]}."""
    r, k, h = cfg.r, cfg.gen_embed, cfg.gen_hidden
    first = 2 * (k * h + h)  # the first layers for A and B (weight + bias)
    total, global_done = 0, False
    for projs in blocks.values():
        for d_in, d_out, heads in projs:
            n = heads or 1
            d_b = d_out // n  # rows generated per embedding set: d_out, or d_head per head
            if cfg.factors == "static":
                total += n * r * d_in + r * d_out  # A (H, r, in), B (H, d_head, r)
            else:
                total += 2 * n * r * k  # embeddings e_A, e_B (per head)
                if cfg.sharing == "none":
                    total += first + h * (d_in + d_b)
                elif cfg.sharing == "qv_first":
                    total += h * (d_in + d_b)
            if cfg.magnitude:
                total += d_out  # m
                if cfg.tau_mode == "learned":
                    total += d_out if cfg.tau_granularity == "row" else 1
            if cfg.diag:
                total += d_out
            total += 2 * d_out * cfg.rotation_rank  # C, D
        if cfg.factors == "generated":
            d_in, d_out, heads = projs[0]
            d_b = d_out // (heads or 1)
            if cfg.sharing == "qv_first":
                total += first
            elif cfg.sharing == "qv_full":
                total += first + h * (d_in + d_b)
            elif cfg.sharing == "global" and not global_done:
                total += first + h * (d_in + d_b)
                global_done = True
    return total


# q and v per block (2 blocks): (d_in, d_out, number of heads of the slice)
SHAPES = {"bert": [(32, 32, 4), (32, 32, 4)], "vit": [(48, 48, 3), (48, 48, 3)],
          "llama": [(32, 32, 4), (32, 16, 2)]}
COUNT_VARIANTS = [(name, {}) for name in sorted(doran.PRESETS)] + [
    ("hora", dict(sharing="qv_first")), ("hora", dict(sharing="none")), ("lora", dict(heads="auto")),
    ("doran", dict(heads="auto")), ("doran", dict(rotation_rank=3)), ("sora", dict(rotate_bias=True)),
    ("hora", dict(heads="auto", sharing="global")),
]


@pytest.mark.parametrize("preset, overrides", COUNT_VARIANTS, ids=lambda v: str(v))
def test_trainable_counts_equal_closed_form(family, preset, overrides):
    factory, targets, head, _, _ = FAMILIES[family]
    model = factory()
    cfg = doran.AdapterConfig.preset(preset, r=2, targets=targets, **overrides)
    doran.inject(model, cfg, trainable=head)
    shapes = [(d_in, d_out, n if cfg.heads is not None else None) for d_in, d_out, n in SHAPES[family]]
    counts = doran.trainable_parameter_counts(model)
    head_params = sum(p.numel() for p in model.get_submodule(head[0]).parameters())
    assert counts["trainable"] - counts["other"] == closed_form(cfg, {0: shapes, 1: shapes})
    assert counts["trainable"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert counts["other"] == head_params
    if cfg.diag:
        assert counts["diag"] == sum(d_out for _, d_out, _ in shapes) * 2
    assert counts["rotation"] == 2 * cfg.rotation_rank * sum(d_out for _, d_out, _ in shapes) * 2


def test_param_table_counts_equal_closed_form_and_real_models():
    table = load_param_table()
    table.check_against_real_models()  # stand-ins count exactly what the real timm ViT / HF LLaMA count
    counts = table.counts_table()
    vit = [(768, 768, 12)] * 2
    llama = [(4096, 4096, 32)] * 2
    for name, (n_vit, n_llama) in counts.items():
        for n, shapes, blocks, fields in ((n_vit, vit, 12, table.SETTINGS[0][2]),
                                          (n_llama, llama, 32, table.SETTINGS[1][2])):
            cfg = doran.AdapterConfig.preset(name, **fields)
            per = [(a, b, h if cfg.heads is not None else None) for a, b, h in shapes]
            assert n == closed_form(cfg, {i: per for i in range(blocks)}), name
    assert counts["lora"] == [2 * 12 * 8 * (768 + 768), 2 * 32 * 16 * (4096 + 4096)]
    text = table.markdown(counts)
    assert all(f"`{name}`" in text for name in doran.PRESETS)


def test_meta_device_injection_counts_like_cpu():
    table = load_param_table()
    for name in doran.PRESETS:
        shapes = dict(layers=2, dim=32, heads=4, kv_heads=2)
        meta = table.adapter_count(table.llama_standin(**shapes), name, r=4, targets=("q_proj", "v_proj"))
        cpu = table.adapter_count(table.llama_standin(**shapes, device="cpu"), name, r=4,
                                  targets=("q_proj", "v_proj"))
        assert meta == cpu, name
