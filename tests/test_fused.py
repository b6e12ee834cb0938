"""The fused execution path (doran/fused.py) against the reference path and against gradcheck."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import doran
from doran.fast import fused

torch.set_default_dtype(torch.float32)


class QKV(nn.Module):
    """A timm-style fused q|k|v projection followed by a mixing layer."""

    def __init__(self, d: int = 12, bias: bool = True) -> None:
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d, bias=bias)
        self.proj = nn.Linear(3 * d, 5)

    def forward(self, x):
        return self.proj(self.qkv(x))


class QV(nn.Module):
    def __init__(self, d: int = 16, bias: bool = False) -> None:
        super().__init__()
        self.q_proj = nn.Linear(d, d, bias=bias)
        self.v_proj = nn.Linear(d, d, bias=bias)
        self.o = nn.Linear(2 * d, 3)

    def forward(self, x):
        return self.o(torch.cat([self.q_proj(x), self.v_proj(x)], -1))


def _perturb(model: nn.Module, seed: int = 0) -> None:
    """Move every adapter tensor off its identity init so all terms of the maths are exercised."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p, _ in doran.named_adapter_parameters(model):
            p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype).to(p.device) * (p.abs().mean() + 0.1))


def _outputs_and_grads(model: nn.Module, x: torch.Tensor, path: str, scale: str = "auto", bank: bool = True):
    model.zero_grad(set_to_none=True)
    xx = x.clone().requires_grad_(True)
    with fused.execution(path=path, scale=scale, bank=bank):  # the backward too: it may recompute layers
        out = model(xx)
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    return out.detach(), xx.grad.clone(), grads


def _assert_same(got, ref) -> None:
    """Outputs at 1e-12 and every parameter gradient of ``ref`` at 1e-9 (results of _outputs_and_grads)."""
    torch.testing.assert_close(got[0], ref[0], rtol=1e-12, atol=1e-12)
    for name in ref[2]:
        torch.testing.assert_close(got[2][name], ref[2][name], rtol=1e-9, atol=1e-12, msg=name)


CASES = [
    ("lora", {}),
    ("dora", {}),
    ("dora", {"detach_norm": False}),
    ("doran", {}),
    ("doran", {"tau_granularity": "row"}),
    ("doran", {"detach_norm": True}),
    ("doran", {"tau_mode": "fixed", "tau_init": 0.05}),
    ("doran", {"factors": "static"}),
    ("replora", {}),
    ("hora", {}),
]


@pytest.mark.parametrize("scale", ["weight", "output"])
@pytest.mark.parametrize("arch", ["qkv", "qv"])
@pytest.mark.parametrize("preset,extra", CASES)
def test_fused_path_equals_reference_in_float64(preset, extra, arch, scale):
    torch.manual_seed(0)
    if arch == "qkv":
        base, targets, x = QKV(), ("qkv",), torch.randn(2, 7, 12, dtype=torch.float64)
    else:
        base, targets, x = QV(), ("q_proj", "v_proj"), torch.randn(2, 7, 16, dtype=torch.float64)
    heads = {"heads": 2} if preset == "hora" else {}
    cfg = doran.AdapterConfig.preset(preset, r=3, alpha=6, targets=targets, **heads, **extra)
    model = base.double()
    doran.inject(model, cfg)
    _perturb(model)
    assert all(fused.fusable(m) for _, m in doran.adapted_modules(model))
    ref = _outputs_and_grads(model, x, "reference")
    for bank in (True, False):
        got = _outputs_and_grads(model, x, "fused", scale, bank)
        _assert_same(got, ref)
        torch.testing.assert_close(got[1], ref[1], rtol=1e-10, atol=1e-12)
        assert got[2].keys() == ref[2].keys() and len(ref[2]) > 0


def test_fused_path_keeps_the_k_rows_of_qkv_bit_exact():
    torch.manual_seed(0)
    model = QKV()
    doran.inject(model, doran.AdapterConfig.preset("doran", r=4, targets=("qkv",)))
    _perturb(model)
    x = torch.randn(3, 5, 12)
    layer = model.qkv
    with fused.execution(path="fused"):
        out = layer(x)
    base = nn.functional.linear(x, layer.weight, layer.bias)
    assert torch.equal(out[..., 12:24], base[..., 12:24])
    assert not torch.allclose(out[..., :12], base[..., :12])


def test_dropout_on_the_fused_path_is_each_slice_its_own_mask():
    torch.manual_seed(0)
    model = QKV()
    cfg = doran.AdapterConfig.preset("lora", r=4, targets=("qkv",), dropout=0.5)
    doran.inject(model, cfg)
    _perturb(model)
    x = torch.randn(4, 12)
    model.train()
    torch.manual_seed(3)
    got = model.qkv(x)
    layer = model.qkv
    torch.manual_seed(3)  # the same masks, drawn in slice order
    expect = layer.reference_forward(x)
    torch.testing.assert_close(got, expect)
    model.eval()
    with fused.execution(path="reference"):
        ref_eval = model.qkv(x)
    torch.testing.assert_close(model.qkv(x), ref_eval)


def test_pre_diag_and_sora_run_on_the_reference_path():
    model = QV()
    doran.inject(model, doran.AdapterConfig.preset("sora", r=2, targets=("q_proj", "v_proj")))
    assert not any(fused.fusable(m) for _, m in doran.adapted_modules(model))
    model2 = QV()
    doran.inject(model2, doran.AdapterConfig.preset("prediag", r=2, targets=("q_proj", "v_proj")))
    assert not any(fused.fusable(m) for _, m in doran.adapted_modules(model2))


def test_unfrozen_base_weight_falls_back_to_autograd():
    model = QV()
    doran.inject(model, doran.AdapterConfig.preset("dora", r=2, targets=("q_proj",)))
    model.q_proj.weight.requires_grad_(True)
    assert not fused.fusable(model.q_proj)
    model(torch.randn(3, 16)).sum().backward()
    assert model.q_proj.weight.grad is not None


def test_row_scale_gradcheck():
    torch.manual_seed(0)
    H, d, r, n = 2, 4, 3, 6
    A = torch.randn(H, r, n, dtype=torch.float64, requires_grad=True)
    B = torch.randn(H, d, r, dtype=torch.float64, requires_grad=True)
    W = torch.randn(H * d, n, dtype=torch.float64)
    m = (torch.rand(H * d, dtype=torch.float64) + 0.5).requires_grad_(True)
    w0_sq = (W * W).sum(1)
    for t in (None, torch.tensor([0.3], dtype=torch.float64, requires_grad=True),
              (torch.rand(H * d, dtype=torch.float64) + 0.1).requires_grad_(True)):
        args = (A, B, m) if t is None else (A, B, m, t)

        def f(*a, t=t):
            return fused.row_scale(a[0], a[1], a[2], a[3] if t is not None else None, W, w0_sq, 0.7, False)

        assert torch.autograd.gradcheck(f, args)

        def f_detached(mm, *tt, t=t):  # the norm is a constant: only m and tau get gradients
            return fused.row_scale(A.detach(), B.detach(), mm, tt[0] if tt else None, W, w0_sq, 0.7, True)

        assert torch.autograd.gradcheck(f_detached, (m,) if t is None else (m, t))
    # one head: the (r, in), (out, r) form
    A1 = torch.randn(r, n, dtype=torch.float64, requires_grad=True)
    B1 = torch.randn(d, r, dtype=torch.float64, requires_grad=True)
    W1 = W[:d]
    assert torch.autograd.gradcheck(
        lambda a, b, mm: fused.row_scale(a, b, mm, None, W1, (W1 * W1).sum(1), 1.3, False), (A1, B1, m[:d]))


@pytest.mark.parametrize("layout", [((0, 0), (0, 8), (1, 0)),   # q and v of a qkv: one bmm on a strided view
                                    ((0, 0), (0, 5), (1, 0)),   # another spacing (rows 4 shared by no slice)
                                    ((0, 8), (1, 0), (0, 0))])  # a weight's slices apart in the stack: slice by slice
def test_row_scales_with_slices_sharing_a_base_weight_gradcheck(layout):
    """The bank's form: three slices, two of them rows of one weight (a qkv's q and v, with rows of no slice
    between them), one of another; values equal the norm of the materialised rows, gradients gradcheck."""
    torch.manual_seed(0)
    S, d, r, n = 3, 4, 2, 5
    W_qkv, W_other = torch.randn(3 * d, n, dtype=torch.float64), torch.randn(d, n, dtype=torch.float64)
    rows = [(W_qkv, W_other)[w][row : row + d] for w, row in layout]
    A = torch.randn(S, r, n, dtype=torch.float64, requires_grad=True)
    B = torch.randn(S, d, r, dtype=torch.float64, requires_grad=True)
    m = (torch.rand(S, d, dtype=torch.float64) + 0.5).requires_grad_(True)
    t = (torch.rand(S, 1, dtype=torch.float64) + 0.1).requires_grad_(True)
    w0_sq = torch.stack([(w * w).sum(1) for w in rows])

    def f(a, b, mm, tt):
        return fused.row_scales(a, b, mm, tt, [W_qkv, W_other], layout, w0_sq, 0.7, False)

    V = torch.stack(rows) + 0.7 * B @ A
    torch.testing.assert_close(f(A, B, m, t), m / (torch.linalg.vector_norm(V, dim=-1) + t), rtol=1e-12, atol=0)
    assert torch.autograd.gradcheck(f, (A, B, m, t))


def test_row_scale_matches_the_materialised_norm():
    torch.manual_seed(1)
    A = torch.randn(5, 40, dtype=torch.float64)
    B = torch.randn(30, 5, dtype=torch.float64)
    W = torch.randn(30, 40, dtype=torch.float64)
    m = torch.rand(30, dtype=torch.float64)
    t = torch.tensor([0.2], dtype=torch.float64)
    g = fused.row_scale(A, B, m, t, W, (W * W).sum(1), 0.5, False)
    expect = m / (torch.linalg.vector_norm(W + 0.5 * B @ A, dim=1) + 0.2)
    torch.testing.assert_close(g, expect, rtol=1e-13, atol=0)


@pytest.mark.parametrize("mode", ["none", "weight", "output"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("B_form, ranges", [("big", ((0, 3), (6, 9))), ("stacked", ((0, 3), (6, 9))),
                                            ("stacked", ((0, 3), (4, 7))), ("stacked", ((2, 5),))])
@pytest.mark.parametrize("raw_dg", [False, True])
def test_fused_linear_gradcheck(mode, bias, B_form, ranges, raw_dg):
    """Both forms of B: B_big (out, R), and the slices' B stacked (k, d, r), evenly spaced (strided views in
    the backward) or not (per-slice ops); with ``raw_dg`` the layer hands back g * dL/dg and g comes through
    the bank's ``_GradTimesG``, which divides (the eager per-layer path): the same gradients."""
    from doran.fast.bank import _GradTimesG

    torch.manual_seed(0)
    N, n, out, r = 5, 4, 9, 2
    k, d = len(ranges), ranges[0][1] - ranges[0][0]
    x = torch.randn(N, n, dtype=torch.float64, requires_grad=True)
    W = torch.randn(out, n, dtype=torch.float64)
    b = torch.randn(out, dtype=torch.float64, requires_grad=True) if bias else None
    h = torch.randn(N, k * r, dtype=torch.float64, requires_grad=True)
    shape = (out, k * r) if B_form == "big" else (k, d, r)
    B = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    g = (torch.rand(k * d, dtype=torch.float64) + 0.5).requires_grad_(True) if mode != "none" else None
    inputs = [x, h, B] + ([g] if g is not None else []) + ([b] if b is not None else [])

    def f(x, h, B, *rest):
        gg = rest[0] if g is not None else None
        if raw_dg and gg is not None:
            gg = _GradTimesG.apply(gg)
        bb = rest[-1] if b is not None else None
        return fused._FusedLinear.apply(x, W, bb, h, B, gg, ranges, 0.8, mode, raw_dg)

    assert torch.autograd.gradcheck(f, tuple(inputs))


def test_stacked_factors_give_the_output_of_their_b_big():
    """The stacked form (k, d, r) is the block matrix it stands for: same output, every layout."""
    torch.manual_seed(0)
    for ranges in (((0, 3), (6, 9)), ((0, 3), (4, 7)), ((2, 5),)):
        k, d = len(ranges), 3
        x, W, h = torch.randn(5, 4), torch.randn(9, 4), torch.randn(5, 2 * k)
        B = torch.randn(k, d, 2)
        big = torch.zeros(9, 2 * k)
        for j, (a, z) in enumerate(ranges):
            big[a:z, 2 * j : 2 * j + 2] = B[j]
        g = torch.rand(k * d) + 0.5
        got = fused._FusedLinear.apply(x, W, None, h, B, g, ranges, 0.5, "output")
        want = fused._FusedLinear.apply(x, W, None, h, big, g, ranges, 0.5, "output")
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_zero_magnitude_row_gets_zero_magnitude_gradient():
    """The one documented difference: with g_i = 0 exactly the output holds no z, dL/dg_i is reported as 0."""
    x = torch.randn(4, 3, dtype=torch.float64)
    W = torch.randn(2, 3, dtype=torch.float64)
    h = torch.randn(4, 1, dtype=torch.float64)
    B = torch.randn(2, 1, dtype=torch.float64)
    z = x @ W.t() + h @ B.t()
    from doran.fast.bank import _GradTimesG

    for raw_dg in (False, True):  # the layer dividing, or the bank's _GradTimesG
        g = torch.tensor([0.0, 1.5], dtype=torch.float64, requires_grad=True)
        out = fused._FusedLinear.apply(x, W, None, h, B, _GradTimesG.apply(g) if raw_dg else g, ((0, 2),), 1.0,
                                       "output", raw_dg)
        out.sum().backward()
        torch.testing.assert_close(g.grad, torch.tensor([0.0, z[:, 1].sum().item()], dtype=torch.float64))


def test_weight_products_in_blocks_equal_the_plain_product():
    torch.manual_seed(0)
    W = torch.randn(37, 11).to(torch.bfloat16)
    X = torch.randn(11, 3)
    torch.testing.assert_close(fused.weight_times(W, X, chunk_elements=40), W.float() @ X)
    Y = torch.randn(3, 37)
    torch.testing.assert_close(fused.times_weight(Y, W, chunk_elements=40), Y @ W.float())


def test_split3_is_exact_to_float32():
    X = torch.randn(1000) * torch.logspace(-6, 6, 1000)
    hi, mid, lo = fused._split3(X)
    back = hi.float() + mid.float() + lo.float()
    assert ((back - X).abs() <= X.abs() * 2.0**-23).all()


def test_execution_settings_are_checked_and_restored():
    with pytest.raises(ValueError, match="unknown execution path"):
        fused.set_execution(path="fast")
    with pytest.raises(ValueError, match="unknown scale mode"):
        fused.set_execution(scale="rows")
    with pytest.raises(ValueError, match="unknown compiled path"):
        fused.set_execution(compiled="eager")
    before = dict(fused._SETTINGS)
    with fused.execution(path="reference", scale="weight", compiled="reference"):
        assert fused._SETTINGS == {"path": "reference", "scale": "weight", "bank": True, "compiled": "reference",
                                   "compiled_bank": True}
    assert before == fused._SETTINGS


def test_fused_training_matches_reference_over_steps():
    """A few AdamW steps on each path end at the same adapter (float64)."""
    torch.manual_seed(0)
    base = QKV().double()
    doran.inject(base, doran.AdapterConfig.preset("doran", r=2, targets=("qkv",)))
    models = {p: copy.deepcopy(base) for p in ("fused", "reference")}
    x = torch.randn(6, 12, dtype=torch.float64)
    for path, model in models.items():
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        for _ in range(5):
            with fused.execution(path=path):
                loss = model(x).pow(2).mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
    a = {n: p for n, p, _ in doran.named_adapter_parameters(models["fused"])}
    b = {n: p for n, p, _ in doran.named_adapter_parameters(models["reference"])}
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-9, atol=1e-12, msg=name)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_bf16_weight_products_on_cuda_match_float64():
    torch.manual_seed(0)
    W = torch.randn(512, 384, device="cuda").to(torch.bfloat16)
    X = torch.randn(384, 16, device="cuda")
    Y = torch.randn(16, 512, device="cuda")
    exact = W.double() @ X.double()
    got = fused.weight_times(W, X)
    assert ((got.double() - exact).abs().max() / exact.abs().max()).item() < 1e-6
    exact2 = Y.double() @ W.double()
    got2 = fused.times_weight(Y, W)
    assert ((got2.double() - exact2).abs().max() / exact2.abs().max()).item() < 1e-6


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("preset", ["lora", "dora", "doran"])
def test_fused_path_on_cuda_bf16_autocast_matches_reference(preset):
    torch.manual_seed(0)
    model = QKV(d=64).cuda()
    doran.inject(model, doran.AdapterConfig.preset(preset, r=8, targets=("qkv",)))
    _perturb(model)
    x = torch.randn(8, 33, 64, device="cuda")
    res = {}
    for path in ("reference", "fused"):
        for scale in ("weight", "output"):
            model.zero_grad(set_to_none=True)
            with fused.execution(path=path, scale=scale), torch.autocast("cuda", dtype=torch.bfloat16):
                out = model(x)
            out.float().pow(2).mean().backward()
            res[path, scale] = (out.float(), {n: p.grad.float() for n, p in model.named_parameters()
                                              if p.grad is not None})
    ref_out, ref_grads = res["reference", "weight"]
    for key, (out, grads) in res.items():
        assert ((out - ref_out).norm() / ref_out.norm()).item() < 2e-2, key
        for name, grad in ref_grads.items():
            rel = ((grads[name] - grad).norm() / grad.norm().clamp_min(1e-12)).item()
            assert rel < 5e-2, (key, name, rel)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("preset", sorted(doran.PRESETS))
def test_inject_into_a_model_already_on_cuda(preset):
    """Adapters are drawn on the CPU and moved; m and tau must not mix devices on the way."""
    torch.manual_seed(0)
    model = QV().cuda()
    x = torch.randn(4, 16, device="cuda")
    before = model(x)
    heads = {"heads": 2} if preset == "hora" else {}
    doran.inject(model, doran.AdapterConfig.preset(preset, r=2, targets=("q_proj", "v_proj"), **heads))
    assert all(p.is_cuda for p in model.parameters())
    torch.testing.assert_close(model(x), before)
    model(x).sum().backward()


class Blocks(nn.Module):
    """Two attention-like blocks with q/v projections (the generator-sharing variants act per block)."""

    def __init__(self, d: int = 8, n: int = 2) -> None:
        super().__init__()
        self.layers = nn.ModuleList(QV(d) for _ in range(n))

    def forward(self, x):
        for block in self.layers:
            x = torch.tanh(block.q_proj(x) + block.v_proj(x))
        return x


@pytest.mark.parametrize("sharing", ["none", "qv_first", "qv_full", "global"])
def test_bank_equals_per_slice_and_reference_for_every_sharing_variant(sharing):
    torch.manual_seed(0)
    model = Blocks().double()
    doran.inject(model, doran.AdapterConfig.preset("doran", r=2, targets=("q_proj", "v_proj"), sharing=sharing))
    _perturb(model)
    x = torch.randn(5, 8, dtype=torch.float64)
    ref = _outputs_and_grads(model, x, "reference")
    for bank in (True, False):
        got = _outputs_and_grads(model, x, "fused", "auto", bank)
        _assert_same(got, ref)


def test_bank_serves_the_models_forward_only():
    from doran.fast import bank

    torch.manual_seed(0)
    model = Blocks()
    doran.inject(model, doran.AdapterConfig.preset("doran", r=2, targets=("q_proj", "v_proj")))
    seen = []
    model.layers[1].v_proj.register_forward_pre_hook(
        lambda m, a: seen.append(all(ad._banked is not None for ad in m.doran.values())))
    model(torch.randn(3, 8))
    assert seen == [True]
    assert len(bank._BANKS[model].groups) == 1  # 4 slices of one shape: one batched computation
    calls = []
    for _, m in doran.adapted_modules(model):
        for ad in m.doran.values():
            ad.scale_vector = lambda *a, ad=ad, f=ad.scale_vector: calls.append(1) or f(*a)
    model.layers[0].q_proj(torch.randn(3, 8))  # a layer called on its own: computes its own g
    assert calls == [1]
    model(torch.randn(3, 8))  # inside the model's forward: the bank's
    assert calls == [1]


def test_gradient_accumulation_over_two_forwards_with_the_bank():
    torch.manual_seed(0)
    model = Blocks().double()
    doran.inject(model, doran.AdapterConfig.preset("doran", r=2, targets=("q_proj", "v_proj")))
    _perturb(model)
    x1, x2 = torch.randn(3, 8, dtype=torch.float64), torch.randn(4, 8, dtype=torch.float64)
    model(x1).sum().backward()
    model(x2).pow(2).sum().backward()
    acc = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    with fused.execution(path="reference"):
        (model(x1).sum() + model(x2).pow(2).sum()).backward()
    for n, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(acc[n], p.grad, rtol=1e-10, atol=1e-12)


def test_eject_and_merged_copy_remove_the_bank_hooks():
    from doran.fast import bank

    model = Blocks()
    doran.inject(model, doran.AdapterConfig.preset("doran", r=2, targets=("q_proj", "v_proj")))
    plain = doran.merged_copy(model)
    assert bank._pre_hook not in plain._forward_pre_hooks.values()
    assert bank._pre_hook in model._forward_pre_hooks.values()
    twin = copy.deepcopy(model)
    doran.eject(twin)
    assert bank._pre_hook not in twin._forward_pre_hooks.values()
    assert bank._pre_hook in model._forward_pre_hooks.values()  # the original keeps its hooks
    assert bank._post_hook not in twin._forward_hooks.values()


@pytest.mark.parametrize("compiled_path", ["fused", "fused-nobank", "reference"])
@pytest.mark.parametrize("preset", ["lora", "dora", "doran"])
def test_a_compiled_model_is_one_graph_with_eager_gradients(preset, compiled_path):
    """torch.compile traces an adapted model (the fused path with the bank's batched computation in the
    graph, without it, or the reference path) without graph breaks (CPU, the aot_eager backend: no C
    compiler needed) and computes what the eager fused path computes."""
    torch.manual_seed(0)
    model = QKV()
    doran.inject(model, doran.AdapterConfig.preset(preset, r=4, targets=("qkv",)))
    _perturb(model)
    x = torch.randn(3, 5, 12)
    ref = model(x)
    ref.sum().backward()
    expect = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    path, _, nobank = compiled_path.partition("-")
    with fused.execution(compiled=path, compiled_bank=not nobank):
        out = compiled(x)
        out.sum().backward()
    torch.testing.assert_close(out, ref)
    for n, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(p.grad, expect[n], msg=n)


@pytest.mark.parametrize("compiled_bank, blocks, sharing", [(True, 2, "qv_first"), (False, 2, "qv_first"),
                                                           (True, 10, "qv_first"), (True, 10, "none"),
                                                           (True, 10, "global"), (True, 10, "qv_full")])
def test_a_compiled_model_traces_the_bank_into_its_graph(compiled_bank, blocks, sharing, monkeypatch):
    """Compiled, the layers take their factors and row scales from the bank's traced computation (or, if
    switched off, compute their own); gradients equal eager's either way. 10 blocks (20 slices) take the
    traced stack's tree of at most 8 inputs and, with shared first layers, the expanded stack."""
    from doran.fast import bank

    served = []
    original = bank.banked

    def spy(ad):
        got = original(ad)
        if torch.compiler.is_compiling():
            served.append(got is not None)
        return got

    monkeypatch.setattr(bank, "banked", spy)
    torch.manual_seed(0)
    model = Blocks(d=8, n=blocks).double()
    doran.inject(model, doran.AdapterConfig.preset("doran", r=2, targets=("q_proj", "v_proj"), sharing=sharing))
    _perturb(model)
    x = torch.randn(4, 8, dtype=torch.float64)
    with fused.execution(compiled="fused", compiled_bank=compiled_bank):
        ref = _outputs_and_grads(model, x, "fused")
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
        out, dx, grads = _outputs_and_grads(compiled, x, "fused")
    got = (out, dx, {n.removeprefix("_orig_mod."): g for n, g in grads.items()})
    assert len(served) == 2 * blocks and set(served) == {compiled_bank}  # each slice served by the bank or not
    _assert_same(got, ref)


@pytest.mark.parametrize("pattern", [[0, 1, 2], [0, 0, 1, 1, 2, 2], [0] * 12, list(range(20)),
                                     [i // 2 for i in range(20)], [0, 1, 0, 1], [0, 0, 1]])
def test_traced_stack_equals_torch_stack(pattern):
    """The bank's stack (a tree of at most 8 inputs when traced; runs of one shared tensor expanded) gives
    torch.stack's values and gradients, traced or not, whatever the sharing pattern."""
    from doran.fast.bank import _stack_shared

    distinct = [torch.randn(3, 2, dtype=torch.float64, requires_grad=True) for _ in range(max(pattern) + 1)]
    weights = torch.randn(len(pattern), 3, 2, dtype=torch.float64)

    def loss(fn):
        for t in distinct:
            t.grad = None
        out = fn([distinct[i] for i in pattern])
        (out * weights).sum().backward()
        return out.detach(), [t.grad.clone() for t in distinct]

    ref = loss(torch.stack)
    for fn in (_stack_shared, torch.compile(_stack_shared, backend="aot_eager", fullgraph=True)):
        out, grads = loss(fn)
        torch.testing.assert_close(out, ref[0], rtol=0, atol=0)
        for g, e in zip(grads, ref[1]):
            torch.testing.assert_close(g, e)
    torch._dynamo.reset()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
@pytest.mark.parametrize("preset", ["lora", "doran"])
def test_compiled_gradients_on_cuda_match_eager(preset, mode):
    """torch.compile (Inductor, and CUDA graphs with reduce-overhead) trains the same adapter as eager; 6
    blocks (12 slices) take the traced stack's tree and the expanded shared first layers."""
    torch.manual_seed(0)
    model = Blocks(d=64, n=6).cuda()
    doran.inject(model, doran.AdapterConfig.preset(preset, r=4, targets=("q_proj", "v_proj")))
    _perturb(model)
    x = torch.randn(32, 64, device="cuda")
    model(x).pow(2).mean().backward()
    expect = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert expect and all(g.abs().sum() > 0 for g in expect.values())
    compiled = torch.compile(model, mode=None if mode == "default" else mode)
    for _ in range(3):  # reduce-overhead records its graphs on a later call
        model.zero_grad(set_to_none=True)
        compiled(x).pow(2).mean().backward()
    for n, p in model.named_parameters():
        if n in expect:
            torch.testing.assert_close(p.grad, expect[n], rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize("reentrant", [False, True])
def test_bank_under_activation_checkpointing(reentrant):
    """Checkpointed blocks recompute their layers in the backward; gradients equal the reference path's."""
    from torch.utils.checkpoint import checkpoint

    class Checkpointed(Blocks):
        def forward(self, x):
            for block in self.layers:
                x = checkpoint(lambda y, b=block: torch.tanh(b.q_proj(y) + b.v_proj(y)), x,
                               use_reentrant=reentrant)
            return x

    torch.manual_seed(0)
    model = Checkpointed().double()
    doran.inject(model, doran.AdapterConfig.preset("doran", r=2, targets=("q_proj", "v_proj")))
    _perturb(model)
    x = torch.randn(5, 8, dtype=torch.float64)
    ref = _outputs_and_grads(model, x, "reference")
    got = _outputs_and_grads(model, x, "fused")
    _assert_same(got, ref)


def test_bank_follows_merge_and_unmerge():
    from doran.fast import bank

    torch.manual_seed(0)
    model = Blocks()
    doran.inject(model, doran.AdapterConfig.preset("doran", r=2, targets=("q_proj", "v_proj")))
    _perturb(model)
    x = torch.randn(3, 8)
    before = model(x)
    assert len(bank._BANKS[model].slices) == 4
    doran.merge(model)
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-6)
    assert len(bank._BANKS[model].slices) == 0  # merged layers run the base kernels, nothing to bank
    doran.unmerge(model)
    torch.testing.assert_close(model(x), before, rtol=1e-6, atol=1e-7)
    assert len(bank._BANKS[model].slices) == 4


def test_bank_stands_aside_when_parameters_are_sharded_after_it_was_built():
    """FSDP wrapping after a first forward leaves other layers' parameters empty during the root forward."""
    from doran.fast import bank

    model = Blocks()
    doran.inject(model, doran.AdapterConfig.preset("doran", r=2, targets=("q_proj", "v_proj")))
    model(torch.randn(2, 8))
    built = bank._BANKS[model]
    assert not bank._gathered_elsewhere(built)
    first = next(built.groups[0][0][1].parameters())
    kept = first.data
    first.data = torch.empty(0)  # what FSDP leaves in a parameter it holds sharded
    assert bank._gathered_elsewhere(built)
    first.data = kept


@pytest.mark.parametrize("preset, sharing", [("doran", "qv_first"), ("doran", "qv_full"), ("replora", "none"),
                                             ("hora", "qv_full")])
@pytest.mark.parametrize("how", ["bank", "nobank", "reference", "compiled"])
def test_gradients_arrive_in_the_parameters_layout(preset, sharing, how):
    """Every adapter gradient reaches autograd's accumulation in its parameter's own layout, so it is taken
    over as it is (a transposed one is copied, a kernel and host work per tensor and step: the generators'
    second layers were, 48 copies per ViT-B step)."""
    torch.manual_seed(0)
    model = Blocks(d=8, n=2)
    heads = {"heads": 2} if preset == "hora" else {}
    doran.inject(model, doran.AdapterConfig.preset(preset, r=2, targets=("q_proj", "v_proj"), sharing=sharing,
                                                   **heads))
    _perturb(model)
    layouts = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            p.register_hook(lambda g, p=p, name=name: layouts.__setitem__(
                name, g.is_contiguous() and g.stride() == p.stride()))
    run = doran.compile_model(model, "aot_eager") if how == "compiled" else model
    settings = {"bank": dict(path="fused", bank=True), "nobank": dict(path="fused", bank=False),
                "reference": dict(path="reference"), "compiled": dict(path="fused")}[how]
    with fused.execution(**settings):
        run(torch.randn(4, 8)).pow(2).sum().backward()
    torch._dynamo.reset()
    assert layouts and all(layouts.values()), [n for n, ok in layouts.items() if not ok]


def test_doran_step_dispatches_near_loras_ops_per_block():
    """Host cost of the eager step: the compute ops (kernels on a GPU) one forward and backward dispatch, per
    extra ViT block. The bank batches the generators and norms, the fused layer and the row-scale node do
    a layer's or a weight's slices in one op each: DoRAN's marginal block costs 20 ops more than LoRA's
    (55 against 35; it was 30 more before the stacked-B layer, 68 against 38)."""
    timm = pytest.importorskip("timm")
    from benchmarks.step_time import count_ops

    x, y = torch.randn(1, 3, 32, 32), torch.tensor([1])
    work = {"step": lambda m: torch.nn.functional.cross_entropy(m(x), y)}
    per_block = {}
    for preset in ("lora", "doran"):
        counts = []
        for depth in (2, 4):
            torch.manual_seed(0)
            model = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=10, depth=depth,
                                      embed_dim=48, num_heads=3, img_size=32)
            doran.inject(model, doran.AdapterConfig.preset(preset, r=8, alpha=16, targets=("qkv",)),
                         trainable=("head",))
            ops = count_ops(work, model)
            counts.append(ops["forward"]["compute"] + ops["backward"]["compute"])
        per_block[preset] = (counts[1] - counts[0]) / 2
    assert per_block["doran"] - per_block["lora"] <= 22, per_block


def test_long_products_in_chunks_equal_one_product():
    """The traced row-scale node computes A A^T and (D B)^T B over chunks of the width (fused._long_product)."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(3, 4, 2048, generator=g, dtype=torch.float64)
    Y = torch.randn(3, 2048, 5, generator=g, dtype=torch.float64)
    got = fused._long_product(X, Y, traced=True)
    torch.testing.assert_close(got, X @ Y, rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(fused._long_product(X, X.transpose(1, 2), traced=True), X @ X.transpose(1, 2),
                               rtol=1e-12, atol=1e-10)
    assert torch.equal(fused._long_product(X[:, :, :1000], Y[:, :1000], traced=True), X[:, :, :1000] @ Y[:, :1000])
