"""Which slices of a model the adapter bank computes together, and how they lie in their layers.

A bank group is the slices whose shapes and settings agree (``group_entries``): every q and v of a ViT or a
LLaMA form one group per projection shape. The layouts below let the bank hand each layer its slices'
tensors as views of the group's, and run the norm's products with W0 once per base weight.
"""

from __future__ import annotations

import itertools
from typing import Any, NamedTuple

from torch import nn

from ..inject import adapted_modules
from .slices import EvenLayout, even_layout, fusable

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover - torch without distributed
    DTensor = ()


def sharded(model: nn.Module) -> bool:
    """Whether the model is sharded (FSDP modules or DTensor parameters): then the bank stays off."""
    names = {type(m).__name__ for m in model.modules()}
    if any("FullyShardedDataParallel" in n or n.startswith("FSDP") for n in names):
        return True
    return any(isinstance(p, DTensor) for p in model.parameters())


def _signature(layer, ad) -> tuple[Any, ...]:
    """What the slices computed together share: shapes, dtype, device and every setting of the formulas."""
    cfg = ad.cfg
    gen = hasattr(ad, "generator")
    return (gen, cfg.r, layer.in_features, ad.stop - ad.start, layer.weight.dtype, str(layer.weight.device),
            cfg.magnitude, cfg.tau_mode, cfg.tau_granularity, cfg.tau_floor, cfg.detach_norm, ad.s,
            (cfg.gen_hidden, cfg.gen_embed, cfg.gen_activation) if gen else None)


def group_entries(entries: list[tuple[Any, Any]]) -> list[list[tuple[Any, Any]]]:
    """The slices computed together: those whose shapes and settings agree, in model order."""
    groups: dict[tuple[Any, ...], list[tuple[Any, Any]]] = {}
    for layer, ad in entries:
        groups.setdefault(_signature(layer, ad), []).append((layer, ad))
    return list(groups.values())


class Span(NamedTuple):
    """The slices of one layer within a bank group."""

    layer: nn.Module
    first: int  # id of its first slice
    count: int  # k, its number of slices


def layer_spans(group) -> list[Span] | None:
    """One span per layer when every layer's slices of the group are consecutive in it, in row order, of one
    shape; else None (each layer gathers its slices itself)."""
    spans: list[Span] = []
    for layer, ad in group:
        if spans and spans[-1].layer is layer:
            spans[-1] = Span(layer, spans[-1].first, spans[-1].count + 1)
        elif any(s.layer is layer for s in spans):
            return None
        else:
            spans.append(Span(layer, id(ad), 1))
    for layer, _, k in spans:
        ads = [ad for lay, ad in group if lay is layer]
        if len(layer.doran) != k or any(a.start >= b.start for a, b in itertools.pairwise(ads)) or \
                len({a.stop - a.start for a in ads}) > 1:
            return None
    return spans


class FullLayout(NamedTuple):
    """The common layout of a group's layers whose slices cover only some of their rows (a qkv's q and v)."""

    rows: int  # output rows of every layer
    even: EvenLayout  # where the slices lie in them


def full_layout(group, spans: list[Span] | None) -> FullLayout | None:
    """The layout when every layer of a group has the same number of rows and its slices at the same
    evenly spaced rows (``even_layout``) but not all of them (a qkv's q and v): then the bank hands each layer g
    over all its rows; None otherwise (one slice over all rows needs no such vector)."""
    if spans is None:
        return None
    layers = [layer for layer, _, _ in spans]
    ranges = {tuple((ad.start, ad.stop) for lay, ad in group if lay is layer) for layer in layers}
    rows = {layer.out_features for layer in layers}
    if len(ranges) != 1 or len(rows) != 1:
        return None
    (ranges,), (out_f,) = ranges, rows
    even = even_layout(ranges)
    if even is None or ranges == ((0, out_f),):
        return None
    return FullLayout(out_f, even)


class WeightLayout(NamedTuple):
    """Where a group's slices lie in their base weights (``rowscale.row_scales``'s ``weights, layout``)."""

    layers: list[nn.Module]  # the distinct base layers, in group order
    rows: tuple[tuple[int, int], ...]  # per slice: (index of its layer, first row)


def weight_layout(group) -> WeightLayout:
    """The distinct base layers of a group's slices and, per slice, (index of its layer, first row): the
    norm's products with W0 then run once per base weight (the q and v of a qkv together)."""
    weights: list[nn.Module] = []
    index: dict[int, int] = {}
    layout = []
    for layer, ad in group:
        if id(layer) not in index:
            index[id(layer)] = len(weights)
            weights.append(layer)
        layout.append((index[id(layer)], ad.start))
    return WeightLayout(weights, tuple(layout))


def bank_entries(model: nn.Module) -> list[tuple[Any, Any]]:
    """(layer, slice) for every slice the bank can serve: fused-path layers, not merged, no per-head factors,
    DoRA family or generated factors (static LoRA factors need no batching)."""
    out = []
    for _, layer in adapted_modules(model):
        if layer.merged or not fusable(layer):
            continue
        out.extend((layer, ad) for ad in layer.doran.values()
                   if ad.heads is None and (ad.cfg.magnitude or hasattr(ad, "generator")))
    return out
