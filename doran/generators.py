"""Auxiliary networks that generate the low-rank factors (RepLoRA, DoRAN figure 1).

For one adapted projection with input width ``d_in`` and output width ``d_out``::

    A   = c * W2_A act(W1_A e_A^T + b1_A)       e_A: (r, k)  ->  A: (r, d_in)
    B^T = c * W2_B act(W1_B e_B^T + b1_B)       e_B: (r, k)  ->  B: (d_out, r)

Each of the r rows of A (and of B^T) is the output of a two-layer MLP applied to one learned embedding.
The embeddings ``e_A``, ``e_B`` always belong to the projection; which MLP layers are shared is the sharing
variant: ``none`` (nothing), ``qv_first`` (the first layers ``W1_A``, ``W1_B`` are shared by
the projections of one block: the paper's figure 1), ``qv_full`` (both layers shared within a block),
``global`` (both layers shared by every block).

Per-head factors (HoRA, arXiv 2510.04295; ``AdapterConfig(heads=...)``): a projection with H heads of width
``d_head`` has embeddings ``e_A, e_B: (H, r, k)``, and the same MLPs map them to ``A: (H, r, d_in)`` and
``B: (H, d_head, r)``: one generator, shared across the heads of a projection (and across q and v of a block
under ``sharing="qv_full"``, HoRA's "one hypernetwork per block"), couples the heads. The rows of head h of
the update are ``s B_h A_h``. Per-head embeddings (one pair per head, each of r rows) and the row split are
our form: HoRA's code is not public.

Our choices where the papers are silent (all config options): hidden width ``gen_hidden`` (32), embedding
width ``gen_embed`` (32), GELU, ``e ~ N(0, 1)``, ``W1 ~ N(0, 1/k)`` and ``b1 = 0`` (unit-variance
pre-activations), an output multiplier ``c = 1 / gen_hidden`` (a muP-style output scale, so that an Adam step
of size lr on ``W2`` moves the generated factor by O(lr) whatever the hidden width), ``W2_A``
scaled at creation so that the generated A has exactly the standard deviation of LoRA's kaiming-uniform A
(``1 / sqrt(3 d_in)``), and ``W2_B = 0`` so that B = 0 and the adapted model equals the base model at step 0.

At the same Adam learning rate the generated factors move by other amounts than static LoRA factors
(tests/test_io_and_generators.py measures it), so generated methods want their own learning rate: compare
methods only at their own tuned learning rates.

:func:`generate_stacked` computes the same two layers for S generators at once (the adapter bank of
doran.fast), on their tensors stacked along a first dimension.
"""

from __future__ import annotations

import math

import torch
from torch import nn

_ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU, "tanh": nn.Tanh}


class FirstLayer(nn.Module):
    """``act(W1 e^T + b1)``: embeddings (r, k) -> hidden features (r, hidden)."""

    def __init__(self, embed: int, hidden: int, activation: str, dtype: torch.dtype,
                 device: torch.device | None = None) -> None:
        super().__init__()
        self.linear = nn.Linear(embed, hidden, dtype=dtype, device=device)
        nn.init.normal_(self.linear.weight, std=1.0 / math.sqrt(embed))
        nn.init.zeros_(self.linear.bias)
        self.act = _ACTIVATIONS[activation]()

    def forward(self, e: torch.Tensor) -> torch.Tensor:
        return self.act(self.linear(e))


class SecondLayer(nn.Module):
    """``c * W2 h``: hidden features (r, hidden) -> factor rows (r, width), with c = 1 / hidden."""

    def __init__(self, hidden: int, width: int, dtype: torch.dtype,
                 device: torch.device | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(width, hidden, dtype=dtype, device=device))  # (width, hidden)
        self.multiplier = 1.0 / hidden

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return second_layer(self.weight, h, self.multiplier)


def second_layer(W2: torch.Tensor, h: torch.Tensor, multiplier: float) -> torch.Tensor:
    """``c * W2 h``, computed as ``(W2 h^T)^T``: the gradient of W2 then comes out in W2's own (row-major)
    layout, which autograd takes over as it is; ``h W2^T`` would give a transposed one, copied each step to
    match W2's layout. W2 (width, hidden) with h (r, hidden) or per head (H, r, hidden); stacked (the bank),
    W2 (S, width, hidden) with h (S, r, hidden), one batched product. Returns (..., r, width).
    """
    if W2.ndim == 3:
        return torch.bmm(W2, h.transpose(1, 2)).transpose(1, 2) * multiplier
    return (W2.to(h.dtype) @ h.transpose(-1, -2)).transpose(-1, -2) * multiplier


class FactorGenerator(nn.Module):
    """Generates (A, B) of one projection from its own embeddings and (possibly shared) MLP layers.

    ``first_A``/``first_B``/``second_A``/``second_B`` may be the same module objects in several
    generators: that is how sharing works (PyTorch registers a shared module once per parent and
    ``named_parameters`` lists it once). With ``heads=H`` the embeddings are (H, r, k) and the factors
    are generated per head: A (H, r, d_in), B (H, d_head, r), ``second_B`` having width d_head.
    """

    def __init__(
        self,
        r: int,
        embed: int,
        first_A: FirstLayer,
        first_B: FirstLayer,
        second_A: SecondLayer,
        second_B: SecondLayer,
        dtype: torch.dtype,
        generator: torch.Generator | None = None,
        heads: int | None = None,
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        shape = (r, embed) if heads is None else (heads, r, embed)  # (r, k) or per head (H, r, k)
        self.emb_A = nn.Parameter(torch.randn(shape, generator=generator, dtype=dtype, device=device))
        self.emb_B = nn.Parameter(torch.randn(shape, generator=generator, dtype=dtype, device=device))
        self.first_A, self.first_B = first_A, first_B
        self.second_A, self.second_B = second_A, second_B

    def forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        A = self.second_A(self.first_A(self.emb_A))  # (r, d_in) or per head (H, r, d_in)
        B = self.second_B(self.first_B(self.emb_B)).transpose(-1, -2)  # (d_out, r) or (H, d_head, r)
        return A, B


def lora_a_std(d_in: int) -> float:
    """Standard deviation of LoRA's A under kaiming_uniform_(a=sqrt(5)): U(-1/sqrt(d_in), 1/sqrt(d_in))."""
    return 1.0 / math.sqrt(3.0 * d_in)


def init_second_A(second_A: SecondLayer, first_A: FirstLayer, emb_A: torch.Tensor, d_in: int,
                  generator: torch.Generator | None = None) -> None:
    """Draw ``W2_A`` and rescale it so that the generated A has LoRA's standard deviation exactly."""
    with torch.no_grad():
        second_A.weight.normal_(0.0, 1.0, generator=generator)
        A = second_A(first_A(emb_A))
        second_A.weight.mul_(lora_a_std(d_in) / A.std().clamp_min(1e-12))


def generate_stacked(E: torch.Tensor, W1: torch.Tensor, b1: torch.Tensor, W2: torch.Tensor, act: nn.Module,
                     multiplier: float) -> torch.Tensor:
    """The factor rows of S generators at once, ``c * W2 act(W1 e^T + b1)`` per generator -> (S, r, width).

    E (S, r, k) the stacked embeddings, W1 (S, hidden, k) and b1 (S, hidden) the first layers, W2
    (S, width, hidden) the second layers: :class:`FirstLayer` then :func:`second_layer`, one batched
    product each.

    Example::

        A = generate_stacked(emb_A, W1_A, b1_A, W2_A, nn.GELU(), 1 / 32)   # (S, r, in)
    """
    h = act(torch.baddbmm(b1.unsqueeze(1), E, W1.transpose(1, 2)))  # (S, r, hidden)
    return second_layer(W2, h, multiplier)  # (S, r, width)
