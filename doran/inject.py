"""Injection into a model by module name, and everything that walks the adapted model afterwards.

``inject`` validates every target before it touches the model (doran/targets.py): a bad input raises a
``ValueError`` subclass and leaves the model exactly as it was.

This module does not import the fast path (doran.fast). What the fast path attaches to an adapted model (the
adapter bank's forward hooks, packed storage) it registers in ``HOOKS`` when it is imported; ``inject``,
``merge``, ``unmerge``, ``eject`` and ``merged_copy`` call those hooks at each change of a model, and the
parameter queries read the tensors the fast path stores elsewhere through them.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import nn

from .config import AdapterConfig
from .errors import InjectError as InjectError  # importable from here as before
from .layers import ADAPTER_GROUPS, AdaptedLinear, SliceAdapter, group_of
from .targets import build_adapters, check_zero_rows, find_targets, nearest, slice_name, suffix_match

STATE_ATTR = "_doran_state"
_WRAPPERS = re.compile(r"(_fsdp_wrapped_module|_checkpoint_wrapped_module|_orig_mod)\.")
# The parameter groups: those of the adapter tensors (doran/layers.py's ADAPTER_GROUPS, in its order), then
# "other": trainable tensors outside every adapter (e.g. a classifier head)
GROUPS = (*dict.fromkeys(ADAPTER_GROUPS.values()), "other")


class RowView(NamedTuple):
    """One row of a tensor the fast path stores for several slices (packed): the row's own name, the row
    itself (a view) and its role (its name inside a SliceAdapter, e.g. ``generator.emb_A``)."""

    name: str
    tensor: torch.Tensor
    role: str


ModelHook = Callable[[nn.Module], None]


@dataclass
class ModelHooks:
    """What the fast path (doran.fast) attaches to adapted models; empty, a model is the maths alone."""

    injected: list[ModelHook] = field(default_factory=list)  # after inject
    changed: list[ModelHook] = field(default_factory=list)  # after merge / unmerge
    ejecting: list[ModelHook] = field(default_factory=list)  # before eject puts the base layers back
    removed: list[ModelHook] = field(default_factory=list)  # once the adapters are gone: after eject, on a merged_copy
    # tensors stored elsewhere: {id(stored tensor): its rows, in order}
    views: list[Callable[[nn.Module], dict[int, list[RowView]]]] = field(default_factory=list)


HOOKS = ModelHooks()


def _run(hooks: list[ModelHook], model: nn.Module) -> None:
    for hook in hooks:
        hook(model)


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
    targets = find_targets(model, cfg)
    all_names = [n for n, _ in model.named_modules() if n]
    extra = []
    for pattern in trainable:
        hits = [n for n in all_names if suffix_match(n, pattern)]
        if not hits:
            raise InjectError(f"trainable={trainable!r}: no module ends with {pattern!r}; nearest names: "
                              f"{nearest(pattern, all_names)}")
        extra += hits
    check_zero_rows(targets, cfg)
    build_adapters(targets, cfg)

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
    _run(HOOKS.injected, model)
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
    """Whether ``model`` holds doran adapters (``doran.inject`` refuses a second injection).

    Example::

        if not doran.is_injected(model):
            doran.inject(model, cfg)
    """
    return hasattr(model, STATE_ATTR) or any(isinstance(m, AdaptedLinear) for m in model.modules())


def get_config(model: nn.Module) -> AdapterConfig:
    """The AdapterConfig a model was injected with.

    Example::

        doran.get_config(model).r   # 8
    """
    return _state(model)["config"]


def _state(model: nn.Module) -> dict:
    state = getattr(model, STATE_ATTR, None)
    if state is None:
        raise InjectError("this model has no doran adapters; call doran.inject(model, cfg) first")
    return state


def adapted_modules(model: nn.Module) -> Iterator[tuple[str, AdaptedLinear]]:
    """(name, AdaptedLinear) for every adapted layer, in module order.

    Example::

        names = [name for name, _ in doran.adapted_modules(model)]
    """
    for name, module in model.named_modules():
        if isinstance(module, AdaptedLinear):
            yield name, module


def slice_adapters(model: nn.Module) -> Iterator[tuple[str, SliceAdapter, AdaptedLinear]]:
    """(projection name, SliceAdapter, its layer); a fused qkv gives ``<name>.q`` and ``<name>.v``.

    Example::

        for name, adapter, layer in doran.slice_adapters(model):
            print(name, adapter.start, adapter.stop)
    """
    for name, module in adapted_modules(model):
        for key, ad in module.doran.items():
            yield slice_name(name, key), ad, module


def named_adapter_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter, str]]:
    """(name, parameter, group) for every adapter parameter and every other trainable one.

    Groups (``GROUPS``): ``factors`` (static A, B), ``generator`` (embeddings and MLPs), ``magnitude``,
    ``tau``, ``diag`` (Pre-Diag's d), ``rotation`` (SORA's C, D): each adapter tensor's group is declared
    next to where it is created (doran/layers.py's ``ADAPTER_GROUPS``); ``other``: trainable tensors outside
    every adapter (e.g. a classifier head), never an adapter tensor. Each tensor appears once, also when a
    generator is shared. Names are those of the unwrapped model: the wrappers that FSDP and activation
    checkpointing insert are left out. On a packed model (``doran.pack``) a packed tensor's rows are given
    under their unpacked names, as views: values can be read and written in place, the gradient is the
    packed tensor's (``model.doran_packed``).

    Example::

        sizes = {name: p.numel() for name, p, group in doran.named_adapter_parameters(model) if group == "tau"}
    """
    for name, p, group, _ in _named_tensors(model):
        yield name, p, group


def _named_tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor, str, tuple | None]]:
    """named_adapter_parameters plus, for a packed row, (packed tensor, row index); else None."""
    groups: dict[int, str] = {}
    for _, module in adapted_modules(model):
        for ad in module.doran.values():
            for local, p in ad.named_parameters():
                groups.setdefault(id(p), group_of(local))
    views: dict[int, list[RowView]] = {}
    for hook in HOOKS.views:
        views.update(hook(model))
    for name, p in model.named_parameters():
        name = _WRAPPERS.sub("", name)
        group = groups.get(id(p))
        if id(p) in views:  # packed (doran/fast/packing.py): its rows under their unpacked names
            for i, (row_name, row, role) in enumerate(views[id(p)]):
                yield row_name, row, group_of(role), (p, i)
        elif group is not None:
            yield name, p, group, None
        elif p.requires_grad:
            yield name, p, "other", None


def adapter_leaves(model: nn.Module) -> Iterator[tuple[nn.Parameter, str, int]]:
    """(tensor, group, ndim of the tensors it holds) for every tensor an optimizer steps, each once, in the
    order of :func:`named_adapter_parameters`: a packed tensor (``doran.pack``) once, with the group and the
    ndim of its rows (which are one kind); read gradients here, a packed row (a view) has none.

    Example::

        matrices = [p for p, group, ndim in doran.adapter_leaves(model) if ndim >= 2]
    """
    seen: set[int] = set()
    for _, p, group in named_adapter_parameters(model):
        leaf = p if p.is_leaf else p._base
        if id(leaf) not in seen:
            seen.add(id(leaf))
            yield leaf, group, p.ndim


def named_adapter_gradients(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, gradient) for every tensor of :func:`named_adapter_parameters` that has one; a packed row's
    is its row of the packed tensor's gradient (the row itself, a view, has none).

    Example::

        norms = {name: float(g.norm()) for name, g in doran.named_adapter_gradients(model)}
    """
    for name, p, _, row in _named_tensors(model):
        grad = p.grad if row is None else (None if row[0].grad is None else row[0].grad[row[1]])
        if grad is not None:
            yield name, grad


def trainable_parameter_counts(model: nn.Module) -> dict[str, int]:
    """Trainable parameters per group (``GROUPS``), plus ``trainable`` and ``total`` (unique tensors).

    Example::

        counts = doran.trainable_parameter_counts(model)
        adapter_only = counts["trainable"] - counts["other"]
    """
    counts = dict.fromkeys(GROUPS, 0)
    for _, p, group in named_adapter_parameters(model):
        if p.requires_grad:
            counts[group] += p.numel()
    counts["trainable"] = sum(counts[g] for g in GROUPS)
    counts["total"] = sum(p.numel() for p in model.parameters())
    return counts


def print_trainable_parameters(model: nn.Module) -> None:
    """Print trainable parameter counts per group, like PEFT's ``print_trainable_parameters``.

    Example::

        doran.print_trainable_parameters(model)   # trainable params: ... || all params: ... || trainable%: ...
    """
    c = trainable_parameter_counts(model)
    groups = " | ".join(f"{g}: {c[g]:,}" for g in GROUPS if c[g])
    print(f"trainable params: {c['trainable']:,} || all params: {c['total']:,} || "
          f"trainable%: {100 * c['trainable'] / max(c['total'], 1):.4f}")
    print(f"  by group: {groups}")


def tau_values(model: nn.Module, absolute: bool = False) -> dict[str, float]:
    """``{projection name: tau}`` for every DoRA-family projection (mean over rows for per-row tau).

    Relative units (a fraction of the row norm) by default; ``absolute=True`` gives weight units.
    tau_mode='zero' reports 0.0.

    Example::

        doran.tau_values(model)   # {"encoder.layer.0.attention.self.query": 0.1, ...}
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
    """``{projection name: magnitude vector m}`` (detached copies) for DoRA-family projections.

    Example::

        m = doran.magnitudes(model)["encoder.layer.0.attention.self.query"]   # (out,)
    """
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

    Example::

        doran.merge(model)     # then evaluate at the base model's cost
        doran.unmerge(model)   # before training again
    """
    _state(model)
    for _, module in adapted_modules(model):
        module.merge()
    _run(HOOKS.changed, model)


def unmerge(model: nn.Module) -> None:
    """Undo :func:`merge` exactly.

    Example::

        doran.unmerge(model)
    """
    _state(model)
    for _, module in adapted_modules(model):
        module.unmerge()
    _run(HOOKS.changed, model)


def eject(model: nn.Module) -> nn.Module:
    """Remove the adapters: put the original ``nn.Linear`` modules back (their weights unmerged).

    Parameters keep their current ``requires_grad`` flags; adapter tensors are dropped.

    Example::

        base = doran.eject(model)   # the same object, without adapters
    """
    _state(model)
    unmerge(model)
    _run(HOOKS.ejecting, model)
    for name, module in list(adapted_modules(model)):
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, module.base_module)
    _run(HOOKS.removed, model)
    delattr(model, STATE_ATTR)
    return model


def merged_copy(model: nn.Module) -> nn.Module:
    """A deep copy of the adapted model with plain ``nn.Linear`` layers holding the merged weights.

    The copy has no doran modules and no adapter tensors; its outputs equal the adapted model's.

    Example::

        plain = doran.merged_copy(model)
        torch.save(plain.state_dict(), "merged.pt")
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
    _run(HOOKS.removed, plain)
    delattr(plain, STATE_ATTR)
    return plain
