"""g = m / (||W0 + s B A||_row + tau) as one autograd node with a closed-form backward.

The reference path (doran/layers.py's ``SliceAdapter.norm_scale``) computes g with many small autograd
ops per slice; ``row_scale`` (one slice) and ``row_scales`` (the S slices of an adapter bank group
at once) compute the same g with one node, forward and backward written out below. The norm is the factored
one of doran/norm.py's ``factored_row_norm``: the (out, in) matrix V is never built.
"""

from __future__ import annotations

import torch

from ..norm import SQRT_GUARD
from .ops import _long_product, needs, no_autocast, w0_products


def _forward(A, B, m, t, w0_sq, s: float, members, Ws):
    """g and what the backward reuses: W0 A^T and B A A^T per slice (S, d, r), the row norms n and n + t."""
    with no_autocast(A.device.type):
        S = A.shape[0]
        d = B.shape[1]
        WAt = w0_products(Ws, members, d, A.transpose(1, 2), left=True)  # (S, d, r)
        BAAt = B @ _long_product(A, A.transpose(1, 2))  # (S, d, r)
        q = torch.add(w0_sq.reshape(S, d), (B * torch.add(WAt, BAAt, alpha=s / 2)).sum(-1), alpha=2.0 * s)
        n = q.clamp_min(0).sqrt().reshape(m.shape)
        den = n if t is None else n + t
        return m / den, WAt, BAAt, n, den


def _apply(A, B, m, t, w0_sq, s: float, detach: bool, members, Ws) -> torch.Tensor:
    """The autograd node where gradients are recorded; without them (evaluation under ``no_grad``) the
    forward alone, as a plain function: nothing is saved for a backward, and a compiler traces ordinary
    tensor code (torch 2.11's dynamo fails to trace this Function's forward under ``no_grad``)."""
    if not torch.is_grad_enabled():
        return _forward(A, B, m, t, w0_sq, s, members, Ws)[0]
    return _RowScale.apply(A, B, m, t, w0_sq, s, detach, members, *Ws)


class _RowScale(torch.autograd.Function):
    """g from A (S, r, in), B (S, d, r), m and w0_sq (S, d) or (S*d,), t (broadcastable to m) or None and the
    frozen base weights ``Ws``: ``members[j]`` lists (slice s, first row) of the slices whose d rows belong to
    ``Ws[j]`` (a qkv's q and v slices share one weight; per-head factors are row blocks of one weight).

    q = ||W0||^2 + 2 s <B, W0 A^T>_row + s^2 <B A A^T, B>_row, n = sqrt(max(q, 0)), g = m / (n + t).
    Backward (D = diag(dq)): dB = D (2 s W0 A^T + 2 s^2 B A A^T), dA = 2 s (D B)^T W0 + 2 s^2 B^T D B A
    (per s), dq = dn / (2 n) (0 where n = 0, as safe_sqrt), dn = dt = -dg g / (n + t), dm = dg / (n + t).
    The products with W0 are one per base weight, for all of its slices together: ``W0 [A_1; A_2]^T`` and
    ``[(D B)_1^T | 0 | (D B)_2^T] W0`` (the rows of other slices and of the k third of a qkv are zero).
    """

    @staticmethod
    def forward(ctx, A, B, m, t, w0_sq, s: float, detach: bool, members, *Ws):
        g, WAt, BAAt, n, den = _forward(A, B, m, t, w0_sq, s, members, Ws)
        ctx.s, ctx.detach, ctx.members, ctx.n_w = s, detach, members, len(Ws)
        ctx.t_shape = None if t is None else t.shape
        ctx.save_for_backward(A, B, WAt, BAAt, n, den, g, *Ws)
        return g

    @staticmethod
    def backward(ctx, dg):
        A, B, WAt, BAAt, n, den, g, *Ws = ctx.saved_tensors
        s, members = ctx.s, ctx.members
        with no_autocast(A.device.type):
            dm = dg / den
            dden = -dg * g / den
            need = needs(ctx, 4)
            dt = None
            if ctx.t_shape is not None and need[3]:
                dt = dden.sum_to_size(ctx.t_shape)
            dA = dB = None
            if not ctx.detach and (need[0] or need[1]):
                S = A.shape[0]
                d = B.shape[1]
                dq = torch.where(n > 0, dden / (2.0 * n.clamp_min(SQRT_GUARD)), torch.zeros_like(n))
                Dq = dq.reshape(S, d, 1)
                dB = (2.0 * s) * Dq * torch.add(WAt, BAAt, alpha=s)
                DB = Dq * B  # (S, d, r)
                cross = w0_products(Ws, members, d, DB, left=False)  # (S, r, in)
                dA = torch.add(cross, _long_product(DB.transpose(1, 2), B) @ A, alpha=s) * (2.0 * s)
        return (dA, dB, dm, dt, None, None, None, None) + (None,) * ctx.n_w


def row_scale(A, B, m, t, W, w0_sq, s: float, detach: bool) -> torch.Tensor:
    """g = m / (||W0 + s B A||_row + t), exact, one autograd node. A (r, in) or per head (H, r, in); B (out, r)
    or (H, d, r); W the frozen rows (out, in) in any dtype; m, w0_sq (out,); t (1,), (out,) or None."""
    if A.ndim == 2:
        A, B = A.unsqueeze(0), B.unsqueeze(0)
    d = B.shape[1]
    members = (tuple((i, i * d) for i in range(A.shape[0])),)  # per head: row blocks of the one W
    return _apply(A, B, m, t, w0_sq, float(s), bool(detach), members, (W.detach(),))


def row_scales(A, B, m, t, weights, layout, w0_sq, s: float, detach: bool) -> torch.Tensor:
    """g (S, out) of S slices at once (the adapter bank, doran/fast/bank.py): A (S, r, in), B (S, out, r), m, w0_sq
    (S, out), t (S, 1) / (S, out) / None; slice s has the rows of ``weights[layout[s][0]]`` (a frozen base
    weight) from row ``layout[s][1]`` on."""
    members: list[list[tuple[int, int]]] = [[] for _ in weights]
    for i, (w, row) in enumerate(layout):
        members[w].append((i, row))
    return _apply(A, B, m, t, w0_sq, float(s), bool(detach), tuple(map(tuple, members)),
                  tuple(W.detach() for W in weights))
