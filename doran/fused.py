"""The fused execution path of ``AdaptedLinear`` (LoRA and the DoRA family): same maths, fewer kernels.

The reference path (layers.py) runs every slice of a layer through plain autograd: per slice a low-rank
product, the factored norm as a dozen small autograd ops, ``g * (y + low)`` and, for a fused qkv, a
concatenation. On a GPU those small ops are launched and recorded by the host one at a time, so the step is
host-bound long before the GPU is busy. This path computes the same function with two hand-written
``autograd.Function`` s:

``row_scale``      g = m / (||W0 + s B A||_row + tau) for one slice, forward and backward in closed form
                   (REFERENCE.md, "The norm without the (out, in) matrix"); one autograd node instead of ~20.
``fused_linear``   the whole layer, all slices at once::

                       out = g * (x W0^T) + h (s g B_big)^T + b        h = drop(x) A_cat^T   (N, R)

                   where A_cat stacks the slices' A (R rows) and B_big (out, R) holds each slice's B in
                   its own rows and columns (zeros elsewhere; rows outside every slice, the k third of a
                   timm qkv, get g = 1 and no low-rank term, so they stay the base output exactly).

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

The products with the frozen W0 inside the norm (``W0 A^T`` and its transpose in the backward) run on a
half-precision W0 as three bf16 GEMMs with float32 accumulation on CUDA (the float32 factor split into
three bf16 parts, exact to float32 rounding), instead of upcasting W0: the GEMMs read W0 once, in its own
precision. Elsewhere (CPU, float16, float64) W0 is upcast in 16 MiB row blocks as in the reference.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F

_TINY = 1e-30
_SETTINGS = {"path": "fused", "scale": "auto"}
_PATHS = ("fused", "reference")
_SCALES = ("auto", "weight", "output")


def set_execution(path: str | None = None, scale: str | None = None) -> dict[str, str]:
    """Choose how adapted layers run; returns the previous settings.

    ``path``: ``"fused"`` (default; LoRA and the DoRA family, without Pre-Diag's diagonal or SORA's
    rotation) or ``"reference"`` (plain autograd, every method). ``scale``: how g is applied on the fused
    path, ``"auto"`` (by shape), ``"weight"`` or ``"output"``. Both paths compute the same function.
    """
    previous = dict(_SETTINGS)
    if path is not None:
        if path not in _PATHS:
            raise ValueError(f"unknown execution path {path!r}; choose one of {_PATHS}")
        _SETTINGS["path"] = path
    if scale is not None:
        if scale not in _SCALES:
            raise ValueError(f"unknown scale mode {scale!r}; choose one of {_SCALES}")
        _SETTINGS["scale"] = scale
    return previous


@contextmanager
def execution(path: str | None = None, scale: str | None = None):
    """Context manager form of :func:`set_execution`."""
    previous = set_execution(path, scale)
    try:
        yield
    finally:
        set_execution(**previous)


def fused_enabled() -> bool:
    return _SETTINGS["path"] == "fused"


def _no_autocast(device_type: str):
    return torch.autocast(device_type=device_type, enabled=False)


# ------------------------------------------------------------------------------ products with a frozen W0
_MIXED_MM: dict[str, bool] = {}


def _mixed_mm_available(device: torch.device) -> bool:
    """Whether ``torch.mm(bf16, bf16, out_dtype=float32)`` runs on this device (CUDA, recent torch)."""
    key = str(device)
    if key not in _MIXED_MM:
        try:
            a = torch.ones(2, 2, dtype=torch.bfloat16, device=device)
            _MIXED_MM[key] = torch.mm(a, a, out_dtype=torch.float32).dtype == torch.float32
        except (RuntimeError, TypeError, NotImplementedError):
            _MIXED_MM[key] = False
    return _MIXED_MM[key]


def _split3(X: torch.Tensor) -> list[torch.Tensor]:
    """float32 X as three bf16 tensors whose float32 sum is X to float32 rounding (8 + 8 + 8 bits)."""
    hi = X.to(torch.bfloat16)
    rest = X - hi.float()
    mid = rest.to(torch.bfloat16)
    lo = (rest - mid.float()).to(torch.bfloat16)
    return [hi, mid, lo]


def _use_split(W: torch.Tensor, X: torch.Tensor) -> bool:
    return (W.dtype == torch.bfloat16 and X.dtype == torch.float32 and W.is_cuda
            and _mixed_mm_available(W.device))


def weight_times(W: torch.Tensor, X: torch.Tensor, chunk_elements: int = 1 << 22) -> torch.Tensor:
    """``W @ X`` in X's precision; W (out, in) frozen in any float dtype, X (in, k) float32/64."""
    if W.dtype == X.dtype:
        return W @ X
    k = X.shape[1]
    if _use_split(W, X):
        parts = torch.mm(W, torch.cat(_split3(X), dim=1), out_dtype=torch.float32)  # (out, 3k)
        return parts[:, :k] + parts[:, k : 2 * k] + parts[:, 2 * k :]
    rows = max(1, chunk_elements // W.shape[1])
    if W.shape[0] <= rows:
        return W.to(X.dtype) @ X
    return torch.cat([W[i : i + rows].to(X.dtype) @ X for i in range(0, W.shape[0], rows)])


def times_weight(Y: torch.Tensor, W: torch.Tensor, chunk_elements: int = 1 << 22) -> torch.Tensor:
    """``Y @ W`` in Y's precision; Y (k, out) float32/64, W (out, in) frozen in any float dtype."""
    if W.dtype == Y.dtype:
        return Y @ W
    k = Y.shape[0]
    if _use_split(W, Y):
        parts = torch.mm(torch.cat(_split3(Y), dim=0), W, out_dtype=torch.float32)  # (3k, in)
        return parts[:k] + parts[k : 2 * k] + parts[2 * k :]
    rows = max(1, chunk_elements // W.shape[1])
    total = None
    for i in range(0, W.shape[0], rows):
        part = Y[:, i : i + rows] @ W[i : i + rows].to(Y.dtype)
        total = part if total is None else total.add_(part)
    return total


# ------------------------------------------------------------------------------ g = m / (||V||_row + tau)
class _RowScale(torch.autograd.Function):
    """g (out,) from A (H, r, in), B (H, d, r), m (out,), t (1,)/(out,)/None and the frozen rows W (out, in).

    q = ||W0||^2 + 2 s <B, W0 A^T>_row + s^2 <B A A^T, B>_row, n = sqrt(max(q, 0)), g = m / (n + t).
    Backward (D = diag(dq)): dB = D (2 s W0 A^T + 2 s^2 B A A^T), dA = 2 s (D B)^T W0 + 2 s^2 B^T D B A
    (per head), dq = dn / (2 n) (0 where n = 0, as safe_sqrt), dn = dt = -dg g / (n + t), dm = dg / (n + t).
    """

    @staticmethod
    def forward(ctx, A, B, m, t, W, w0_sq, s: float, detach: bool):
        with _no_autocast(A.device.type):
            H, r, in_f = A.shape
            d = B.shape[1]
            P = weight_times(W, A.reshape(H * r, in_f).t())  # (out, H r)
            WAt = P.view(1, d, r) if H == 1 else P.view(H, d, H, r).diagonal(dim1=0, dim2=2).permute(2, 0, 1)
            BAAt = B @ (A @ A.transpose(1, 2))  # (H, d, r)
            q = w0_sq + (2.0 * s) * (B * WAt).sum(-1).flatten() + (s * s) * (BAAt * B).sum(-1).flatten()
            n = torch.where(q > 0, q.clamp_min(_TINY).sqrt(), torch.zeros_like(q))
            den = n if t is None else n + t
            g = m / den
        ctx.s, ctx.detach, ctx.t_shape = s, detach, None if t is None else t.shape
        ctx.save_for_backward(A, B, W, WAt, BAAt, n, den, g)
        return g

    @staticmethod
    def backward(ctx, dg):
        A, B, W, WAt, BAAt, n, den, g = ctx.saved_tensors
        s = ctx.s
        with _no_autocast(A.device.type):
            dm = dg / den
            dden = -dg * g / den
            dt = None
            if ctx.t_shape is not None and ctx.needs_input_grad[3]:
                dt = dden if ctx.t_shape == dden.shape else dden.sum().reshape(ctx.t_shape)
            dA = dB = None
            if not ctx.detach and (ctx.needs_input_grad[0] or ctx.needs_input_grad[1]):
                H, r, in_f = A.shape
                d = B.shape[1]
                dq = torch.where(n > 0, dden / (2.0 * n.clamp_min(_TINY)), torch.zeros_like(n))
                Dq = dq.view(H, d, 1)
                dB = Dq * ((2.0 * s) * WAt + (2.0 * s * s) * BAAt)
                DB = Dq * B  # (H, d, r)
                M = DB.reshape(H * d, r) if H == 1 else torch.block_diag(*DB.unbind(0))  # (out, H r)
                dA = (2.0 * s) * times_weight(M.t(), W).view(H, r, in_f)
                dA = dA + (2.0 * s * s) * (DB.transpose(1, 2) @ B) @ A
        return dA, dB, dm, dt, None, None, None, None


def row_scale(A, B, m, t, W, w0_sq, s: float, detach: bool) -> torch.Tensor:
    """g = m / (||W0 + s B A||_row + t), exact, one autograd node. A (r, in) or (H, r, in); B (out, r) or
    (H, d, r); W the frozen rows (out, in) in any dtype; m, w0_sq (out,); t (1,), (out,) or None."""
    if A.ndim == 2:
        A, B = A.unsqueeze(0), B.unsqueeze(0)
    return _RowScale.apply(A, B, m, t, W.detach(), w0_sq, float(s), bool(detach))


# ------------------------------------------------------------------------------ the fused layer
class _FusedLinear(torch.autograd.Function):
    """out = g * (x W^T) + h (s g B_big)^T + b, g = 1 outside ``ranges`` (or everywhere for LoRA: gcat None).

    x (N, in), W (out, in), b (out,) or None, h (N, R): all in the compute dtype; B_big (out, R) and gcat
    (sum of slice rows,) in the adapter's precision.
    """

    @staticmethod
    def forward(ctx, x, W, b, h, B_big, gcat, ranges, s: float, mode: str):
        cd = x.dtype
        with _no_autocast(x.device.type):
            Bs = (B_big * s).to(cd)
            g = None
            if gcat is not None:
                g = torch.ones(W.shape[0], dtype=gcat.dtype, device=gcat.device)
                offset = 0
                for start, stop in ranges:
                    g[start:stop] = gcat[offset : offset + stop - start]
                    offset += stop - start
                g = g.to(cd)
            if g is None:
                out = F.linear(x, W, b)
                out.addmm_(h, Bs.t())
            elif mode == "weight":
                out = F.linear(x, W * g[:, None], b)
                out.addmm_(h, (Bs * g[:, None]).t())
            else:
                out = torch.mm(x, W.t())
                out.addmm_(h, Bs.t())
                out.mul_(g)
                if b is not None:
                    out.add_(b)
        ctx.s, ctx.mode, ctx.ranges = s, mode, ranges
        ctx.B_dtype = B_big.dtype
        ctx.has_bias = b is not None
        ctx.save_for_backward(W, b, h, Bs, g, gcat, out if g is not None else None)
        return out

    @staticmethod
    def backward(ctx, dy):
        W, b, h, Bs, g, gcat, out = ctx.saved_tensors
        need_x, _, need_b, need_h, need_B, need_g = ctx.needs_input_grad[:6]
        dx = db = dh = dB = dg = None
        with _no_autocast(dy.device.type):
            dy = dy.contiguous()
            if g is None:
                dz, Wx, Bx = dy, W, Bs
            elif ctx.mode == "weight":
                dz, Wx, Bx = dy, W * g[:, None], Bs * g[:, None]
            else:
                dz, Wx, Bx = dy * g, W, Bs
            if need_x:
                dx = dz @ Wx
            if need_h:
                dh = dz @ Bx
            if need_B:
                dB = (dy.t() @ h).to(ctx.B_dtype)
                row = ctx.s if g is None else ctx.s * g.to(ctx.B_dtype)[:, None]
                dB = dB * row
            if need_b and ctx.has_bias:
                db = dy.sum(0)
            if need_g and g is not None:
                parts = []
                acc = gcat.dtype
                for start, stop in ctx.ranges:
                    dyk, ok = dy[:, start:stop], out[:, start:stop]
                    raw = (dyk * ok).sum(0, dtype=acc)
                    if b is not None:
                        raw = raw - b[start:stop].to(acc) * dyk.sum(0, dtype=acc)
                    parts.append(raw)
                raw = torch.cat(parts) if len(parts) > 1 else parts[0]
                dg = torch.where(gcat != 0, raw / torch.where(gcat != 0, gcat, torch.ones_like(gcat)),
                                 torch.zeros_like(raw))
        return dx, None, db, dh, dB, dg, None, None, None


def _scale_mode(tokens: int, in_features: int) -> str:
    mode = _SETTINGS["scale"]
    if mode != "auto":
        return mode
    return "weight" if tokens > in_features else "output"


def fusable(layer) -> bool:
    """Whether the fused path computes this layer (LoRA / DoRA family, frozen base weight)."""
    if layer.weight.requires_grad:
        return False
    cfgs = [ad.cfg for ad in layer.doran.values()]
    return all(not c.diag and c.rotation_rank == 0 and c.magnitude == cfgs[0].magnitude
               and c.scale == cfgs[0].scale for c in cfgs)


def _block_rows(B: torch.Tensor) -> torch.Tensor:
    """A slice's B as an (out_k, R_k) matrix: (out, r) as is, per head (H, d, r) block-diagonal."""
    return B if B.ndim == 2 else torch.block_diag(*B.unbind(0))


def fused_forward(layer, x: torch.Tensor) -> torch.Tensor:
    """The adapted output of ``layer`` (an AdaptedLinear) for input x (..., in), on the fused path."""
    ads = sorted(layer.doran.values(), key=lambda a: a.start)
    in_f, out_f = layer.in_features, layer.out_features
    lead = x.shape[:-1]
    x2 = x.reshape(-1, in_f)
    dev = x2.device.type
    cd = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x2.dtype
    xc = x2.to(cd)
    W = layer.weight.to(cd)
    b = None if layer.bias is None else layer.bias.to(cd)

    factors = [ad.factors() for ad in ads]
    A_cat = torch.cat([A.reshape(-1, in_f) for A, _ in factors]) if len(ads) > 1 else factors[0][0].reshape(-1, in_f)
    dropping = layer.training and ads[0].cfg.dropout > 0
    if dropping:  # each slice its own mask, as on the reference path
        h = torch.cat([F.linear(ad.drop(xc), A.reshape(-1, in_f).to(cd)) for ad, (A, _) in zip(ads, factors)],
                      dim=1)
    else:
        h = F.linear(xc, A_cat.to(cd))  # (N, R): one GEMM for every slice
    R = h.shape[1]

    pieces, col, last = [], 0, 0
    for ad, (_, B) in zip(ads, factors):
        Bk = _block_rows(B)
        if ad.start > last:
            pieces.append(Bk.new_zeros(ad.start - last, R))
        pieces.append(Bk if Bk.shape[1] == R else F.pad(Bk, (col, R - col - Bk.shape[1])))
        col += Bk.shape[1]
        last = ad.stop
    if last < out_f:
        pieces.append(pieces[-1].new_zeros(out_f - last, R))
    B_big = torch.cat(pieces) if len(pieces) > 1 else pieces[0]

    gcat, mode = None, "none"
    if ads[0].cfg.magnitude:
        gs = [ad.scale_vector(layer.weight, A, B) for ad, (A, B) in zip(ads, factors)]
        gcat = torch.cat(gs) if len(gs) > 1 else gs[0]
        mode = _scale_mode(x2.shape[0], in_f)
    ranges = tuple((ad.start, ad.stop) for ad in ads)
    out = _FusedLinear.apply(xc, W, b, h, B_big, gcat, ranges, float(ads[0].s), mode)
    return out.reshape(*lead, out_f)
