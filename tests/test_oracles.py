"""The maths against independent references: a materialising float64 implementation, PEFT's LoRA and DoRA,
and torch.autograd.gradcheck."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import perturb, tiny_bert
from torch import nn

import doran
from doran.norm import factored_row_norm, weight_times_At


class Wrap(nn.Module):
    def __init__(self, d_in=12, d_out=10, bias=True, dtype=torch.float64):
        super().__init__()
        self.proj = nn.Linear(d_in, d_out, bias=bias, dtype=dtype)


def reference_forward(x, W0, b, A, B, s, m=None, tau=None, detach=False):
    """Materialise W' = m * V / (||V||_row + tau), V = W0 + s B A (or W0 + s B A without magnitude)."""
    V = W0 + s * B @ A  # (out, in)
    if m is None:
        W = V
    else:
        norm = torch.linalg.vector_norm(V, dim=1)
        if detach:
            norm = norm.detach()
        W = (m / (norm + tau))[:, None] * V
    return x @ W.t() + (0 if b is None else b)


def reference_general(x, W0, b, ad):
    """Materialise every form of the family from the adapter's raw tensors, independently of layers.py:
    W' = R (diag(d) W0 + s dW) or R (m * V / (||V||_row + tau)), V = W0 + s dW, R = I + s_p (D C^T - C D^T),
    dW = B A, or per head dW = blockdiag(B_1, ..., B_H) [A_1; ...; A_H]; the bias rotated iff rotate_bias."""
    cfg = ad.cfg
    A, B = ad.factors()
    if A.ndim == 3:  # per head: B_h (d_head, r), A_h (r, in)
        dW = torch.block_diag(*B) @ A.reshape(-1, A.shape[-1])
    else:
        dW = B @ A
    V = W0 + ad.s * dW
    if cfg.magnitude:
        _, scale = ad._weight_stats(W0)
        m, tau = ad.magnitude, ad.tau_absolute(scale)
        norm = torch.linalg.vector_norm(V, dim=1)
        if cfg.detach_norm:
            norm = norm.detach()
        W = (m / (norm + tau))[:, None] * V
    elif cfg.diag:
        W = ad.diag[:, None] * W0 + ad.s * dW
    else:
        W = V
    if cfg.rotation_rank:
        C, D = ad.rotation.C, ad.rotation.D
        s_p = torch.clamp(cfg.rotation_s0 / (C.norm() + D.norm() + 1e-6), max=1.0)
        R = torch.eye(W.shape[0], dtype=W.dtype) + s_p * (D @ C.t() - C @ D.t())  # (out, out)
        W = R @ W
        if b is not None and cfg.rotate_bias:
            b = R @ b
    return x @ W.t() + (0 if b is None else b)


CASES = [
    dict(method="lora"),
    dict(method="dora"),
    dict(method="dora", detach_norm=False),
    dict(method="doran"),
    dict(method="doran", detach_norm=True),
    dict(method="doran", factors="static"),
    dict(method="doran", tau_mode="fixed", tau_init=0.3),
    dict(method="doran", tau_granularity="row"),
    dict(method="lora", factors="generated", sharing="none"),  # RepLoRA's form
    dict(method="replora"),
    dict(method="hora", heads=2),  # the Wrap layer has no attention module: heads given (10 rows, 2 heads)
    dict(method="hora", heads=5, sharing="none"),
    dict(method="lora", heads=2),  # static per-head factors
    dict(method="doran", heads=2),  # per-head factors inside the DoRAN norm
    dict(method="prediag"),
    dict(method="sora"),
    dict(method="sora", rotate_bias=True),
    dict(method="sora", rotation_s0=50.0),  # s_p capped at 1
    dict(method="doran", rotation_rank=3),  # a rotation on top of DoRAN
    dict(method="lora", rotation_rank=2, rotate_bias=True),
]


def _layer(case, bias=True, seed=0):
    torch.manual_seed(seed)
    model = Wrap(bias=bias)
    overrides = {k: v for k, v in case.items() if k != "method"}
    cfg = doran.AdapterConfig.preset(case["method"], r=3, alpha=6, targets=("proj",), **overrides)
    doran.inject(model, cfg)
    perturb(model, scale=0.5, seed=seed + 1)
    return model, model.proj.doran["all"]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{v}" for v in c.values()))
@pytest.mark.parametrize("bias", [True, False])
def test_forward_and_gradients_equal_materialised_reference(case, bias):
    model, ad = _layer(case, bias=bias)
    x = torch.randn(5, 12, dtype=torch.float64)
    y = model.proj(x)
    params = [p for _, p, _ in doran.named_adapter_parameters(model)]
    grads = torch.autograd.grad((y * torch.linspace(-1, 1, 10, dtype=y.dtype)).sum(), params)

    W0, b = model.proj.weight, model.proj.bias
    if ad.heads is None and not ad.cfg.diag and not ad.cfg.rotation_rank:
        A, B = ad.factors()
        m = tau = None
        if ad.cfg.magnitude:
            _, scale = ad._weight_stats(W0)
            m, tau = ad.magnitude, ad.tau_absolute(scale)
        y_ref = reference_forward(x, W0, b, A, B, ad.s, m, tau, ad.cfg.detach_norm)
    else:
        y_ref = reference_general(x, W0, b, ad)
    if ad.cfg.rotation_s0 > 1:
        assert ad.rotation.scale().item() == 1.0  # the cap binds in this case
    grads_ref = torch.autograd.grad((y_ref * torch.linspace(-1, 1, 10, dtype=y.dtype)).sum(), params)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("near_cancel", [False, True])
def test_factored_norm_equals_materialised_norm_float64(near_cancel):
    torch.manual_seed(0)
    out, d_in, r, s = 16, 24, 4, 2.0
    A = torch.randn(r, d_in, dtype=torch.float64)
    B = torch.randn(out, r, dtype=torch.float64)
    W0 = -s * B @ A + (1e-6 * torch.randn(out, d_in, dtype=torch.float64) if near_cancel else 0.0)
    if not near_cancel:
        W0 = torch.randn(out, d_in, dtype=torch.float64)
    w0_sq = torch.linalg.vector_norm(W0, dim=1) ** 2
    got = factored_row_norm(W0, A, B, s, w0_sq)
    ref = torch.linalg.vector_norm(W0 + s * B @ A, dim=1)
    assert torch.all(got >= 0) and torch.isfinite(got).all()
    if not near_cancel:
        torch.testing.assert_close(got, ref, rtol=1e-13, atol=0)
        return
    # Near cancellation the squared norm is a difference of large terms: its absolute error is bounded by
    # a few eps * (||W0|| + s ||BA||)^2, so the norm keeps absolute (not relative) accuracy. Documented.
    scale = (w0_sq.sqrt() + torch.linalg.vector_norm(s * B @ A, dim=1)) ** 2
    assert torch.all((got**2 - ref**2).abs() <= 64 * torch.finfo(torch.float64).eps * scale)
    assert torch.all(ref < 1e-4 * w0_sq.sqrt())  # the case really is near-cancelling


def test_half_precision_weight_times_At_is_float32_exact():
    torch.manual_seed(0)
    W = torch.randn(64, 256).to(torch.bfloat16)
    A = torch.randn(8, 256)
    exact = W.double() @ A.double().t()
    for chunk in (1 << 22, 1000):  # one block, and blocks of 3 rows
        got = weight_times_At(W, A, chunk_elements=chunk)
        assert got.dtype == torch.float32
        assert ((got.double() - exact).norm() / exact.norm()).item() < 1e-6
    naive = (W @ A.t().to(torch.bfloat16)).double()  # what a plain half-precision product would give
    assert ((naive - exact).norm() / exact.norm()).item() > 1e-4


GRADCHECK_CASES = [
    dict(factors="static", tau_mode="fixed", detach_norm=False),
    dict(factors="static", tau_mode="learned", detach_norm=True),
    dict(factors="generated", tau_mode="learned", detach_norm=False),
    dict(factors="generated", tau_mode="fixed", detach_norm=True),
    dict(factors="static", tau_mode="learned", detach_norm=False, tau_granularity="row"),
]


@pytest.mark.parametrize("case", GRADCHECK_CASES, ids=lambda c: "-".join(str(v) for v in c.values()))
def test_gradcheck_doran_layer_float64(case):
    model, _ = _layer({"method": "doran", **case})
    layer = model.proj
    names = [n for n, p in layer.named_parameters() if p.requires_grad]
    assert any("tau_rho" in n for n in names) == (case["tau_mode"] == "learned")
    if case["detach_norm"]:
        # A detached norm is by design not the derivative of the forward with respect to the factors, so
        # finite differences apply to x, m and tau only; the factors' gradients are checked against the
        # materialised reference with the same detach in test_forward_and_gradients_equal_...
        names = [n for n in names if "magnitude" in n or "tau" in n]
    x = torch.randn(4, 12, dtype=torch.float64, requires_grad=True)

    def f(x, *values):
        return torch.func.functional_call(layer, dict(zip(names, values)), (x,))

    params = dict(layer.named_parameters())
    inputs = (x, *[params[n].detach().clone().requires_grad_(True) for n in names])
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)


def test_zero_norm_row_doran_finite_dora_refused():
    torch.manual_seed(0)
    model = Wrap(bias=True)
    with torch.no_grad():
        model.proj.weight[3] = 0.0
    dora_model = copy.deepcopy(model)
    with pytest.raises(doran.InjectError, match="zero norm"):
        doran.inject(dora_model, doran.AdapterConfig.preset("dora", r=2, targets=("proj",)))
    assert not doran.is_injected(dora_model)
    for granularity in ("matrix", "row"):
        m = copy.deepcopy(model)
        doran.inject(m, doran.AdapterConfig.preset("doran", r=2, targets=("proj",), tau_granularity=granularity))
        x = torch.randn(5, 12, dtype=torch.float64)
        y = m(x) if False else m.proj(x)
        y.sum().backward()
        assert torch.isfinite(y).all()
        for n, p, _ in doran.named_adapter_parameters(m):
            assert p.grad is not None and torch.isfinite(p.grad).all(), n
        assert doran.tau_values(m, absolute=True)["proj"] > 0  # the floor keeps tau positive on a zero row


def _peft_pair(use_dora: bool):
    from peft import LoraConfig, get_peft_model

    base = tiny_bert(seed=3)
    ours = copy.deepcopy(base)
    doran.inject(ours, doran.AdapterConfig.preset("dora" if use_dora else "lora", r=4, alpha=8,
                                                  targets=("query", "value")))
    perturb(ours, scale=0.5)
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                                 target_modules=["query", "value"],
                                                                 use_dora=use_dora))
    mapping = {}
    for name, module in doran.adapted_modules(ours):
        ad = module.doran["all"]
        pm = peft_model.base_model.model.get_submodule(name)
        with torch.no_grad():
            pm.lora_A["default"].weight.copy_(ad.lora_A)
            pm.lora_B["default"].weight.copy_(ad.lora_B)
            mapping[name + ".A"] = (ad.lora_A, pm.lora_A["default"].weight)
            mapping[name + ".B"] = (ad.lora_B, pm.lora_B["default"].weight)
            if use_dora:
                pm.lora_magnitude_vector["default"].weight.copy_(ad.magnitude)
                mapping[name + ".m"] = (ad.magnitude, pm.lora_magnitude_vector["default"].weight)
    return ours, peft_model, mapping


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_matches_peft(use_dora):
    ours, theirs, mapping = _peft_pair(use_dora)
    ids = torch.randint(0, 97, (3, 11), generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 2, 1])
    out_ours = ours(input_ids=ids, labels=labels)
    out_theirs = theirs(input_ids=ids, labels=labels)
    torch.testing.assert_close(out_ours.logits, out_theirs.logits, rtol=1e-5, atol=1e-6)
    out_ours.loss.backward()
    out_theirs.loss.backward()
    for name, (p_ours, p_theirs) in mapping.items():
        assert p_ours.grad is not None and p_ours.grad.abs().max() > 0, name
        torch.testing.assert_close(p_ours.grad, p_theirs.grad, rtol=1e-4, atol=1e-7, msg=name)


def test_large_tau_tends_to_scaled_lora_not_lora():
    """For tau >> ||V||, W' -> (m / tau) V: a rescaled LoRA, not LoRA itself."""
    torch.manual_seed(0)
    model = Wrap()
    doran.inject(model, doran.AdapterConfig.preset("doran", r=2, targets=("proj",), factors="static",
                                                   tau_mode="fixed", tau_init=1e6))
    perturb(model)
    ad = model.proj.doran["all"]
    A, B = ad.factors()
    V = model.proj.weight + ad.s * B @ A
    _, scale = ad._weight_stats(model.proj.weight)
    tau = ad.tau_absolute(scale)
    x = torch.randn(3, 12, dtype=torch.float64)
    scaled_lora = x @ ((ad.magnitude / tau)[:, None] * V).t() + model.proj.bias
    y = model.proj(x)
    torch.testing.assert_close(y, scaled_lora, rtol=1e-4, atol=1e-6)  # deviation O(||V|| / tau) = O(1e-6)
    lora = x @ V.t() + model.proj.bias
    assert (y - lora).abs().max() > 1e-2  # m / tau != 1: a rescaled LoRA, not LoRA
