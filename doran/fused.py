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

The products with the frozen W0 inside the norm (``W0 A^T`` and its transpose in the backward) run on a
half-precision W0 as three bf16 GEMMs with float32 accumulation on CUDA (the float32 factor split into
three bf16 parts, exact to float32 rounding; split once for all slices), instead of upcasting W0: the
GEMMs read W0 once, in its own precision, one GEMM per base weight for all of its slices. Elsewhere (CPU,
float16, float64) W0 is upcast in 16 MiB row blocks as in the reference.

Under ``torch.compile`` the compiler traces these nodes (forward and hand-written backward) and fuses
their small ops, and the adapter bank's batched computation is traced with them. The forward is written out of place while traced:
on torch 2.11 with CUDA the in-place updates of the freshly computed output (``addmm_``, ``mul_``) were
lost in the compiled graph, so the adapter did not reach the output and every adapter gradient was zero
(benchmarks/compile_probe.py; the GPU test tests/test_fused.py::test_compiled_gradients_on_cuda_match_eager
guards it). ``set_execution(compiled="reference")`` makes compiled models trace plain autograd instead.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import torch
import torch.nn.functional as F

from . import bank as _bank  # circular (bank uses this module at call time only)
from .settings import _SETTINGS, execution, fused_enabled, set_execution  # noqa: F401 (doran.fused.<name>)

_TINY = 1e-30
def _no_autocast(device_type: str):
    return torch.autocast(device_type=device_type, enabled=False)


# ------------------------------------------------------------------------------ products with a frozen W0
# torch.mm(bf16, bf16, out_dtype=float32): CUDA kernels of recent torch (tests/test_fused.py checks it on a GPU)
_MIXED_MM = hasattr(torch.ops.aten.mm, "dtype")


def _split3(X: torch.Tensor) -> list[torch.Tensor]:
    """float32 X as three bf16 tensors whose float32 sum is X to float32 rounding (8 + 8 + 8 bits)."""
    hi = X.to(torch.bfloat16)
    rest = X - hi.float()
    mid = rest.to(torch.bfloat16)
    lo = (rest - mid.float()).to(torch.bfloat16)
    return [hi, mid, lo]


def _use_split(W: torch.Tensor, X: torch.Tensor) -> bool:
    return _MIXED_MM and W.dtype == torch.bfloat16 and X.dtype == torch.float32 and W.is_cuda


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


def _w0_products(Ws, members, d: int, X: torch.Tensor, left: bool) -> torch.Tensor:
    """Every slice's product with its rows of its frozen weight, one GEMM per weight for all of its slices,
    in X's precision: ``left``: W_i X_i for X (S, in, c) -> (S, d, c); else X_i^T W_i for X (S, d, c) ->
    (S, c, in), W_i slice i's (d, in) rows. Against a bf16 W on CUDA, X is split into three bf16 parts
    (``_split3``) once for all slices and each GEMM accumulates in float32; against another dtype W is
    upcast in row blocks (``weight_times``). One GEMM over the whole weight, not a batched product over
    its slices' rows: cuBLAS runs the latter (batch 2, 8 columns) with a kernel three times slower."""
    split = _use_split(Ws[0], X)
    direct = split or Ws[0].dtype == X.dtype
    X3 = torch.cat(_split3(X), dim=2) if split else X  # (S, in or d, 3c or c)
    c3 = X3.shape[2]
    kw = {"out_dtype": torch.float32} if split else {}
    parts: list[Any] = [None] * X.shape[0]
    # eager, several slices per weight laid out alike (a qkv's q and v): every weight's operand of the GEMM
    # built by one copy for all weights instead of a cat (and pads) per weight; traced, the compiler fuses them
    same = None if torch.compiler.is_compiling() or not direct or any(W.shape != Ws[0].shape for W in Ws) \
        else _alike(members, Ws[0].shape[0], d)
    if same is not None:
        k, even = same
        n_w = len(Ws)
        if left:  # (n_w, in, k c3): weight w's [X_1 | X_2]
            Xs = X3.reshape(n_w, k, *X3.shape[1:]).permute(0, 2, 1, 3).reshape(n_w, X3.shape[1], k * c3)
        else:  # (n_w, k c3, rows): weight w's [X_1^T | 0 | X_2^T] rows, zeros elsewhere
            rows = Ws[0].shape[0]
            Xs = X3.new_zeros(n_w, k, c3, rows)
            start, _, _, step = even
            Xs[..., start:].as_strided((n_w, k, c3, d), (k * c3 * rows, c3 * rows + step, rows, 1)).copy_(
                X3.reshape(n_w, k, d, c3).transpose(2, 3))
            Xs = Xs.view(n_w, k * c3, rows)
    for w, (W, on) in enumerate(zip(Ws, members)):
        if same is not None and left:
            P = torch.mm(W, Xs[w], **kw)
            for j, (i, row) in enumerate(on):
                parts[i] = P[row : row + d, j * c3 : (j + 1) * c3]
        elif same is not None:
            C = torch.mm(Xs[w], W, **kw)
            for j, (i, _) in enumerate(on):
                parts[i] = C[j * c3 : (j + 1) * c3]
        elif left:  # W [X_1 | X_2]: (rows, k c3); slice i's block: its rows, its columns
            Xk = X3[on[0][0]] if len(on) == 1 else torch.cat([X3[i] for i, _ in on], dim=1)
            P = torch.mm(W, Xk, **kw) if direct else weight_times(W, Xk)
            for j, (i, row) in enumerate(on):
                parts[i] = P[row : row + d, j * c3 : (j + 1) * c3]
        else:  # [X_1^T | 0 | X_2^T] W: each slice's X^T in its rows of W, zeros elsewhere -> (k c3, in)
            rows = W.shape[0]
            M = [F.pad(X3[i].t(), (row, rows - row - d)) if rows != d else X3[i].t() for i, row in on]
            Mk = M[0] if len(M) == 1 else torch.cat(M)
            C = torch.mm(Mk, W, **kw) if direct else times_weight(Mk, W)
            for j, (i, _) in enumerate(on):
                parts[i] = C[j * c3 : (j + 1) * c3]
    P = _bank._stack(parts)  # (S, d, c3) or (S, c3, in); traced: a tree of fused stacks of <= 8
    if not split:
        return P
    c = c3 // 3
    if left:
        return P[..., :c] + P[..., c : 2 * c] + P[..., 2 * c :]
    return P[:, :c] + P[:, c : 2 * c] + P[:, 2 * c :]


@lru_cache(maxsize=256)
def _alike(members, rows: int, d: int) -> tuple[int, tuple[int, int, int, int]] | None:
    """(k, even layout) when every weight has k >= 2 slices, numbered consecutively weight after weight, at the
    same evenly spaced rows (``_even``); else None (one slice per weight needs no gathering)."""
    k = len(members[0])
    if k < 2:
        return None
    first = [row for _, row in members[0]]
    for w, on in enumerate(members):
        if [i for i, _ in on] != list(range(w * k, (w + 1) * k)) or [row for _, row in on] != first:
            return None
    even = _even(tuple((row, row + d) for row in first))
    if even is None or first[-1] + d > rows:
        return None
    return k, even


# ------------------------------------------------------------------------------ g = m / (||V||_row + tau)
def _needs(ctx, k: int) -> tuple[bool, ...]:
    """Which of the first k inputs want a gradient; all of them while torch.compile traces the backward
    (the compiler drops unused gradients itself)."""
    if torch.compiler.is_compiling():
        return (True,) * k
    return tuple(ctx.needs_input_grad[:k])


def _long_product(X: torch.Tensor, Y: torch.Tensor, chunk: int = 256, traced: bool | None = None) -> torch.Tensor:
    """``X @ Y`` for X (S, a, K), Y (S, K, b) with a, b the rank and K a layer's width (A A^T, (D B)^T B).
    cuBLAS runs such a product with one thread block per batch entry looping over all of K (on an H200, 65-130
    us for K = 4096, S = 8: a tenth of the norm's GPU time); traced, it is computed as K / chunk products over
    chunks of K and their sum (float32 either way). Eager it stays one product: there the step is bound by
    the host's launches, not by the GPU."""
    K = X.shape[2]
    if not (torch.compiler.is_compiling() if traced is None else traced) or K % chunk or K // chunk < 4:
        return X @ Y
    c = K // chunk
    return (X.unflatten(2, (c, chunk)).transpose(1, 2) @ Y.unflatten(1, (c, chunk))).sum(1)


class _RowScale(torch.autograd.Function):
    """g from A (S, r, in), B (S, d, r), m and w0_sq (S, d) or (S*d,), t (broadcastable to m) or None and the
    frozen base weights ``Ws``: ``members[j]`` lists (slice s, first row) of the slices whose d rows belong to
    ``Ws[j]``
    (a qkv's q and v slices share one weight; per-head factors are row blocks of one weight).

    q = ||W0||^2 + 2 s <B, W0 A^T>_row + s^2 <B A A^T, B>_row, n = sqrt(max(q, 0)), g = m / (n + t).
    Backward (D = diag(dq)): dB = D (2 s W0 A^T + 2 s^2 B A A^T), dA = 2 s (D B)^T W0 + 2 s^2 B^T D B A
    (per s), dq = dn / (2 n) (0 where n = 0, as safe_sqrt), dn = dt = -dg g / (n + t), dm = dg / (n + t).
    The products with W0 are one per base weight, for all of its slices together: ``W0 [A_1; A_2]^T`` and
    ``[(D B)_1^T | 0 | (D B)_2^T] W0`` (the rows of other slices and of the k third of a qkv are zero).
    """

    @staticmethod
    def forward(ctx, A, B, m, t, w0_sq, s: float, detach: bool, members, *Ws):
        with _no_autocast(A.device.type):
            S = A.shape[0]
            d = B.shape[1]
            WAt = _w0_products(Ws, members, d, A.transpose(1, 2), left=True)  # (S, d, r)
            BAAt = B @ _long_product(A, A.transpose(1, 2))  # (S, d, r)
            q = torch.add(w0_sq.reshape(S, d), (B * torch.add(WAt, BAAt, alpha=s / 2)).sum(-1), alpha=2.0 * s)
            n = q.clamp_min(0).sqrt().reshape(m.shape)
            den = n if t is None else n + t
            g = m / den
        ctx.s, ctx.detach, ctx.members, ctx.n_w = s, detach, members, len(Ws)
        ctx.t_shape = None if t is None else t.shape
        ctx.save_for_backward(A, B, WAt, BAAt, n, den, g, *Ws)
        return g

    @staticmethod
    def backward(ctx, dg):
        A, B, WAt, BAAt, n, den, g, *Ws = ctx.saved_tensors
        s, members = ctx.s, ctx.members
        with _no_autocast(A.device.type):
            dm = dg / den
            dden = -dg * g / den
            need = _needs(ctx, 4)
            dt = None
            if ctx.t_shape is not None and need[3]:
                dt = dden.sum_to_size(ctx.t_shape)
            dA = dB = None
            if not ctx.detach and (need[0] or need[1]):
                S = A.shape[0]
                d = B.shape[1]
                dq = torch.where(n > 0, dden / (2.0 * n.clamp_min(_TINY)), torch.zeros_like(n))
                Dq = dq.reshape(S, d, 1)
                dB = (2.0 * s) * Dq * torch.add(WAt, BAAt, alpha=s)
                DB = Dq * B  # (S, d, r)
                cross = _w0_products(Ws, members, d, DB, left=False)  # (S, r, in)
                dA = torch.add(cross, _long_product(DB.transpose(1, 2), B) @ A, alpha=s) * (2.0 * s)
        return (dA, dB, dm, dt, None, None, None, None) + (None,) * ctx.n_w


def row_scale(A, B, m, t, W, w0_sq, s: float, detach: bool) -> torch.Tensor:
    """g = m / (||W0 + s B A||_row + t), exact, one autograd node. A (r, in) or per head (H, r, in); B (out, r)
    or (H, d, r); W the frozen rows (out, in) in any dtype; m, w0_sq (out,); t (1,), (out,) or None."""
    if A.ndim == 2:
        A, B = A.unsqueeze(0), B.unsqueeze(0)
    d = B.shape[1]
    members = (tuple((i, i * d) for i in range(A.shape[0])),)  # per head: row blocks of the one W
    return _RowScale.apply(A, B, m, t, w0_sq, float(s), bool(detach), members, W.detach())


def row_scales(A, B, m, t, weights, layout, w0_sq, s: float, detach: bool) -> torch.Tensor:
    """g (S, out) of S slices at once (the adapter bank, doran/bank.py): A (S, r, in), B (S, out, r), m, w0_sq
    (S, out), t (S, 1) / (S, out) / None; slice s has the rows of ``weights[layout[s][0]]`` (a frozen base
    weight) from row ``layout[s][1]`` on."""
    members: list[list[tuple[int, int]]] = [[] for _ in weights]
    for i, (w, row) in enumerate(layout):
        members[w].append((i, row))
    return _RowScale.apply(A, B, m, t, w0_sq, float(s), bool(detach), tuple(map(tuple, members)),
                           *(W.detach() for W in weights))


# ------------------------------------------------------------------------------ the fused layer
@lru_cache(maxsize=256)
def _even(ranges: tuple[tuple[int, int], ...]) -> tuple[int, int, int, int] | None:
    """(first row, k slices, d rows each, row spacing) when a layer's k slices have one size and even spacing
    (one slice; the q and v of a timm qkv): their rows of any (.., out) tensor are then one strided view
    (``_cols``), so the per-slice work runs as one op for all of them. None for other layouts."""
    start, d = ranges[0][0], ranges[0][1] - ranges[0][0]
    step = ranges[1][0] - start if len(ranges) > 1 else d
    if any(b - a != d or a != start + i * step for i, (a, b) in enumerate(ranges)):
        return None
    return start, len(ranges), d, step


def _cols(Y: torch.Tensor, even: tuple[int, int, int, int]) -> torch.Tensor:
    """The slices' columns of Y (N, out) as a (N, k, d) view, or of a vector (out,) as (k, d)."""
    start, k, d, step = even
    stop = start + (k - 1) * step + d
    return Y[start:stop].unfold(0, d, step) if Y.ndim == 1 else Y[:, start:stop].unfold(1, d, step)


def _blocks(Y: torch.Tensor, even: tuple[int, int, int, int]) -> torch.Tensor:
    """The diagonal blocks of Y (out, k r) (slice j: its d rows and its r columns) as a (k, d, r) view."""
    start, k, d, step = even
    R = Y.shape[1]
    r = R // k
    return Y[start:].as_strided((k, d, r), (step * Y.stride(0) + r * Y.stride(1), Y.stride(0), Y.stride(1)))


def _spread(Bs: list[torch.Tensor], ranges, out: int) -> torch.Tensor:
    """B_big (out, R): slice k's B (its rows, R_k columns) in its rows and its own columns, zeros elsewhere."""
    R = sum(B.shape[1] for B in Bs)
    pieces, col, last = [], 0, 0
    for B, (start, stop) in zip(Bs, ranges):
        if start > last:
            pieces.append(B.new_zeros(start - last, R))
        pieces.append(B if B.shape[1] == R else F.pad(B, (col, R - col - B.shape[1])))
        col += B.shape[1]
        last = stop
    if last < out:
        pieces.append(pieces[-1].new_zeros(out - last, R))
    return torch.cat(pieces) if len(pieces) > 1 else pieces[0]


class _FusedLinear(torch.autograd.Function):
    """out = g * (x W^T) + h (s g B_big)^T + b, g = 1 outside ``ranges`` (or everywhere for LoRA: gcat None).

    x (N, in), W (out, in), b (out,) or None, h (N, R): all in the compute dtype; gcat (sum of slice rows,)
    and B in the adapter's precision, either B_big (out, R) or, for slices of one shape, their B stacked
    (k, d, r): B_big is then built here without autograd and the backward hands back the gradient of the
    stack (B_big's diagonal blocks). For evenly laid out slices (``_even``) the eager backward computes
    dL/dg and that gradient through strided views: a handful of ops per layer whatever k is.
    """

    @staticmethod
    def forward(ctx, x, W, b, h, B, gcat, ranges, s: float, mode: str, raw_dg: bool = False, aux=None):
        ctx.raw_dg = raw_dg  # hand back g * dL/dg for gcat (the bank divides, doran/bank.py's _GradTimesG)
        g_full, ctx.gs = aux if aux is not None else (None, None)  # eager constants from the bank (detached)
        ctx.g_full = g_full
        if torch.compiler.is_compiling():
            return _FusedLinear._traced_forward(ctx, x, W, b, h, B, gcat, ranges, s, mode)
        cd = x.dtype
        out_f = W.shape[0]
        even = _even(ranges)
        whole = ranges == ((0, out_f),)
        with _no_autocast(x.device.type):
            if gcat is not None and mode == "weight":  # W' = g W0, B' = s g B: one GEMM each, saved as they are
                if B.ndim == 2 and whole and ctx.gs is not None:
                    Bx = torch.mul(B, ctx.gs[:, None], out=torch.empty(B.shape, dtype=cd, device=B.device))
                elif B.ndim == 2:
                    Bx = torch.mul(B * s, gcat[:, None] if whole else _g_full(gcat, ranges, out_f, B.dtype)[:, None],
                                   out=torch.empty(B.shape, dtype=cd, device=B.device))
                elif even is not None:
                    Bx = B.new_zeros((out_f, B.shape[0] * B.shape[2]), dtype=cd)
                    _blocks(Bx, even).addcmul_(B, gcat.view(even[1], even[2], 1), value=s)
                else:
                    Bx = torch.mul(_spread(list(B.unbind(0)), ranges, out_f) * s,
                                   _g_full(gcat, ranges, out_f, B.dtype)[:, None]).to(cd)
                if whole:
                    Wx = torch.mul(W, gcat[:, None], out=torch.empty_like(W))
                elif g_full is not None:
                    Wx = torch.mul(W, g_full[:, None], out=torch.empty_like(W))
                elif even is not None:
                    Wx = W.clone()
                    torch.mul(_rows(W, even), gcat.view(even[1], even[2], 1), out=_rows(Wx, even))
                else:
                    Wx = torch.mul(W, _g_full(gcat, ranges, out_f, gcat.dtype)[:, None], out=torch.empty_like(W))
                out = F.linear(x, Wx, b)
                out.addmm_(h, Bx.t())
                g = None
            else:
                if B.ndim == 2:
                    Bx = torch.mul(B, s, out=torch.empty(B.shape, dtype=cd, device=B.device))
                elif even is not None:  # the stacked slices into their blocks of a zero B_big
                    Bx = B.new_zeros((out_f, B.shape[0] * B.shape[2]), dtype=cd)
                    torch.mul(B, s, out=_blocks(Bx, even))
                else:
                    Bx = (_spread(list(B.unbind(0)), ranges, out_f) * s).to(cd)
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
                        _cols(out, even).mul_(gcat.view(even[1], even[2]))
                    else:
                        out.mul_(_g_full(gcat, ranges, out_f, gcat.dtype))
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
        with _no_autocast(x.device.type):
            Bs = (B * s).to(cd) if B.ndim == 2 else (_spread(list(B.unbind(0)), ranges, out_f) * s).to(cd)
            g = None
            if gcat is not None and ranges == ((0, out_f),):
                g = gcat.to(cd)
            elif gcat is not None:
                g = _g_full(gcat, ranges, out_f, cd)
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
        even = None if traced else _even(ranges)  # traced: per-range ops, fused anyway
        dx = db = dh = dB = dg = None
        with _no_autocast(dy.device.type):
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
                    _cols(dz, even).mul_(g.view(even[1], even[2]))
                else:
                    dz = torch.mul(dy, _g_full(g, ranges, out_f, g.dtype), out=torch.empty_like(dy))
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
                    dyv = _cols(dy, even)
                    raw = (dyv * _cols(out, even)).sum(0, dtype=acc)
                    if b is not None:  # z = (out - b) / g
                        raw = torch.addcmul(raw, _cols(b, even), dyv.sum(0, dtype=acc), value=-1)
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


def _g_full(gcat: torch.Tensor, ranges, out: int, dtype: torch.dtype) -> torch.Tensor:
    """g over all rows of a layer (out,): the slices' g in their rows, 1 elsewhere."""
    pieces, offset, last = [], 0, 0
    for start, stop in ranges:
        pieces += [gcat.new_ones(start - last), gcat[offset : offset + stop - start]]
        offset, last = offset + stop - start, stop
    return torch.cat(pieces + [gcat.new_ones(out - last)]).to(dtype)


def _rows(W: torch.Tensor, even: tuple[int, int, int, int]) -> torch.Tensor:
    """The slices' rows of W (out, in) as a (k, d, in) view."""
    start, k, d, step = even
    return W[start:].as_strided((k, d, W.shape[1]), (step * W.stride(0), W.stride(0), W.stride(1)))


def _dB(dBig, gcat, ranges, even, s: float, B_ndim: int, B_dtype, out_f: int, gs=None) -> torch.Tensor:
    """The gradient of B (B_big (out, R) or the stack (k, d, r)) from that of B_big, times s (and g); ``gs``:
    s g (the slices' rows) when the bank hands it over, one multiply instead of two."""
    if B_ndim == 2:
        if gcat is None:
            return torch.mul(dBig, s, out=torch.empty(dBig.shape, dtype=B_dtype, device=dBig.device))
        if gs is not None and ranges == ((0, out_f),):
            return torch.mul(dBig, gs[:, None]).to(B_dtype)
        g = gcat if ranges == ((0, out_f),) else _g_full(gcat, ranges, out_f, gcat.dtype)
        return torch.mul(dBig, g[:, None]).to(B_dtype).mul_(s)
    if even is not None:  # the diagonal blocks, each row times s g
        blocks = _blocks(dBig, even)
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

    banked = [_bank.banked(ad) for ad in ads]  # (A, B, g) from the model's bank (doran/bank.py), or None
    dropping = layer.training and ads[0].cfg.dropout > 0
    whole = banked[0] is not None and len(banked[0]) > 3 and banked[0][3] is not None
    if whole and not dropping and banked[0][3][3] == cd and all(bk is not None for bk in banked):
        # the bank's views of this layer's tensors: A (k r, in) already in the compute dtype, B (k, d, r), g
        A_cd, B_k, gcat, _, g_full, gs = banked[0][3]
        h = F.linear(xc, A_cd)
        ranges = tuple((ad.start, ad.stop) for ad in ads)
        B_in = B_k[0] if ranges == ((0, out_f),) else B_k
        mode = "none" if gcat is None else _scale_mode(x2.shape[0], in_f)
        # raw_dg: g comes through the bank's _GradTimesG, which divides g * dL/dg by g for all layers at once
        # (g_full, s g): g over all of the layer's rows and g times s, detached, from the bank (or None)
        out = _FusedLinear.apply(xc, W, b, h, B_in, gcat, ranges, float(ads[0].s), mode, True, (g_full, gs))
        return out.reshape(*lead, out_f)
    factors = [ad.factors() if bk is None else bk[:2] for ad, bk in zip(ads, banked)]
    A_cat = torch.cat([A.reshape(-1, in_f) for A, _ in factors]) if len(ads) > 1 else factors[0][0].reshape(-1, in_f)
    if dropping:  # each slice its own mask, as on the reference path
        h = torch.cat([F.linear(ad.drop(xc), A.reshape(-1, in_f).to(cd)) for ad, (A, _) in zip(ads, factors)],
                      dim=1)
    else:
        h = F.linear(xc, A_cat.to(cd))  # (N, R): one GEMM for every slice

    ranges = tuple((ad.start, ad.stop) for ad in ads)
    if len(ads) == 1 and ranges == ((0, out_f),):
        B_in = _block_rows(factors[0][1])  # (out, R) is B_big itself
    elif not torch.compiler.is_compiling() and all(B.ndim == 2 and B.shape == factors[0][1].shape
                                                    for _, B in factors):
        B_in = torch.stack([B for _, B in factors])  # (k, d, r): spread into B_big inside the node
    else:  # traced (the compiler fuses the pads), per-head factors (block-diagonal B), unequal slices
        B_in = _spread([_block_rows(B) for _, B in factors], ranges, out_f)
    gcat, mode = None, "none"
    if ads[0].cfg.magnitude:
        gs = [ad.scale_vector(layer.weight, A, B) if bk is None or bk[2] is None else bk[2]
              for ad, (A, B), bk in zip(ads, factors, banked)]
        gcat = torch.cat(gs) if len(gs) > 1 else gs[0]
        mode = _scale_mode(x2.shape[0], in_f)
    out = _FusedLinear.apply(xc, W, b, h, B_in, gcat, ranges, float(ads[0].s), mode, False)
    return out.reshape(*lead, out_f)
