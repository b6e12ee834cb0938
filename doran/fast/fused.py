"""The fused execution path of ``AdaptedLinear`` (LoRA and the DoRA family): same maths, fewer kernels.

The reference path (doran/layers.py) runs every slice of a layer through plain autograd: per slice a
low-rank product, the factored norm as many small autograd ops, ``g * (y + low)`` and, for a fused qkv, a
concatenation. On a GPU those small ops are launched and recorded by the host one at a time, so the step is
host-bound long before the GPU is busy. This path computes the same function with two hand-written
``autograd.Function`` s:

``row_scale``      g = m / (||W0 + s B A||_row + tau) for one slice, forward and backward in closed form
                   (doran/fast/rowscale.py): one autograd node for the whole norm.
``fused_linear``   the whole layer, all slices at once::

                       out = g * (x W0^T) + h (s g B_big)^T + b        h = drop(x) A_cat^T   (N, R)

                   where A_cat stacks the slices' A (R rows) and B_big (out, R) holds each slice's B in
                   its own rows and columns (zeros elsewhere; rows outside every slice, the k third of a
                   timm qkv, get g = 1 and no low-rank term, so they stay the base output exactly).
                   Eager, slices of one shape reach the node as one stack (k, d, r) and B_big is built
                   inside it; when they are also evenly spaced (one slice, a qkv's q and v) the backward
                   works on strided (N, k, d) views of dy and the output, so a layer's dL/dg and dB are a
                   handful of ops whatever k is (the host, not the GPU, bounds an eager step).

Two exact ways to apply g (chosen per call by shape, ``set_execution(scale=...)`` overrides):

- ``weight``: scale the weight rows, ``x (g W0)^T``: one (out, in) elementwise product, nothing per token.
  Cheaper when tokens per step N exceed the input width (ViT-B/16: N = 12,608 > 768).
- ``output``: ``g * (x W0^T + ...)``: one (N, out) elementwise product. Cheaper when N <= in (a LLaMA
  batch of 4 x 512 = 2,048 tokens against width 4,096).

Either way the backward needs ``dL/dg_i = sum_t dy_ti z_ti`` with ``z = (out - b) / g`` the unscaled output.
It is recovered from the saved *output* (which attention keeps alive anyway), so no (N, out) activation is
stored beyond what LoRA stores and no weight-gradient GEMM ``dy^T x`` is run. A row with ``g_i = 0`` exactly
(a magnitude of exactly 0) carries no information about ``z``; its ``dL/dg_i`` is returned as 0 there, the
only place where this path differs from the reference (which stores z).

The products with the frozen W0 inside the norm run in the adapter's precision without an upcast copy of a
half-precision W0 (doran/fast/ops.py).

Under ``torch.compile`` the compiler traces these nodes (forward and hand-written backward) and fuses
their small ops, and the adapter bank's batched computation is traced with them. The forward is written
out of place while traced: in-place updates of the freshly computed output (``addmm_``, ``mul_``) can be
lost in a compiled CUDA graph, and the adapter would then not reach the output (the GPU test
tests/test_fused.py::test_compiled_gradients_on_cuda_match_eager guards it).
``set_execution(compiled="reference")`` makes compiled models trace plain autograd instead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..settings import _SETTINGS
from . import bank
from .ops import needs as _needs  # looked up here at call time: benchmarks/compile_probe.py spies on it
from .ops import no_autocast
from .slices import block_rows, columns, diagonal_blocks, even_layout, full_g, row_blocks, spread

# Re-exported: the pieces of this path as tests and benchmarks reach them (doran.fast.fused.<name>)
from ..settings import execution as execution
from ..settings import set_execution as set_execution
from .ops import _long_product as _long_product
from .ops import _split3 as _split3
from .ops import times_weight as times_weight
from .ops import weight_times as weight_times
from .rowscale import row_scale as row_scale
from .rowscale import row_scales as row_scales
from .slices import fusable as fusable


class _FusedLinear(torch.autograd.Function):
    """out = g * (x W^T) + h (s g B_big)^T + b, g = 1 outside ``ranges`` (or everywhere for LoRA: gcat None).

    x (N, in), W (out, in), b (out,) or None, h (N, R): all in the compute dtype; gcat (sum of slice rows,)
    and B in the adapter's precision, either B_big (out, R) or, for slices of one shape, their B stacked
    (k, d, r): B_big is then built here without autograd and the backward hands back the gradient of the
    stack (B_big's diagonal blocks). For evenly laid out slices (``even_layout``) the eager backward computes
    dL/dg and that gradient through strided views: a handful of ops per layer whatever k is.
    """

    @staticmethod
    def forward(ctx, x, W, b, h, B, gcat, ranges, s: float, mode: str, raw_dg: bool = False, aux=None):
        ctx.raw_dg = raw_dg  # hand back g * dL/dg for gcat (the bank divides, doran/fast/bank.py's _GradTimesG)
        g_full, ctx.gs = aux if aux is not None else (None, None)  # eager constants from the bank (detached)
        ctx.g_full = g_full
        if torch.compiler.is_compiling():
            return _FusedLinear._traced_forward(ctx, x, W, b, h, B, gcat, ranges, s, mode)
        cd = x.dtype
        out_f = W.shape[0]
        even = even_layout(ranges)
        whole = ranges == ((0, out_f),)
        with no_autocast(x.device.type):
            if gcat is not None and mode == "weight":  # W' = g W0, B' = s g B: one GEMM each, saved as they are
                if B.ndim == 2 and whole and ctx.gs is not None:
                    Bx = torch.mul(B, ctx.gs[:, None], out=torch.empty(B.shape, dtype=cd, device=B.device))
                elif B.ndim == 2:
                    Bx = torch.mul(B * s, gcat[:, None] if whole else full_g(gcat, ranges, out_f, B.dtype)[:, None],
                                   out=torch.empty(B.shape, dtype=cd, device=B.device))
                elif even is not None:
                    Bx = B.new_zeros((out_f, B.shape[0] * B.shape[2]), dtype=cd)
                    diagonal_blocks(Bx, even).addcmul_(B, gcat.view(even.count, even.size, 1), value=s)
                else:
                    Bx = torch.mul(spread(list(B.unbind(0)), ranges, out_f) * s,
                                   full_g(gcat, ranges, out_f, B.dtype)[:, None]).to(cd)
                if whole:
                    Wx = torch.mul(W, gcat[:, None], out=torch.empty_like(W))
                elif g_full is not None:
                    Wx = torch.mul(W, g_full[:, None], out=torch.empty_like(W))
                elif even is not None:
                    Wx = W.clone()
                    torch.mul(row_blocks(W, even), gcat.view(even.count, even.size, 1), out=row_blocks(Wx, even))
                else:
                    Wx = torch.mul(W, full_g(gcat, ranges, out_f, gcat.dtype)[:, None], out=torch.empty_like(W))
                out = F.linear(x, Wx, b)
                out.addmm_(h, Bx.t())
                g = None
            else:
                if B.ndim == 2:
                    Bx = torch.mul(B, s, out=torch.empty(B.shape, dtype=cd, device=B.device))
                elif even is not None:  # the stacked slices into their blocks of a zero B_big
                    Bx = B.new_zeros((out_f, B.shape[0] * B.shape[2]), dtype=cd)
                    torch.mul(B, s, out=diagonal_blocks(Bx, even))
                else:
                    Bx = (spread(list(B.unbind(0)), ranges, out_f) * s).to(cd)
                Wx = W
                if gcat is None:
                    out = F.linear(x, W, b)
                    out.addmm_(h, Bx.t())
                    g = None
                else:  # z = x W0^T + h (s B)^T; out = g z + b, g in float32 applied to the slices' columns
                    out = torch.mm(x, W.t())
                    out.addmm_(h, Bx.t())
                    if whole:
                        out.mul_(gcat)
                    elif even is not None:
                        columns(out, even).mul_(gcat.view(even.count, even.size))
                    else:
                        out.mul_(full_g(gcat, ranges, out_f, gcat.dtype))
                    if b is not None:
                        out.add_(b)
                    g = gcat
        _keep(ctx, False, s, mode, ranges, B, (Wx, b, h, Bx, g, gcat, out if gcat is not None else None))
        return out

    @staticmethod
    def _traced_forward(ctx, x, W, b, h, B, gcat, ranges, s: float, mode: str):
        """The forward as torch.compile traces it: out of place, g built in the compute dtype (the compiler
        fuses the small ops into its kernels)."""
        cd = x.dtype
        out_f = W.shape[0]
        with no_autocast(x.device.type):
            Bs = (B * s).to(cd) if B.ndim == 2 else (spread(list(B.unbind(0)), ranges, out_f) * s).to(cd)
            g = None
            if gcat is not None and ranges == ((0, out_f),):
                g = gcat.to(cd)
            elif gcat is not None:
                g = full_g(gcat, ranges, out_f, cd)
            if g is None:
                out = torch.addmm(F.linear(x, W, b), h, Bs.t())
            elif mode == "weight":
                out = torch.addmm(F.linear(x, W * g[:, None], b), h, (Bs * g[:, None]).t())
            else:
                out = torch.addmm(torch.mm(x, W.t()), h, Bs.t()) * g
                if b is not None:
                    out = out + b
        _keep(ctx, True, s, mode, ranges, B, (W, b, h, Bs, g, gcat, out if g is not None else None))
        return out

    @staticmethod
    def backward(ctx, dy):
        W, b, h, Bs, g, gcat, out = ctx.saved_tensors
        need_x, _, need_b, need_h, need_B, need_g = _needs(ctx, 6)
        ranges, s = ctx.ranges, ctx.s
        traced = ctx.traced
        out_f = W.shape[0]
        even = None if traced else even_layout(ranges)  # traced: per-range ops, fused anyway
        dx = db = dh = dB = dg = None
        with no_autocast(dy.device.type):
            dy = dy.contiguous()
            if traced:
                if g is None:
                    dz, Wx, Bx = dy, W, Bs
                elif ctx.mode == "weight":
                    dz, Wx, Bx = dy, W * g[:, None], Bs * g[:, None]
                else:
                    dz, Wx, Bx = dy * g, W, Bs
            else:  # eager: W and B were saved as the GEMMs used them (g in them in weight mode)
                Wx, Bx = W, Bs
                if g is None:
                    dz = dy
                elif ranges == ((0, out_f),):
                    dz = torch.mul(dy, g, out=torch.empty_like(dy))
                elif ctx.g_full is not None:
                    dz = torch.mul(dy, ctx.g_full, out=torch.empty_like(dy))
                elif even is not None:
                    dz = dy.clone()
                    columns(dz, even).mul_(g.view(even.count, even.size))
                else:
                    dz = torch.mul(dy, full_g(g, ranges, out_f, g.dtype), out=torch.empty_like(dy))
            if need_x:
                dx = dz @ Wx
            if need_h:
                dh = dz @ Bx
            # traced output mode: only dz = g dy is used (dB = s dz^T h, dL/dg from dz): the compiler then
            # fuses g into dy's producer and never writes dy itself (one (N, out) tensor less per layer)
            from_dz = traced and g is not None and ctx.mode != "weight"
            if need_B:
                dBig = (dz if from_dz else dy).t() @ h  # (out, R)
                dB = _dB(dBig, None if from_dz else gcat, ranges, even, s, ctx.B_ndim, ctx.B_dtype, out_f,
                         None if from_dz else ctx.gs)
            if need_b and ctx.has_bias:
                db = dy.sum(0)
            if need_g and gcat is not None:
                acc = gcat.dtype
                if from_dz:  # dL/dg = sum_t dy z = sum_t dz (out - b) / g^2 (g as applied, in the compute dtype)
                    parts = []
                    for start, stop in ranges:
                        ok = out[:, start:stop]
                        if b is not None:
                            ok = ok - b[start:stop]
                        raw = (dz[:, start:stop] * ok).sum(0, dtype=acc)
                        gk = g[start:stop].to(acc)
                        parts.append(torch.where(gk != 0, raw / gk / gk, 0.0))
                    dg = torch.cat(parts) if len(parts) > 1 else parts[0]
                elif even is not None:  # every slice at once through (N, k, d) views of dy and out
                    dyv = columns(dy, even)
                    raw = (dyv * columns(out, even)).sum(0, dtype=acc)
                    if b is not None:  # z = (out - b) / g
                        raw = torch.addcmul(raw, columns(b, even), dyv.sum(0, dtype=acc), value=-1)
                    dg = raw.reshape(-1) if ctx.raw_dg else raw.reshape(-1).div_(gcat).masked_fill_(gcat == 0, 0.0)
                else:
                    parts = []
                    for start, stop in ranges:
                        dyk, ok = dy[:, start:stop], out[:, start:stop]
                        raw = (dyk * ok).sum(0, dtype=acc)
                        if b is not None:
                            raw = raw - b[start:stop].to(acc) * dyk.sum(0, dtype=acc)
                        parts.append(raw)
                    raw = torch.cat(parts) if len(parts) > 1 else parts[0]
                    # g = 0: z is not in the output (module doc)
                    dg = raw if ctx.raw_dg else torch.where(gcat != 0, raw / gcat, 0.0)
        return dx, None, db, dh, dB, dg, None, None, None, None, None


def _keep(ctx, traced: bool, s: float, mode: str, ranges, B: torch.Tensor, saved: tuple) -> None:
    """What _FusedLinear's backward reads: the settings and, saved, (W, b, h, B as used, g, gcat, out)."""
    ctx.s, ctx.mode, ctx.ranges, ctx.traced = s, mode, ranges, traced
    ctx.B_dtype, ctx.B_ndim = B.dtype, B.ndim
    ctx.has_bias = saved[1] is not None
    ctx.save_for_backward(*saved)


def _dB(dBig, gcat, ranges, even, s: float, B_ndim: int, B_dtype, out_f: int, gs=None) -> torch.Tensor:
    """The gradient of B (B_big (out, R) or the stack (k, d, r)) from that of B_big, times s (and g); ``gs``:
    s g (the slices' rows) when the bank hands it over, one multiply instead of two."""
    if B_ndim == 2:
        if gcat is None:
            return torch.mul(dBig, s, out=torch.empty(dBig.shape, dtype=B_dtype, device=dBig.device))
        if gs is not None and ranges == ((0, out_f),):
            return torch.mul(dBig, gs[:, None]).to(B_dtype)
        g = gcat if ranges == ((0, out_f),) else full_g(gcat, ranges, out_f, gcat.dtype)
        return torch.mul(dBig, g[:, None]).to(B_dtype).mul_(s)
    if even is not None:  # the diagonal blocks, each row times s g
        blocks = diagonal_blocks(dBig, even)
    else:
        r = dBig.shape[1] // len(ranges)
        blocks = torch.stack([dBig[a:z, j * r : (j + 1) * r] for j, (a, z) in enumerate(ranges)])
    if gcat is None:
        return torch.mul(blocks, s, out=torch.empty(blocks.shape, dtype=B_dtype, device=dBig.device))
    if gs is not None:
        return torch.mul(blocks, gs.view(blocks.shape[0], -1, 1)).to(B_dtype)
    return torch.mul(blocks, gcat.view(blocks.shape[0], -1, 1)).to(B_dtype).mul_(s)


def _scale_mode(tokens: int, in_features: int) -> str:
    mode = _SETTINGS["scale"]
    if mode != "auto":
        return mode
    return "weight" if tokens > in_features else "output"


def fused_forward(layer, x: torch.Tensor) -> torch.Tensor:
    """The adapted output of ``layer`` (an AdaptedLinear) for input x (..., in), on the fused path.

    Example::

        if fusable(layer):
            y = fused_forward(layer, x)   # what layer(x) computes, with fewer autograd nodes
    """
    ads = sorted(layer.doran.values(), key=lambda a: a.start)
    in_f, out_f = layer.in_features, layer.out_features
    lead = x.shape[:-1]
    x2 = x.reshape(-1, in_f)
    dev = x2.device.type
    cd = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x2.dtype
    xc = x2.to(cd)
    W = layer.weight.to(cd)
    b = None if layer.bias is None else layer.bias.to(cd)

    banked = [bank.banked(ad) for ad in ads]  # what the model's bank computed for each slice, or None
    dropping = layer.training and ads[0].cfg.dropout > 0
    views = banked[0].layer if banked[0] is not None else None
    if views is not None and not dropping and views.dtype == cd and all(bk is not None for bk in banked):
        # the bank's views of this layer's tensors: A (k r, in) already in the compute dtype, B (k, d, r), g
        h = F.linear(xc, views.A)
        ranges = tuple((ad.start, ad.stop) for ad in ads)
        B_in = views.B[0] if ranges == ((0, out_f),) else views.B
        mode = "none" if views.g is None else _scale_mode(x2.shape[0], in_f)
        # raw_dg: g comes through the bank's _GradTimesG, which divides g * dL/dg by g for all layers at once
        # (g_full, s g): g over all of the layer's rows and g times s, detached, from the bank (or None)
        out = _FusedLinear.apply(xc, W, b, h, B_in, views.g, ranges, float(ads[0].s), mode, True,
                                 (views.g_full, views.gs))
        return out.reshape(*lead, out_f)
    factors = [ad.factors() if bk is None else (bk.A, bk.B) for ad, bk in zip(ads, banked)]
    A_cat = torch.cat([A.reshape(-1, in_f) for A, _ in factors]) if len(ads) > 1 else factors[0][0].reshape(-1, in_f)
    if dropping:  # each slice its own mask, as on the reference path
        h = torch.cat([F.linear(ad.drop(xc), A.reshape(-1, in_f).to(cd)) for ad, (A, _) in zip(ads, factors)],
                      dim=1)
    else:
        h = F.linear(xc, A_cat.to(cd))  # (N, R): one GEMM for every slice

    ranges = tuple((ad.start, ad.stop) for ad in ads)
    if len(ads) == 1 and ranges == ((0, out_f),):
        B_in = block_rows(factors[0][1])  # (out, R) is B_big itself
    elif not torch.compiler.is_compiling() and all(B.ndim == 2 and B.shape == factors[0][1].shape
                                                    for _, B in factors):
        B_in = torch.stack([B for _, B in factors])  # (k, d, r): spread into B_big inside the node
    else:  # traced (the compiler fuses the pads), per-head factors (block-diagonal B), unequal slices
        B_in = spread([block_rows(B) for _, B in factors], ranges, out_f)
    gcat, mode = None, "none"
    if ads[0].cfg.magnitude:
        gs = [ad.scale_vector(layer.weight, A, B) if bk is None or bk.g is None else bk.g
              for ad, (A, B), bk in zip(ads, factors, banked)]
        gcat = torch.cat(gs) if len(gs) > 1 else gs[0]
        mode = _scale_mode(x2.shape[0], in_f)
    out = _FusedLinear.apply(xc, W, b, h, B_in, gcat, ranges, float(ads[0].s), mode, False)
    return out.reshape(*lead, out_f)
