"""The adapted linear layer: LoRA, DoRA and DoRAN as one code path.

For the output rows R of a base ``nn.Linear`` (all rows, or the q / v thirds of a fused timm ``qkv``)::

    V      = W0 + s B A                                   (out, in), never built in training
    norm   = ||V||_row                                    factored, float32 (REFERENCE.md)
    g      = m / (norm + tau)                             (out,)   DoRA family
    y_R    = g * (W0 x + s B A drop(x)) + b               DoRA family: magnitude=True
    y_R    = W0 x + s B A drop(x) + b                     LoRA family: magnitude=False

The base GEMM ``W0 x + b`` runs once for the whole layer; rows outside every adapted slice (the k third of a
fused qkv) are returned exactly as the base layer computes them.
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn

from .config import AdapterConfig
from .generators import FactorGenerator

_TINY = 1e-30  # only keeps sqrt's derivative finite on the branch that torch.where discards


def param_dtype(weight: torch.Tensor) -> torch.dtype:
    """Adapter tensors live in float32 (float64 for a float64 base, as in gradcheck)."""
    return torch.float64 if weight.dtype == torch.float64 else torch.float32


def safe_sqrt(sq: torch.Tensor) -> torch.Tensor:
    """sqrt of a squared norm: clamps rounding negatives to 0; derivative 0 (a subgradient) at 0."""
    positive = sq > 0
    return torch.where(positive, sq.clamp_min(_TINY).sqrt(), torch.zeros_like(sq))


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
    """``||W0 + s B A||_row`` without the (out, in) matrix (REFERENCE.md, "The norm without ...").

    ``||V_i||^2 = ||W0_i||^2 + 2 s <B_i, (W0 A^T)_i> + s^2 <B_i, (B A A^T)_i>``; W: (out, in), A: (r, in),
    B: (out, r), w0_sq: (out,) cached ``||W0||^2_row``. A and B must be float32 or float64.
    """
    WAt = weight_times_At(W, A)  # (out, r)
    AAt = A @ A.t()  # (r, r)
    cross = (B * WAt).sum(dim=1)  # (out,)
    quad = ((B @ AAt) * B).sum(dim=1)  # (out,)
    return safe_sqrt(w0_sq + 2.0 * s * cross + (s * s) * quad)


def _inverse_softplus(t: float) -> float:
    """rho with softplus(rho) = t > 0, stable for small and large t."""
    return t + math.log(-math.expm1(-t))


class SliceAdapter(nn.Module):
    """The adapter of one contiguous block of output rows ``[start, stop)`` of a base Linear.

    Holds the low-rank factors (static ``lora_A``/``lora_B`` or a ``generator``), the magnitude ``m`` and
    tau. Its ``forward`` maps the base output of its rows to the adapted output.
    """

    def __init__(
        self,
        cfg: AdapterConfig,
        weight: torch.Tensor,
        start: int,
        stop: int,
        generator: FactorGenerator | None = None,
        rng: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.start, self.stop = start, stop
        self.s = cfg.scale
        out_f, in_f = stop - start, weight.shape[1]
        dtype = param_dtype(weight)
        if generator is None:
            self.lora_A = nn.Parameter(torch.empty(cfg.r, in_f, dtype=dtype))  # (r, in)
            bound = 1.0 / math.sqrt(in_f)  # = kaiming_uniform_(a=sqrt(5)), LoRA's and PEFT's init
            with torch.no_grad():
                self.lora_A.uniform_(-bound, bound, generator=rng)
            self.lora_B = nn.Parameter(torch.zeros(out_f, cfg.r, dtype=dtype))  # (out, r)
        else:
            self.generator = generator
        self.drop = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()

        self._cache_key: tuple | None = None
        self._w0_sq = self._row_scale = None
        if cfg.magnitude:
            w0_sq, row_scale = self._weight_stats(weight)
            if cfg.tau_mode == "learned":
                shape = (out_f,) if cfg.tau_granularity == "row" else (1,)
                self.tau_rho = nn.Parameter(torch.full(shape, _inverse_softplus(cfg.tau_init), dtype=dtype))
            elif cfg.tau_mode == "fixed":
                self.register_buffer("tau_t", torch.full((1,), float(cfg.tau_init), dtype=dtype))
            with torch.no_grad():
                m = w0_sq.sqrt() + self.tau_absolute(row_scale)  # m = ||W0||_row + tau: identity at step 0
            self.magnitude = nn.Parameter(m.to(dtype).expand(out_f).clone())  # (out,)

    # ------------------------------------------------------------------ pieces
    @property
    def rows(self) -> slice:
        return slice(self.start, self.stop)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B): A (r, in), B (out, r), in the adapter's precision."""
        if hasattr(self, "generator"):
            return self.generator()
        return self.lora_A, self.lora_B

    def _weight_stats(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cached ``||W0||^2_row`` and the tau scale of this slice, recomputed when W0 changes."""
        key = (weight.data_ptr(), weight._version, weight.dtype, weight.device)
        if key != self._cache_key:
            with torch.no_grad():
                W = weight.detach()[self.rows].to(param_dtype(weight))
                norms = torch.linalg.vector_norm(W, dim=1)  # (out,)
                self._w0_sq = norms * norms
                mean = norms.mean()
                mean = torch.where(mean > 0, mean, torch.ones_like(mean))
                if self.cfg.tau_granularity == "row":
                    self._row_scale = torch.maximum(norms, self.cfg.tau_floor * mean)  # (out,)
                else:
                    self._row_scale = mean.reshape(1)  # (1,)
            self._cache_key = key
        return self._w0_sq, self._row_scale

    def tau_relative(self) -> torch.Tensor | None:
        """tau in units of the row norm: (1,) or (out,); None for tau_mode='zero'."""
        mode = self.cfg.tau_mode
        if mode == "learned":
            return F.softplus(self.tau_rho)
        if mode == "fixed":
            return self.tau_t
        return None

    def tau_absolute(self, row_scale: torch.Tensor) -> torch.Tensor:
        """tau in the units of the weight: relative tau times the row scale (mean row norm or per row)."""
        t = self.tau_relative()
        return torch.zeros_like(row_scale) if t is None else t * row_scale

    def norm_scale(self, weight: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        """g = m / (||W0 + s B A||_row + tau), shape (out,), in float32 (float64 for a float64 base)."""
        w0_sq, row_scale = self._weight_stats(weight)
        W = weight[self.rows]
        autocast_off = (
            torch.autocast(device_type=weight.device.type, enabled=False)
            if torch.is_autocast_enabled(weight.device.type)
            else nullcontext()
        )
        with autocast_off:
            norm = factored_row_norm(W.detach(), A, B, self.s, w0_sq)
            if self.cfg.detach_norm:
                norm = norm.detach()
            return self.magnitude / (norm + self.tau_absolute(row_scale))

    # ------------------------------------------------------------------ forward / merge
    def forward(self, x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor,
                bias: torch.Tensor | None) -> torch.Tensor:
        """Adapted output of this slice. x: (..., in); y: (..., out) = base output of these rows."""
        A, B = self.factors()
        h = F.linear(self.drop(x), A.to(x.dtype))  # (..., r)
        low = F.linear(h, B.to(x.dtype)) * self.s  # (..., out)
        if not self.cfg.magnitude:
            return y + low
        g = self.norm_scale(weight, A, B).to(y.dtype)  # (out,)
        out = g * (y + low)
        if bias is not None:
            out = out + (1 - g) * bias[self.rows].to(y.dtype)  # the bias stays outside the rescaling
        return out

    @torch.no_grad()
    def merged_rows(self, weight: torch.Tensor) -> torch.Tensor:
        """The merged weight rows ``g * (W0 + s B A)`` (or ``W0 + s B A``) in the weight's dtype."""
        A, B = self.factors()
        W = weight[self.rows].to(A.dtype)
        V = W + self.s * (B @ A)  # (out, in)
        if self.cfg.magnitude:
            V = self.norm_scale(weight, A, B).to(V.dtype)[:, None] * V
        return V.to(weight.dtype)


class AdaptedLinear(nn.Linear):
    """An ``nn.Linear`` whose weight and bias are the base layer's own tensors, plus slice adapters.

    The state-dict keys of the base (``weight``, ``bias``) are unchanged, so a checkpoint of the base model
    still loads after injection. Adapter tensors live under ``<name>.doran.<slice>.``.
    """

    def __init__(self, base: nn.Linear, adapters: dict[str, SliceAdapter]) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.doran = nn.ModuleDict(adapters)
        self.merged = False
        object.__setattr__(self, "_base_module", base)  # the replaced module, unregistered (for eject)
        self._backup: dict[str, torch.Tensor] = {}

    @property
    def base_module(self) -> nn.Linear:
        """The ``nn.Linear`` this layer replaced (it shares ``weight`` and ``bias``)."""
        return self._base_module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        if self.merged:
            if self.training and torch.is_grad_enabled() and any(p.requires_grad for p in self.doran.parameters()):
                raise RuntimeError(
                    "this layer is merged, so its adapter receives no gradient; call doran.unmerge(model) "
                    "before training"
                )
            return y
        adapters = sorted(self.doran.values(), key=lambda a: a.start)
        if len(adapters) == 1 and adapters[0].start == 0 and adapters[0].stop == self.out_features:
            return adapters[0](x, y, self.weight, self.bias)
        pieces, last = [], 0
        for ad in adapters:
            pieces.append(y[..., last : ad.start])  # untouched rows, exactly the base output
            pieces.append(ad(x, y[..., ad.rows], self.weight, self.bias))
            last = ad.stop
        pieces.append(y[..., last:])
        return torch.cat(pieces, dim=-1)

    @torch.no_grad()
    def merge(self) -> None:
        """Write the adapted weight into ``weight``; the original rows are kept for an exact unmerge."""
        if self.merged:
            return
        new_rows = {k: ad.merged_rows(self.weight) for k, ad in self.doran.items()}
        for key, ad in self.doran.items():
            self._backup[key] = self.weight[ad.rows].clone()
            self.weight[ad.rows] = new_rows[key]
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the original weight rows bit for bit."""
        if not self.merged:
            return
        for key, ad in self.doran.items():
            self.weight[ad.rows] = self._backup.pop(key)
        self.merged = False

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """The full merged weight (out, in) without changing this layer."""
        if self.merged:
            return self.weight.detach().clone()
        W = self.weight.detach().clone()
        for ad in self.doran.values():
            W[ad.rows] = ad.merged_rows(self.weight)
        return W

    def extra_repr(self) -> str:
        slices = ", ".join(f"{k}[{a.start}:{a.stop}]" for k, a in self.doran.items())
        return f"in_features={self.in_features}, out_features={self.out_features}, adapted={slices}"
