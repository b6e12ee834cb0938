"""Injection into a model by module name, and everything that walks the adapted model afterwards.

``inject`` validates every target before it touches the model: a bad input raises a ``ValueError``
subclass and leaves the model exactly as it was.

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

import copy
import difflib
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import nn

from . import bank, packing
from .config import AdapterConfig, DoranError
from .generators import FactorGenerator, FirstLayer, SecondLayer, init_second_A
from .layers import AdaptedLinear, SliceAdapter, param_dtype

STATE_ATTR = "_doran_state"
_WRAPPERS = re.compile(r"(_fsdp_wrapped_module|_checkpoint_wrapped_module|_orig_mod)\.")
GROUPS = ("factors", "generator", "magnitude", "tau", "diag", "rotation", "other")


class InjectError(DoranError):
    """The model and the config do not fit together (unknown target, rank too large, ...)."""


@dataclass
class _Target:
    name: str  # full module name
    module: nn.Linear
    slices: dict[str, tuple[int, int]]  # slice key -> [start, stop) output rows
    block: str  # pairing key for shared generators
    adapters: dict[str, SliceAdapter] = field(default_factory=dict)
    heads: dict[str, int] = field(default_factory=dict)  # slice key -> number of heads (HoRA only)


# ---------------------------------------------------------------------------------------------- matching
def _suffix_match(name: str, pattern: str) -> bool:
    return name == pattern or name.endswith("." + pattern)


def _nearest(pattern: str, names: list[str], n: int = 5) -> str:
    """The module names whose trailing components look most like ``pattern``."""
    depth = pattern.count(".") + 1

    def score(name: str) -> float:
        tail = ".".join(name.split(".")[-depth:])
        return difflib.SequenceMatcher(None, pattern.lower(), tail.lower()).ratio()

    ranked = sorted(names, key=score, reverse=True)
    best = [nm for nm in ranked if score(nm) >= 0.5][:n]
    return ", ".join(best or names[:n])


def _find_targets(model: nn.Module, cfg: AdapterConfig) -> list[_Target]:
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
            hits = [n for n in names if _suffix_match(n, pattern)]
            if not hits:
                non_linear = [n for n in all_modules if _suffix_match(n, pattern)]
                if non_linear:
                    kind = type(model.get_submodule(non_linear[0])).__name__
                    raise InjectError(
                        f"target {pattern!r} matches {non_linear[0]} ({kind}), which is not an nn.Linear; "
                        f"nearest Linear names: {_nearest(pattern, names)}"
                    )
                raise InjectError(
                    f"no nn.Linear matches targets={cfg.targets!r} (nothing ends with {pattern!r}); "
                    f"nearest names: {_nearest(pattern, names)}"
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
                    f"{_slice_name(name, key)}; use rotation_rank <= {b - a}"
                )
        targets.append(_Target(name, module, slices, block))
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


def _assign_heads(model: nn.Module, targets: list[_Target], cfg: AdapterConfig) -> None:
    """Number of heads of every adapted slice (HoRA); a width the head width does not divide is refused."""
    widest: dict[str, tuple[int, str]] = {}
    for t in targets:
        for key, (a, b) in t.slices.items():
            if t.block not in widest or b - a > widest[t.block][0]:
                widest[t.block] = (b - a, _slice_name(t.name, key))
    for t in targets:
        for key, (a, b) in t.slices.items():
            width, proj = b - a, _slice_name(t.name, key)
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


def _check_zero_rows(targets: list[_Target], cfg: AdapterConfig) -> None:
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
def _build_adapters(targets: list[_Target], cfg: AdapterConfig) -> None:
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


def inject(model: nn.Module, cfg: AdapterConfig, trainable: tuple[str, ...] = ()) -> list[str]:
    """Replace every target ``nn.Linear`` by an :class:`AdaptedLinear`; freeze all else.

    ``trainable``: module-name suffixes (e.g. ``("classifier",)``) whose parameters stay trainable
    besides the adapters. Returns the replaced module names. Raises a ``ValueError`` subclass on bad input,
    leaving the model unchanged.

    Example::

        cfg = doran.AdapterConfig.preset("doran", r=8, alpha=16, targets=("query", "value"))
        names = doran.inject(model, cfg, trainable=("classifier",))
    """
    if not isinstance(cfg, AdapterConfig):
        raise InjectError(f"cfg must be a doran.AdapterConfig, got {type(cfg).__name__}")
    if is_injected(model):
        raise InjectError("this model already has doran adapters; inject once (deep-copy the base model "
                          "before injecting if you need two adapted versions)")
    trainable = (trainable,) if isinstance(trainable, str) else tuple(trainable)
    targets = _find_targets(model, cfg)
    all_names = [n for n, _ in model.named_modules() if n]
    extra = []
    for pattern in trainable:
        hits = [n for n in all_names if _suffix_match(n, pattern)]
        if not hits:
            raise InjectError(f"trainable={trainable!r}: no module ends with {pattern!r}; nearest names: "
                              f"{_nearest(pattern, all_names)}")
        extra += hits
    _check_zero_rows(targets, cfg)
    _build_adapters(targets, cfg)

    # --- commit: nothing below can fail on user input ---
    for p in model.parameters():
        p.requires_grad_(False)
    for t in targets:
        new = AdaptedLinear(t.module, t.adapters)
        new.doran.to(t.module.weight.device)
        new.train(t.module.training)
        parent_name, _, child = t.name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
    for name in extra:
        for p in model.get_submodule(name).parameters():
            p.requires_grad_(True)
    bank.attach(model)
    setattr(model, STATE_ATTR, {
        "config": cfg,
        "trainable": trainable,
        "targets": {t.name: {"shape": list(t.module.weight.shape),
                             "slices": {k: list(v) for k, v in t.slices.items()},
                             **({"heads": dict(t.heads)} if t.heads else {})}  # HoRA: heads per slice
                    for t in targets},
    })
    return [t.name for t in targets]


# ---------------------------------------------------------------------------------------------- queries
def is_injected(model: nn.Module) -> bool:
    return hasattr(model, STATE_ATTR) or any(isinstance(m, AdaptedLinear) for m in model.modules())


def get_config(model: nn.Module) -> AdapterConfig:
    """The AdapterConfig a model was injected with."""
    return _state(model)["config"]


def _state(model: nn.Module) -> dict:
    state = getattr(model, STATE_ATTR, None)
    if state is None:
        raise InjectError("this model has no doran adapters; call doran.inject(model, cfg) first")
    return state


def adapted_modules(model: nn.Module) -> Iterator[tuple[str, AdaptedLinear]]:
    """(name, AdaptedLinear) for every adapted layer, in module order."""
    for name, module in model.named_modules():
        if isinstance(module, AdaptedLinear):
            yield name, module


def _slice_name(name: str, key: str) -> str:
    return name if key == "all" else f"{name}.{key}"


def slice_adapters(model: nn.Module) -> Iterator[tuple[str, SliceAdapter, AdaptedLinear]]:
    """(projection name, SliceAdapter, its layer); a fused qkv gives ``<name>.q`` and ``<name>.v``."""
    for name, module in adapted_modules(model):
        for key, ad in module.doran.items():
            yield _slice_name(name, key), ad, module


def _group_of(local: str) -> str:
    """The parameter group of a SliceAdapter's parameter, by its local name."""
    if local.startswith("generator."):
        return "generator"
    if local.startswith("lora_"):
        return "factors"
    if local.startswith("magnitude"):
        return "magnitude"
    if local.startswith("tau"):
        return "tau"
    if local == "diag":
        return "diag"
    if local.startswith("rotation."):
        return "rotation"
    return "other"


def named_adapter_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter, str]]:
    """(name, parameter, group) for every adapter parameter and every other trainable one.

    Groups: ``factors`` (static A, B), ``generator`` (embeddings and MLPs), ``magnitude``, ``tau``,
    ``diag`` (Pre-Diag's d), ``rotation`` (SORA's C, D), ``other`` (trainable non-adapter parameters, e.g. a
    classifier head). Each tensor appears once, also when a generator is shared. Names are those of the
    unwrapped model: the wrappers that FSDP and activation checkpointing insert are left out. On a packed
    model (``doran.pack``) a packed tensor's rows are given under their unpacked names, as views: values
    can be read and written in place, the gradient is the packed tensor's (``model.doran_packed``).
    """
    for name, p, group, _ in _named_tensors(model):
        yield name, p, group


def _named_tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor, str, tuple | None]]:
    """named_adapter_parameters plus, for a packed row, (packed tensor, row index); else None."""
    group_of: dict[int, str] = {}
    for _, module in adapted_modules(model):
        for ad in module.doran.values():
            for local, p in ad.named_parameters():
                group_of.setdefault(id(p), _group_of(local))
    views = packing.named_views(model)
    for name, p in model.named_parameters():
        name = _WRAPPERS.sub("", name)
        group = group_of.get(id(p))
        if id(p) in views:  # packed (doran/packing.py): its rows under their unpacked names
            for i, (row_name, row, role) in enumerate(views[id(p)]):
                yield row_name, row, _group_of(role), (p, i)
        elif group is not None:
            yield name, p, group, None
        elif p.requires_grad:
            yield name, p, "other", None


def adapter_leaves(model: nn.Module) -> Iterator[tuple[nn.Parameter, str, int]]:
    """(tensor, group, ndim of the tensors it holds) for every tensor an optimizer steps, each once, in the
    order of :func:`named_adapter_parameters`: a packed tensor (``doran.pack``) once, with the group and the
    ndim of its rows (which are one kind); read gradients here, a packed row (a view) has none."""
    seen: set[int] = set()
    for _, p, group in named_adapter_parameters(model):
        leaf = p if p.is_leaf else p._base
        if id(leaf) not in seen:
            seen.add(id(leaf))
            yield leaf, group, p.ndim


def named_adapter_gradients(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, gradient) for every tensor of :func:`named_adapter_parameters` that has one; a packed row's
    is its row of the packed tensor's gradient (the row itself, a view, has none)."""
    for name, p, _, row in _named_tensors(model):
        grad = p.grad if row is None else (None if row[0].grad is None else row[0].grad[row[1]])
        if grad is not None:
            yield name, grad


def trainable_parameter_counts(model: nn.Module) -> dict[str, int]:
    """Trainable parameters per group, plus ``trainable`` and ``total`` (unique tensors)."""
    counts = dict.fromkeys(GROUPS, 0)
    for _, p, group in named_adapter_parameters(model):
        if p.requires_grad:
            counts[group] += p.numel()
    counts["trainable"] = sum(counts[g] for g in GROUPS)
    counts["total"] = sum(p.numel() for p in model.parameters())
    return counts


def print_trainable_parameters(model: nn.Module) -> None:
    """Print trainable parameter counts per group, like PEFT's ``print_trainable_parameters``."""
    c = trainable_parameter_counts(model)
    groups = " | ".join(f"{g}: {c[g]:,}" for g in GROUPS if c[g])
    print(f"trainable params: {c['trainable']:,} || all params: {c['total']:,} || "
          f"trainable%: {100 * c['trainable'] / max(c['total'], 1):.4f}")
    print(f"  by group: {groups}")


def tau_values(model: nn.Module, absolute: bool = False) -> dict[str, float]:
    """``{projection name: tau}`` for every DoRA-family projection (mean over rows for per-row tau).

    Relative units (a fraction of the row norm) by default; ``absolute=True`` gives weight units.
    tau_mode='zero' reports 0.0.
    """
    out = {}
    for name, ad, layer in slice_adapters(model):
        if not ad.cfg.magnitude:
            continue
        with torch.no_grad():
            _, scale = ad._weight_stats(layer.weight)
            t = ad.tau_absolute(scale) if absolute else ad.tau_relative()
            out[name] = 0.0 if t is None else float(t.mean())
    return out


def magnitudes(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{projection name: magnitude vector m}`` (detached copies) for DoRA-family projections."""
    return {name: ad.magnitude.detach().clone() for name, ad, _ in slice_adapters(model) if ad.cfg.magnitude}


def param_groups(model: nn.Module, lr: float, weight_decay: float = 0.0) -> list[dict]:
    """AdamW parameter groups: decay on matrices only (no decay on 1-D tensors: magnitude, tau, diag, biases);
    tau gets ``cfg.tau_lr`` when set.

    Example::

        opt = torch.optim.AdamW(doran.param_groups(model, lr=1e-3, weight_decay=1e-4))
    """
    tau_lr = _state(model)["config"].tau_lr if hasattr(model, STATE_ATTR) else None
    decay, no_decay, tau = [], [], []
    for p, group, ndim in adapter_leaves(model):
        if not p.requires_grad:
            continue
        if group == "tau":
            tau.append(p)
        elif ndim >= 2:
            decay.append(p)
        else:
            no_decay.append(p)
    groups = [
        {"params": decay, "lr": lr, "weight_decay": weight_decay, "name": "decay"},
        {"params": no_decay, "lr": lr, "weight_decay": 0.0, "name": "no_decay"},
        {"params": tau, "lr": tau_lr if tau_lr is not None else lr, "weight_decay": 0.0, "name": "tau"},
    ]
    return [g for g in groups if g["params"]]


# ---------------------------------------------------------------------------------------------- merging
def merge(model: nn.Module) -> None:
    """Fold every adapter into its base weight (inference then costs what the base model costs).

    Explicit only: ``train()``/``eval()`` never merge. The original rows are kept so that
    :func:`unmerge` restores W0 bit for bit.
    """
    _state(model)
    for _, module in adapted_modules(model):
        module.merge()
    bank.forget(model)


def unmerge(model: nn.Module) -> None:
    """Undo :func:`merge` exactly."""
    _state(model)
    for _, module in adapted_modules(model):
        module.unmerge()
    bank.forget(model)


def eject(model: nn.Module) -> nn.Module:
    """Remove the adapters: put the original ``nn.Linear`` modules back (their weights unmerged).

    Parameters keep their current ``requires_grad`` flags; adapter tensors are dropped.
    """
    _state(model)
    unmerge(model)
    packing.unpack(model)
    for name, module in list(adapted_modules(model)):
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, module.base_module)
    bank.detach(model)
    delattr(model, STATE_ATTR)
    return model


def merged_copy(model: nn.Module) -> nn.Module:
    """A deep copy of the adapted model with plain ``nn.Linear`` layers holding the merged weights.

    The copy has no doran modules and no adapter tensors; its outputs equal the adapted model's.
    """
    _state(model)
    plain = copy.deepcopy(model)
    for name, module in list(adapted_modules(plain)):
        linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                           device=module.weight.device, dtype=module.weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(module.merged_weight())
            if module.bias is not None:
                linear.bias.copy_(module.merged_bias())  # rotated by SORA with rotate_bias=True
        linear.weight.requires_grad_(module.weight.requires_grad)
        if module.bias is not None:
            linear.bias.requires_grad_(module.bias.requires_grad)
        linear.train(module.training)
        parent_name, _, child = name.rpartition(".")
        setattr(plain.get_submodule(parent_name) if parent_name else plain, child, linear)
    plain._modules.pop(packing.ATTR, None)
    bank.detach(plain)
    delattr(plain, STATE_ATTR)
    return plain
