"""How the slices of an adapted layer lie in its output rows, and which layers the fused path computes.

A layer's slices are given as ``ranges``, a tuple of ``(start, stop)`` output rows in row order: one
``((0, out),)`` for a whole projection, the q and v thirds of a timm qkv otherwise. When k slices have one
size and even spacing (``even_layout``), their rows of any (.., out) tensor are one strided view, so the
per-slice work of the fused layer and the bank runs as one op for all of them.
"""

from __future__ import annotations

from functools import lru_cache
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

Ranges = tuple[tuple[int, int], ...]


class EvenLayout(NamedTuple):
    """k slices of one size at evenly spaced rows: slice j holds rows ``first + j step`` to ``+ size``."""

    first: int  # first row of the first slice
    count: int  # k, the number of slices
    size: int  # d, rows per slice
    step: int  # row spacing of consecutive slices


def fusable(layer: nn.Module) -> bool:
    """Whether the fused path computes this AdaptedLinear (LoRA / DoRA family, frozen base weight)."""
    if layer.weight.requires_grad:
        return False
    cfgs = [ad.cfg for ad in layer.doran.values()]
    return all(not c.diag and c.rotation_rank == 0 and c.magnitude == cfgs[0].magnitude
               and c.scale == cfgs[0].scale for c in cfgs)


@lru_cache(maxsize=256)
def even_layout(ranges: Ranges) -> EvenLayout | None:
    """The layout of a layer's slices when they have one size and even spacing (one slice; the q and v of a
    timm qkv): their rows of any (.., out) tensor are then one strided view (``columns``). None otherwise.

    Example::

        even_layout(((0, 64), (128, 192)))   # EvenLayout(first=0, count=2, size=64, step=128)
    """
    start, d = ranges[0][0], ranges[0][1] - ranges[0][0]
    step = ranges[1][0] - start if len(ranges) > 1 else d
    if any(b - a != d or a != start + i * step for i, (a, b) in enumerate(ranges)):
        return None
    return EvenLayout(start, len(ranges), d, step)


def columns(Y: torch.Tensor, even: EvenLayout) -> torch.Tensor:
    """The slices' columns of Y (N, out) as a (N, k, d) view, or of a vector (out,) as (k, d)."""
    start, k, d, step = even
    stop = start + (k - 1) * step + d
    return Y[start:stop].unfold(0, d, step) if Y.ndim == 1 else Y[:, start:stop].unfold(1, d, step)


def row_blocks(W: torch.Tensor, even: EvenLayout) -> torch.Tensor:
    """The slices' rows of W (out, in) as a (k, d, in) view."""
    start, k, d, step = even
    return W[start:].as_strided((k, d, W.shape[1]), (step * W.stride(0), W.stride(0), W.stride(1)))


def diagonal_blocks(Y: torch.Tensor, even: EvenLayout) -> torch.Tensor:
    """The diagonal blocks of Y (out, k r) (slice j: its d rows and its r columns) as a (k, d, r) view."""
    start, k, d, step = even
    R = Y.shape[1]
    r = R // k
    return Y[start:].as_strided((k, d, r), (step * Y.stride(0) + r * Y.stride(1), Y.stride(0), Y.stride(1)))


def spread(Bs: list[torch.Tensor], ranges: Ranges, out: int) -> torch.Tensor:
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


def full_g(gcat: torch.Tensor, ranges: Ranges, out: int, dtype: torch.dtype) -> torch.Tensor:
    """g over all rows of a layer (out,): the slices' g in their rows, 1 elsewhere."""
    pieces, offset, last = [], 0, 0
    for start, stop in ranges:
        pieces += [gcat.new_ones(start - last), gcat[offset : offset + stop - start]]
        offset, last = offset + stop - start, stop
    return torch.cat(pieces + [gcat.new_ones(out - last)]).to(dtype)


def block_rows(B: torch.Tensor) -> torch.Tensor:
    """A slice's B as an (out_k, R_k) matrix: (out, r) as is, per head (H, d, r) block-diagonal."""
    return B if B.ndim == 2 else torch.block_diag(*B.unbind(0))
