"""Building blocks of the fast path's autograd nodes: products with a frozen W0 and stacks.

The products with the frozen W0 inside the DoRA norm (``W0 A^T`` and its transpose in the backward) run on
a half-precision W0 as three bf16 GEMMs with float32 accumulation on CUDA (the float32 factor split into
three bf16 parts, exact to float32 rounding; split once for all slices), instead of upcasting W0: the GEMMs
read W0 once, in its own precision, one GEMM per base weight for all of its slices. Elsewhere (CPU,
float16, float64) W0 is upcast in 16 MiB row blocks as in the reference (doran/norm.py's
``weight_times_At``).

``stack`` is ``torch.stack``, built as a tree of small stacks while torch.compile traces it.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import torch
import torch.nn.functional as F

from .slices import EvenLayout, even_layout


def no_autocast(device_type: str) -> torch.autocast:
    """A context in which autocast is off (the fast path's nodes choose their precisions themselves)."""
    return torch.autocast(device_type=device_type, enabled=False)


def needs(ctx, k: int) -> tuple[bool, ...]:
    """Which of the first k inputs of an autograd node want a gradient; all of them while torch.compile traces
    the backward (the compiler drops unused gradients itself)."""
    if torch.compiler.is_compiling():
        return (True,) * k
    return tuple(ctx.needs_input_grad[:k])


# ------------------------------------------------------------------------------ stacks
# Inductor turns a cat of at most 8 inputs into one kernel; beyond that (its max_pointwise_cat_inputs) every
# input is copied by a kernel of its own. Traced, longer stacks are built as a tree of stacks of 8.
_CAT_INPUTS = 8


def stack(tensors: list[torch.Tensor]) -> torch.Tensor:
    """``torch.stack(tensors)``; while traced by torch.compile, as a tree of at most 8 inputs per node (one
    fused kernel for a ViT-B's 24 slices instead of 24 copies)."""
    n = len(tensors)
    if n <= _CAT_INPUTS or not torch.compiler.is_compiling():
        return torch.stack(tensors)
    size = _CAT_INPUTS
    while size * _CAT_INPUTS < n:
        size *= _CAT_INPUTS
    return torch.cat([stack(tensors[i : i + size]) for i in range(0, n, size)])


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


def w0_products(Ws, members, d: int, X: torch.Tensor, left: bool) -> torch.Tensor:
    """Every slice's product with its rows of its frozen weight, one GEMM per weight for all of its slices,
    in X's precision: ``left``: W_i X_i for X (S, in, c) -> (S, d, c); else X_i^T W_i for X (S, d, c) ->
    (S, c, in), W_i slice i's (d, in) rows. Against a bf16 W on CUDA, X is split into three bf16 parts
    (``_split3``) once for all slices and each GEMM accumulates in float32; against another dtype W is
    upcast in row blocks (``weight_times``). One GEMM over the whole weight, not a batched product over
    its slices' rows: cuBLAS runs the latter (batch 2, 8 columns) with a slower kernel."""
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
    P = stack(parts)  # (S, d, c3) or (S, c3, in); traced: a tree of fused stacks of <= 8
    if not split:
        return P
    c = c3 // 3
    if left:
        return P[..., :c] + P[..., c : 2 * c] + P[..., 2 * c :]
    return P[:, :c] + P[:, c : 2 * c] + P[:, 2 * c :]


@lru_cache(maxsize=256)
def _alike(members, rows: int, d: int) -> tuple[int, EvenLayout] | None:
    """(k, even layout) when every weight has k >= 2 slices, numbered consecutively weight after weight, at the
    same evenly spaced rows (``even_layout``); else None (one slice per weight needs no gathering)."""
    k = len(members[0])
    if k < 2:
        return None
    first = [row for _, row in members[0]]
    for w, on in enumerate(members):
        if [i for i, _ in on] != list(range(w * k, (w + 1) * k)) or [row for _, row in on] != first:
            return None
    even = even_layout(tuple((row, row + d) for row in first))
    if even is None or first[-1] + d > rows:
        return None
    return k, even



def _long_product(X: torch.Tensor, Y: torch.Tensor, chunk: int = 256, traced: bool | None = None) -> torch.Tensor:
    """``X @ Y`` for X (S, a, K), Y (S, K, b) with a, b the rank and K a layer's width (A A^T, (D B)^T B).
    cuBLAS runs such a product with one thread block per batch entry looping over all of K, slow for a long
    K; traced, it is computed as K / chunk products over chunks of K and their sum (float32 either way).
    Eager it stays one product: there the step is bound by the host's launches, not by the GPU."""
    K = X.shape[2]
    if not (torch.compiler.is_compiling() if traced is None else traced) or K % chunk or K // chunk < 4:
        return X @ Y
    c = K // chunk
    return (X.unflatten(2, (c, chunk)).transpose(1, 2) @ Y.unflatten(1, (c, chunk))).sum(1)

