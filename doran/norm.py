"""The DoRA row norm and tau: the formulas that the reference path (doran/layers.py) and the fast path
(doran.fast) share, on one slice's tensors or on stacks of slices' alike.

For a slice with frozen rows W0 (out, in), factors A (r, in), B (out, r) and scale s::

    ||V_i||^2 = ||W0_i||^2 + 2 s <B_i, (W0 A^T)_i> + s^2 <B_i, (B A A^T)_i>      V = W0 + s B A
    tau       = relative tau * row scale                                        (weight units)

The norm is computed in float32 (float64 for a float64 base) without the (out, in) matrix V, and tau is
stored relative to the row norm of W0 (``AdapterConfig.tau_init``), so one value fits weights of any scale.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .config import AdapterConfig

SQRT_GUARD = 1e-30  # only keeps sqrt's derivative finite on the branch that torch.where discards


def param_dtype(weight: torch.Tensor) -> torch.dtype:
    """Adapter tensors live in float32 (float64 for a float64 base, as in gradcheck)."""
    return torch.float64 if weight.dtype == torch.float64 else torch.float32


class NormStats(NamedTuple):
    """What the DoRA norm needs of the frozen W0, per row of one slice (out,) or of a stack (S, out)."""

    w0_sq: torch.Tensor  # ||W0_i||^2
    row_scale: torch.Tensor  # the unit of relative tau: per row (..., out), or the mean row norm (..., 1)


def row_norms(weight: torch.Tensor) -> torch.Tensor:
    """``||W0_i||`` of every row of a frozen weight (out, in) -> (out,), in the adapter's precision."""
    return torch.linalg.vector_norm(weight.detach().to(param_dtype(weight)), dim=1)


def norm_stats(norms: torch.Tensor, cfg: AdapterConfig) -> NormStats:
    """``||W0||^2_row`` and the tau scale from the row norms (..., out) of W0 (one slice, or a stack of them):
    per row ``max(||W0_i||, tau_floor * mean_i ||W0_i||)``, else the mean norm (..., 1) (1 where it is 0)."""
    mean = norms.mean(-1, keepdim=True)
    mean = torch.where(mean > 0, mean, torch.ones_like(mean))
    row_scale = torch.maximum(norms, cfg.tau_floor * mean) if cfg.tau_granularity == "row" else mean
    return NormStats(norms * norms, row_scale)


# The tensor of a SliceAdapter that holds tau, by tau_mode (tau_mode "zero" has none)
TAU_TENSOR = {"learned": "tau_rho", "fixed": "tau_t"}


def tau_of(mode: str, stored: torch.Tensor, row_scale: torch.Tensor | None = None) -> torch.Tensor:
    """tau from the tensor that holds it (``TAU_TENSOR[mode]``): ``softplus(tau_rho)`` when learned, ``tau_t``
    when fixed. In units of the row norm, or with ``row_scale`` in the units of the weight (relative tau times
    the row scale). Elementwise: one slice's tensors ((1,) or (out,)) or a stack of slices' ((S, 1), (S, out)).

    Example::

        tau = tau_of("learned", adapter.tau_rho, adapter._weight_stats(weight).row_scale)
    """
    t = F.softplus(stored) if mode == "learned" else stored
    return t if row_scale is None else t * row_scale


def inverse_softplus(t: float) -> float:
    """rho with softplus(rho) = t > 0, stable for small and large t."""
    return t + math.log(-math.expm1(-t))


def safe_sqrt(sq: torch.Tensor) -> torch.Tensor:
    """sqrt of a squared norm: clamps rounding negatives to 0; derivative 0 (a subgradient) at 0."""
    positive = sq > 0
    return torch.where(positive, sq.clamp_min(SQRT_GUARD).sqrt(), torch.zeros_like(sq))


def weight_times_At(W: torch.Tensor, A: torch.Tensor, chunk_elements: int = 1 << 22) -> torch.Tensor:
    """``W0 A^T`` (out, r) in A's precision (float32/64), without a full-precision copy of a half W0.

    A half-precision W0 is upcast in blocks of rows of at most ``chunk_elements`` elements, so the
    temporary stays small (16 MiB by default) and the product is exact float32 arithmetic.
    """
    if W.dtype == A.dtype:
        return W @ A.t()
    rows = max(1, chunk_elements // W.shape[1])
    if W.shape[0] <= rows:
        return W.to(A.dtype) @ A.t()
    return torch.cat([W[i : i + rows].to(A.dtype) @ A.t() for i in range(0, W.shape[0], rows)])


def factored_row_norm(W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, s: float,
                      w0_sq: torch.Tensor) -> torch.Tensor:
    """``||W0 + s B A||_row`` without the (out, in) matrix.

    ``||V_i||^2 = ||W0_i||^2 + 2 s <B_i, (W0 A^T)_i> + s^2 <B_i, (B A A^T)_i>``; W: (out, in), A: (r, in),
    B: (out, r), w0_sq: (out,) cached ``||W0||^2_row``. A and B must be float32 or float64.
    Per-head factors A: (H, r, in), B: (H, d_head, r) (rows of head h: ``B_h A_h``) use the same identity
    head by head; the cost stays one (out, in) x (in, r) product in total.
    """
    if A.ndim == 3:
        H = A.shape[0]
        Wh = W.unflatten(0, (H, -1))  # (H, d_head, in)
        if W.dtype == A.dtype:
            WAt = Wh @ A.transpose(1, 2)  # (H, d_head, r)
        else:
            WAt = torch.stack([weight_times_At(Wh[h], A[h]) for h in range(H)])
        AAt = A @ A.transpose(1, 2)  # (H, r, r)
        cross = (B * WAt).sum(dim=-1).flatten()  # (out,)
        quad = ((B @ AAt) * B).sum(dim=-1).flatten()  # (out,)
        return safe_sqrt(w0_sq + 2.0 * s * cross + (s * s) * quad)
    WAt = weight_times_At(W, A)  # (out, r)
    AAt = A @ A.t()  # (r, r)
    cross = (B * WAt).sum(dim=1)  # (out,)
    quad = ((B @ AAt) * B).sum(dim=1)  # (out,)
    return safe_sqrt(w0_sq + 2.0 * s * cross + (s * s) * quad)
