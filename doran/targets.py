"""What ``inject`` adapts in a model and the adapters it builds there, without touching the model.

``find_targets`` resolves the config's targets to ``nn.Linear`` modules (with the slices of a fused q|k|v
and the block and heads of each), ``check_zero_rows`` refuses weights DoRA cannot normalise, and
``build_adapters`` creates every SliceAdapter and the generator layers they share. Every check raises an
:class:`~doran.errors.InjectError` before anything is changed.

Pairing of projections into blocks (for shared generators): by default the block of a projection is its
parent module (``encoder.layer.3.attention.self`` for BERT's query/value, ``model.layers.3.self_attn`` for
LLaMA's q_proj/v_proj, ``blocks.3.attn`` for timm's fused qkv, whose q and v slices share one module).
Override with ``AdapterConfig(block_regex=...)``: the block of a projection is then the text the regex
matches in its name (``re.search``), e.g. ``block_regex=r"layers\\.\\d+"``.

Heads (HoRA, ``AdapterConfig(heads=...)``): with ``heads=H`` the head width of a block is the width of its
widest adapted projection divided by H (H = the model's number of attention heads), and every projection of
the block is cut into heads of that width, so that grouped-query attention's narrower v projection gets
``num_key_value_heads`` heads of the same width as q's and one generator can serve both. ``heads="auto"``
reads the head width from the projection's parent module (``head_dim`` in timm and LLaMA,
``attention_head_size`` in BERT, else width / ``num_heads`` or ``num_attention_heads``).
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import nn

from .config import AdapterConfig
from .errors import InjectError
from .generators import FactorGenerator, FirstLayer, SecondLayer, init_second_A
from .layers import SliceAdapter
from .norm import param_dtype


def slice_name(name: str, key: str) -> str:
    """The projection name of a slice: the module's name, or ``<name>.q`` / ``<name>.v`` in a fused qkv."""
    return name if key == "all" else f"{name}.{key}"


@dataclass
class Target:
    """One adapted ``nn.Linear``: its slices of output rows, its block and, once built, its adapters."""

    name: str  # full module name
    module: nn.Linear
    slices: dict[str, tuple[int, int]]  # slice key -> [start, stop) output rows
    block: str  # pairing key for shared generators
    adapters: dict[str, SliceAdapter] = field(default_factory=dict)
    heads: dict[str, int] = field(default_factory=dict)  # slice key -> number of heads (HoRA only)


# ---------------------------------------------------------------------------------------------- matching
def suffix_match(name: str, pattern: str) -> bool:
    """Whether module ``name`` is ``pattern`` or ends with ``.pattern`` (``"query"`` matches ``"...self.query"``)."""
    return name == pattern or name.endswith("." + pattern)


def nearest(pattern: str, names: list[str], n: int = 5) -> str:
    """The module names whose trailing components look most like ``pattern``."""
    depth = pattern.count(".") + 1

    def score(name: str) -> float:
        tail = ".".join(name.split(".")[-depth:])
        return difflib.SequenceMatcher(None, pattern.lower(), tail.lower()).ratio()

    ranked = sorted(names, key=score, reverse=True)
    best = [nm for nm in ranked if score(nm) >= 0.5][:n]
    return ", ".join(best or names[:n])


def find_targets(model: nn.Module, cfg: AdapterConfig) -> list[Target]:
    """The targets of ``cfg`` in ``model``, in module order, checked (ranks, widths, blocks, heads)."""
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n}
    names = list(linears)
    if cfg.target_regex is not None:
        regex = re.compile(cfg.target_regex)
        chosen = [n for n in names if regex.fullmatch(n)]
        if not chosen:
            raise InjectError(
                f"no nn.Linear matches target_regex={cfg.target_regex!r}; some Linear names: "
                f"{', '.join(names[:6])}"
            )
    else:
        chosen = []
        all_modules = [n for n, _ in model.named_modules() if n]
        for pattern in cfg.targets:
            hits = [n for n in names if suffix_match(n, pattern)]
            if not hits:
                non_linear = [n for n in all_modules if suffix_match(n, pattern)]
                if non_linear:
                    kind = type(model.get_submodule(non_linear[0])).__name__
                    raise InjectError(
                        f"target {pattern!r} matches {non_linear[0]} ({kind}), which is not an nn.Linear; "
                        f"nearest Linear names: {nearest(pattern, names)}"
                    )
                raise InjectError(
                    f"no nn.Linear matches targets={cfg.targets!r} (nothing ends with {pattern!r}); "
                    f"nearest names: {nearest(pattern, names)}"
                )
            chosen += [n for n in hits if n not in chosen]
        chosen = [n for n in names if n in set(chosen)]  # module order
    targets = []
    for name in chosen:
        module = linears[name]
        out_f, in_f = module.weight.shape
        if name.rsplit(".", 1)[-1] in cfg.fused_qkv:
            if out_f % 3:
                raise InjectError(
                    f"{name} is treated as a fused q|k|v Linear (fused_qkv={cfg.fused_qkv!r}) but its output "
                    f"width {out_f} is not divisible by 3; set fused_qkv=() to adapt it as a plain Linear"
                )
            d = out_f // 3
            thirds = {"q": (0, d), "k": (d, 2 * d), "v": (2 * d, 3 * d)}
            slices = {k: thirds[k] for k in ("q", "k", "v") if k in cfg.fused_slices}
        else:
            slices = {"all": (0, out_f)}
        if cfg.block_regex is not None:
            found = re.search(cfg.block_regex, name)
            if found is None:
                raise InjectError(f"block_regex={cfg.block_regex!r} finds nothing in target {name}; it must "
                                  "match every target (e.g. r'layers\\.\\d+')")
            block = found.group(0)
        else:
            block = name.rsplit(".", 1)[0] if "." in name else ""
        for key, (a, b) in slices.items():
            limit = min(in_f, b - a)
            if cfg.r > limit:
                raise InjectError(
                    f"rank r={cfg.r} is larger than {name}{'' if key == 'all' else '.' + key} allows "
                    f"(min(in, out) = {limit}); use r <= {limit}"
                )
            if cfg.rotation_rank > b - a:
                raise InjectError(
                    f"rotation_rank={cfg.rotation_rank} is larger than the output width {b - a} of "
                    f"{slice_name(name, key)}; use rotation_rank <= {b - a}"
                )
        targets.append(Target(name, module, slices, block))
    if cfg.heads is not None:
        _assign_heads(model, targets, cfg)
    return targets


def _head_width_of_parent(model: nn.Module, name: str, width: int) -> int | None:
    """The head width read from the attention module that holds ``name`` (None if it says nothing)."""
    parent_name = name.rpartition(".")[0]
    parent = model.get_submodule(parent_name) if parent_name else model
    for attr in ("head_dim", "attention_head_size"):  # timm Attention / LLaMA, BERT
        value = getattr(parent, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    for attr in ("num_heads", "num_attention_heads"):
        value = getattr(parent, attr, None)
        if isinstance(value, int) and value > 0 and width % value == 0:
            return width // value
    return None


def _assign_heads(model: nn.Module, targets: list[Target], cfg: AdapterConfig) -> None:
    """Number of heads of every adapted slice (HoRA); a width the head width does not divide is refused."""
    widest: dict[str, tuple[int, str]] = {}
    for t in targets:
        for key, (a, b) in t.slices.items():
            if t.block not in widest or b - a > widest[t.block][0]:
                widest[t.block] = (b - a, slice_name(t.name, key))
    for t in targets:
        for key, (a, b) in t.slices.items():
            width, proj = b - a, slice_name(t.name, key)
            if cfg.heads == "auto":
                d_head = _head_width_of_parent(model, t.name, width)
                if d_head is None:
                    raise InjectError(
                        f"heads='auto' cannot find the head width of {proj}: its parent module has no "
                        "head_dim, attention_head_size, num_heads or num_attention_heads; set heads=H (the "
                        "number of attention heads) in the AdapterConfig"
                    )
                source = f"the head width {d_head} of its attention module (heads='auto')"
            else:
                top, top_name = widest[t.block]
                if top % cfg.heads:
                    raise InjectError(
                        f"heads={cfg.heads} does not divide the output width {top} of {top_name}: HoRA "
                        "cuts each projection into heads of equal width; set heads to the model's number of "
                        f"attention heads (a divisor of {top}), or heads='auto'"
                    )
                d_head = top // cfg.heads
                source = f"the head width {d_head} = {top} ({top_name}) / heads={cfg.heads}"
            if width % d_head:
                raise InjectError(
                    f"{proj} has output width {width}, not a multiple of {source}; set heads to the model's "
                    "number of attention heads"
                )
            t.heads[key] = width // d_head


def check_zero_rows(targets: list[Target], cfg: AdapterConfig) -> None:
    """DoRA (tau = 0) divides by the row norm: a zero row gives 0/0 = NaN. We refuse it up front."""
    if not cfg.magnitude or cfg.tau_mode != "zero":
        return
    for t in targets:
        if t.module.weight.is_meta:  # shape-only model: no values to check
            continue
        with torch.no_grad():
            norms = torch.linalg.vector_norm(t.module.weight.detach().float(), dim=1)
        for a, b in t.slices.values():
            zero = torch.nonzero(norms[a:b] == 0).flatten()
            if len(zero):
                rows = ", ".join(str(int(i) + a) for i in zero[:5])
                raise InjectError(
                    f"{t.name} has {len(zero)} weight row(s) of zero norm (rows {rows}); DoRA's tau = 0 would "
                    "divide 0 by 0 there. Use tau_mode='fixed' or 'learned' (DoRAN), whose tau keeps the "
                    "denominator positive"
                )


# ---------------------------------------------------------------------------------------------- building
def build_adapters(targets: list[Target], cfg: AdapterConfig) -> None:
    """Create every SliceAdapter (and the shared generator layers) without touching the model."""
    shared: dict[tuple, nn.Module] = {}

    def get(key: tuple, make, width: int | None = None, what: str = ""):
        if key not in shared:
            shared[key] = make()
        module = shared[key]
        if width is not None and module.weight.shape[0] != width:
            raise InjectError(
                f"sharing={cfg.sharing!r} shares the generator's output layer {what}, which needs equal "
                f"widths, but the projections have {module.weight.shape[0]} and {width}; use "
                "sharing='qv_first' or 'none'"
            )
        return module, key

    for t in targets:
        W = t.module.weight
        dtype = param_dtype(W)
        device = W.device if W.is_meta else None  # see SliceAdapter: drawn on the CPU, moved by inject
        in_f = W.shape[1]
        for key, (a, b) in t.slices.items():
            generator = None
            heads = t.heads.get(key)  # None, or the number of heads of this slice (HoRA)
            width_B = b - a if heads is None else (b - a) // heads  # rows generated per embedding set
            if cfg.factors == "generated":
                proj = f"{t.name}.{key}"
                scope_first = {"none": proj, "qv_first": t.block, "qv_full": t.block, "global": "*"}[cfg.sharing]
                scope_second = {"none": proj, "qv_first": proj, "qv_full": t.block, "global": "*"}[cfg.sharing]
                first = partial(FirstLayer, cfg.gen_embed, cfg.gen_hidden, cfg.gen_activation, dtype, device)
                first_A, _ = get(("first_A", scope_first), first)
                first_B, _ = get(("first_B", scope_first), first)
                fresh_A = ("second_A", scope_second) not in shared
                second_A, _ = get(("second_A", scope_second),
                                  partial(SecondLayer, cfg.gen_hidden, in_f, dtype, device),
                                  in_f, "second_A (input width)")
                second_B, _ = get(("second_B", scope_second),
                                  partial(SecondLayer, cfg.gen_hidden, width_B, dtype, device),
                                  width_B, "second_B (" + ("output" if heads is None else "head") + " width)")
                generator = FactorGenerator(cfg.r, cfg.gen_embed, first_A, first_B, second_A, second_B, dtype,
                                            heads=heads, device=device)
                if fresh_A:
                    init_second_A(second_A, first_A, generator.emb_A, in_f)
            t.adapters[key] = SliceAdapter(cfg, W, a, b, generator=generator, heads=heads)
