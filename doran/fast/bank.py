"""The adapter bank: the factors and row scales of every slice of a model, batched, once per forward.

On the fused path each slice would otherwise run its own generator MLP, tau and norm, many small ops forward
and about as many backward: on a GPU the host records those ops one at a time, and with two slices per
block they dominate the step. The bank groups the slices whose shapes and settings agree (every q and v of
a ViT or a LLaMA form one group per projection shape, doran/fast/groups.py) and computes, per group,

    A (S, r, in), B (S, out, r)     one bmm chain through the stacked generator weights (or the stacked
                                    static factors)
    g (S, out)                      one closed-form autograd node for all S norms (doran/fast/rowscale.py)

so the op count no longer grows with the number of layers. The values are those of the per-slice
computation (the same functions of doran/norm.py and doran/generators.py, batched; the same precision);
tests/test_fused.py checks them in float64.

It runs from a forward pre-hook on the model given to ``inject`` and hands each slice its tensors for
that forward (and for a recomputation of the layer in its backward, as activation checkpointing does), so
every forward, also several per optimizer step (gradient accumulation), builds its own autograd graph.
Under ``torch.compile`` the hook is traced too: the batched computation becomes part of the graph and the
tensors reach the layers through a dict the compiler tracks (``handed``), so that the compiler fuses the
slices' small ops across layers; ``set_execution(compiled_bank=False)`` traces each slice's own
computation instead. Compile through ``doran.compile_model``: ``torch.compile(model)`` compiles a module's
hooks as frames of their own, so the bank would be a graph of its own whose tensors cross into the
forward's graph each step (the same values, a second CUDA-graph replay). Traced, stacks of more than 8
tensors are built as trees (doran/fast/ops.py's ``stack``: Inductor copies each input of a larger cat in a
kernel of its own) and a first layer shared by q and v is stacked once (``_stack_shared``). With the
model's tensors packed (``doran.pack``, doran/fast/packing.py; the Lightning modules do it) a group's
tensors are taken as they are stored, one per kind, instead of stacked from the slices. A layer called
outside its model's forward, a sharded model (FSDP holds the parameters of other layers sharded during the
root forward) and per-head factors (HoRA) use the per-slice computation.
"""

from __future__ import annotations

import weakref
from typing import Any, NamedTuple

import torch
from torch import nn

from .. import settings
from ..generators import generate_stacked
from ..norm import TAU_TENSOR, NormStats, norm_stats, row_norms, tau_of
from .groups import DTensor, bank_entries, full_layout, group_entries, layer_spans, sharded, weight_layout
from .ops import stack
from .rowscale import row_scales
from .slices import columns
from .store import GroupStorage, group_roles, stacked

_BANKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class _StackLaidOut(torch.autograd.Function):
    """``stack`` whose gradients come back in the inputs' row-major layout: a generator's first-layer weights
    enter a batched product transposed, so their stacked gradient is transposed, and autograd would copy
    each of its S slices to the weight's layout in every backward; here one copy makes the whole stack
    row-major and the slices are taken over as they are."""

    @staticmethod
    def forward(ctx, *tensors):
        return stack(list(tensors))

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous().unbind(0)


def _stack_shared(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Stack S tensors of which runs of k consecutive ones are the same tensor (a first layer shared by the
    q and v of a block, ``sharing="qv_first"``; all of them under ``"global"``): each distinct tensor is
    stacked once and expanded, so its gradient is one sum instead of k stacked copies added up. Distinct
    tensors are stacked by ``_StackLaidOut`` (gradients in the tensors' own layout)."""
    n = len(tensors)
    k = 1
    while k < n and tensors[k] is tensors[0]:
        k += 1
    if k == 1 or n % k or any(tensors[i] is not tensors[i - i % k] for i in range(n)) or \
            len({id(t) for t in tensors}) != n // k:
        laid_out = any(t.requires_grad for t in tensors) and len({id(t) for t in tensors}) == n
        return _StackLaidOut.apply(*tensors) if laid_out else stack(tensors)  # (compile: distinct inputs)
    distinct = stack(tensors[::k])  # (S / k, ...)
    return distinct.unsqueeze(1).expand(n // k, k, *distinct.shape[1:]).reshape(n, *distinct.shape[1:])


def _tensors(ads, role: str, packed: GroupStorage | None) -> torch.Tensor:
    """The (S, ...) stack of one tensor of a group's slices: the packed tensor (doran/fast/packing.py) or, per
    slice, its own tensors stacked (a tensor shared by consecutive slices stacked once)."""
    if packed is not None:
        t = stacked(packed.store, packed.roles, role)
        if t is not None:
            return t
    path, _, attr = role.rpartition(".")
    tensors = [getattr(ad.get_submodule(path) if path else ad, attr) for ad in ads]
    return stack(tensors) if role.startswith(("generator.emb", "lora_", "magnitude", "tau")) else \
        _stack_shared(tensors)


def _traced_stats(group) -> NormStats:
    """``_weight_stats`` of a group's slices, batched, as the compiled graph computes them each step: one row
    norm per base layer (the q and v slices of a qkv share it), the tau scales of all slices at once."""
    norms_of: dict[int, torch.Tensor] = {}
    rows = []
    for layer, ad in group:
        norms = norms_of.get(id(layer))
        if norms is None:
            with torch.no_grad():
                norms = row_norms(layer.weight)
            norms_of[id(layer)] = norms
        rows.append(norms[ad.rows])
    return norm_stats(stack(rows), group[0][1].cfg)  # norms (S, out)


class _GradTimesG(torch.autograd.Function):
    """The identity on g (S, d) whose consumers hand back ``g * dL/dg`` instead of dL/dg (the eager fused
    layers taking the bank's per-layer views, ``raw_dg``): the backward divides once for the whole group,
    0 where g = 0 (there the layer's output does not depend on z, doran/fast/fused.py's module docstring)."""

    @staticmethod
    def forward(ctx, g):
        ctx.save_for_backward(g)
        return g.view_as(g)

    @staticmethod
    def backward(ctx, raw):
        (g,) = ctx.saved_tensors
        return raw.div(g).masked_fill_(g == 0, 0.0)


class LayerViews(NamedTuple):
    """Eager, what one layer's fused node takes from its bank group, as views of the group's tensors."""

    A: torch.Tensor  # (k r, in), its k slices' A in the compute dtype
    B: torch.Tensor  # (k, d, r), their B stacked
    g: torch.Tensor | None  # (k d,), their g concatenated (through _GradTimesG); None for LoRA
    dtype: torch.dtype  # the compute dtype A is in
    g_full: torch.Tensor | None  # g over all the layer's rows, 1 outside its slices (detached), or None
    gs: torch.Tensor | None  # s g (detached), or None


class Banked(NamedTuple):
    """What the bank hands one slice for a forward: its factors and row scale, computed with the group's."""

    A: torch.Tensor  # (r, in)
    B: torch.Tensor  # (out, r)
    g: torch.Tensor | None  # (out,); None for LoRA
    layer: LayerViews | None = None  # eager, at the first slice of a layer: the layer's tensors as views
    bank: AdapterBank | None = None  # eager: the bank that computed it (None while traced)


class AdapterBank:
    """Groups of slices of one model computed together; see the module docstring."""

    def __init__(self, model: nn.Module, key: tuple[int, ...], entries: list[tuple[Any, Any]]) -> None:
        self.key = key
        self.usable = not sharded(model)
        self.groups = group_entries(entries)
        self._layouts = [weight_layout(group) for group in self.groups]
        self._packed = [group_roles([ad for _, ad in group], model) for group in self.groups]
        self._spans = [layer_spans(group) for group in self.groups]
        self._full_layout = [full_layout(group, spans) for group, spans in zip(self.groups, self._spans)]
        self.slices = [ad for _, ad in entries]
        self.layers = list({id(layer): layer for layer, _ in entries}.values())
        self.active = False  # inside the model's forward
        self.grad_enabled = False  # grad mode of the last refresh
        self._stats: dict[int, tuple[tuple[Any, ...], torch.Tensor, torch.Tensor]] = {}
        # ||W0||^2_row and tau row scales as a compiled forward reads them (``sync_stats``): one pair per group,
        # refreshed in place, valid for the next compiled call only (``stats_synced``)
        self.static_stats: dict[int, NormStats] = {}
        self._static_keys: dict[int, tuple[Any, ...]] = {}
        self.stats_synced = False
        self.handed: dict[int, Banked] = {}  # id(slice) -> its tensors while traced by torch.compile
        for _, ad in entries:  # the way back from a slice to its bank inside a compiled graph
            object.__setattr__(ad, "_bank", self)

    def _stacked_stats(self, i: int, group) -> NormStats:
        """Stacked ``||W0||^2_row`` and tau row scales of a group, restacked when a base weight changes.
        Traced, the graph reads the copies ``sync_stats`` checked just before the compiled call, or, without
        that check (a model compiled other than by ``doran.compile_model``), computes them itself."""
        if torch.compiler.is_compiling():
            if self.stats_synced and i in self.static_stats:
                return self.static_stats[i]
            return _traced_stats(group)
        key = tuple((layer.weight.data_ptr(), layer.weight._version) for layer, _ in group)
        cached = self._stats.get(i)
        if cached is None or cached[0] != key:
            stats = [ad._weight_stats(layer.weight) for layer, ad in group]
            cached = (key, torch.stack([w for w, _ in stats]), torch.stack([rs for _, rs in stats]))
            self._stats[i] = cached
        return NormStats(cached[1], cached[2])

    def sync_stats(self) -> None:
        """Eager, before a compiled call (``doran.compile_model``): bring each group's stats up to date with
        the base weights (recomputed only when a weight changed: its version or storage) in tensors of fixed
        address that the compiled graph reads, so that the graph does not read every frozen W0 once more per
        step for its row norms. Valid for one call: the model's forward hook clears ``stats_synced``."""
        for i, group in enumerate(self.groups):
            if not group[0][1].cfg.magnitude:
                continue
            w0_sq, row_scale = self._stacked_stats(i, group)
            key = self._stats[i][0]
            held = self.static_stats.get(i)
            if held is not None and all(h.shape == t.shape and h.dtype == t.dtype and h.device == t.device
                                        for h, t in zip(held, (w0_sq, row_scale))):
                if self._static_keys[i] != key:  # a weight changed since the last copy
                    held.w0_sq.copy_(w0_sq)
                    held.row_scale.copy_(row_scale)
                    self._static_keys[i] = key
                continue
            copies = NormStats(w0_sq.clone(), row_scale.clone())
            for t in copies:  # CUDA graphs read them where they are (no copy into the graph's inputs)
                torch._dynamo.mark_static_address(t)
            self.static_stats[i] = copies
            self._static_keys[i] = key
        self.stats_synced = True

    def _per_layer(self, i: int, A, B, g) -> dict[int, LayerViews]:
        """Eager, per layer of a group whose layers' slices are consecutive in it: the tensors its fused node
        takes, as views of the group's (no cat, stack or cast per layer): A of all its slices (k r, in) in the
        compute dtype (one cast for the group), B stacked (k, d, r), g concatenated (k d,); keyed by the id
        of the layer's first slice. Their gradients come back as one cat per tensor for the group. g reaches
        the layers through ``_GradTimesG``: each layer hands back g * dL/dg, which it has without dividing,
        and the group divides once (three ops for all layers instead of three per layer)."""
        spans = self._spans[i]
        dev = A.device.type
        cd = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else spans[0].layer.weight.dtype
        sizes = [span.count for span in spans]
        A_cd = torch.empty(A.shape, dtype=cd, device=A.device).copy_(A)  # (S, r, in), row-major: views below
        n = len(sizes)
        fulls, scaled = [None] * n, [None] * n
        if g is not None:
            with torch.no_grad():  # constants of the layers' closed-form backward (no autograd through them)
                scaled = (g.detach() * self.groups[i][0][1].s).split(sizes)  # s g: dB = s g (dy^T h), one op
                layout = self._full_layout[i]
                if layout is not None:  # g over all rows of each layer, 1 outside its slices: g W0 or g dy in one op
                    out_f, even = layout
                    full = g.new_ones(n, out_f)
                    columns(full, even).copy_(g.detach().view(n, even.count, even.size))
                    fulls = full.unbind(0)
            g = _GradTimesG.apply(g)
        parts = zip(spans, A_cd.split(sizes), B.split(sizes), g.split(sizes) if g is not None else [None] * n,
                    fulls, scaled)
        return {first: LayerViews(a.view(-1, a.shape[-1]), b, None if gg is None else gg.view(-1), cd, full,
                                  None if gs is None else gs.view(-1))
                for (_, first, _), a, b, gg, full, gs in parts}

    def refresh(self) -> None:
        self.active, self.grad_enabled = True, torch.is_grad_enabled()
        traced = torch.compiler.is_compiling()
        handed: dict[int, Banked] = {}
        for i, group in enumerate(self.groups):
            ads = [ad for _, ad in group]
            ad0 = ads[0]
            packed = self._packed[i]
            with torch.autocast(device_type=group[0][0].weight.device.type, enabled=False):
                if hasattr(ad0, "generator"):
                    gen = ad0.generator
                    A, B = (generate_stacked(_tensors(ads, f"generator.emb_{x}", packed),
                                             _tensors(ads, f"generator.first_{x}.linear.weight", packed),
                                             _tensors(ads, f"generator.first_{x}.linear.bias", packed),
                                             _tensors(ads, f"generator.second_{x}.weight", packed),
                                             getattr(gen, f"first_{x}").act, getattr(gen, f"second_{x}").multiplier)
                            for x in "AB")
                    B = B.transpose(1, 2)  # (S, out, r)
                else:
                    A = _tensors(ads, "lora_A", packed)
                    B = _tensors(ads, "lora_B", packed)
                g = None
                if ad0.cfg.magnitude:
                    w0_sq, row_scale = self._stacked_stats(i, group)
                    cfg = ad0.cfg
                    name = TAU_TENSOR.get(cfg.tau_mode)  # the slices' tau, stacked: (S, 1) or (S, out)
                    t = None if name is None else tau_of(cfg.tau_mode, _tensors(ads, name, packed), row_scale)
                    m = _tensors(ads, "magnitude", packed)
                    layers, layout = self._layouts[i]
                    g = row_scales(A, B, m, t, [layer.weight for layer in layers], layout, w0_sq, ad0.s,
                                   cfg.detach_norm)
            if traced:  # the compiler tracks this dict (a side effect) and hands the layers its tensors
                gs = g.unbind(0) if g is not None else (None,) * len(ads)
                for ad, a, b, gg in zip(ads, A.unbind(0), B.unbind(0), gs):
                    handed[id(ad)] = Banked(a, b, gg)
                continue
            # layers dropping their input take per-slice factors (a mask each): no per-layer views for them
            dropping = ad0.cfg.dropout > 0 and any(layer.training for layer, _ in group)
            per_layer = self._per_layer(i, A, B, g) if self._spans[i] is not None and not dropping else {}
            As, Bs = A.unbind(0), B.unbind(0)
            gs = g.unbind(0) if g is not None else (None,) * len(ads)
            for ad, a, b, gg in zip(ads, As, Bs, gs):  # plain attributes: skip nn.Module.__setattr__
                object.__setattr__(ad, "_banked", Banked(a, b, gg, per_layer.get(id(ad)), self))
                object.__setattr__(ad, "_banked_used", False)
        if traced:
            self.handed = handed

    def clear(self) -> None:
        self.active = False
        self.handed = {}
        for ad in self.slices:
            object.__setattr__(ad, "_banked", None)
            object.__setattr__(ad, "_banked_used", False)
            object.__setattr__(ad, "_bank", None)


def banked(ad) -> Banked | None:
    """The slice's tensors for this call of its layer from its model's bank, or None (compute per slice);
    eager, at a layer's first slice, with the layer's tensors as views (``AdapterBank._per_layer``).

    Served during the model's forward (in the grad mode of the refresh), and again during the backward to
    a layer that used them in the forward: activation checkpointing recomputes the layer there and must see
    the same tensors. A layer called on its own, or after the step, computes its own.
    """
    if torch.compiler.is_compiling():  # traced: the tensors the bank's traced refresh handed over
        bank = ad.__dict__.get("_bank")
        if bank is None or not bank.active or not settings.compiled_bank():
            return None
        return bank.handed.get(id(ad))
    entry = ad._banked
    if entry is None:
        return None
    bank = entry.bank
    if bank.active and bank.grad_enabled == torch.is_grad_enabled():
        object.__setattr__(ad, "_banked_used", True)
        return entry
    if ad._banked_used and torch._C._current_graph_task_id() != -1:  # recomputed inside the backward
        return entry
    return None


def _gathered_elsewhere(bank: AdapterBank) -> bool:
    """Whether the model was sharded after the bank was built (FSDP wrapped later): parameters of other
    layers are then empty or distributed during the root forward, so each layer computes its own."""
    for group in bank.groups:
        p = next(group[0][1].parameters(), None)
        if p is not None and (p.numel() == 0 or isinstance(p, DTensor)):
            return True
    return False


def build(model: nn.Module) -> AdapterBank:
    """The bank of ``model``'s current adapted layers (``inject`` builds it; merge/unmerge rebuild it)."""
    entries = bank_entries(model)
    bank = AdapterBank(model, tuple(id(ad) for _, ad in entries), entries)
    _BANKS[model] = bank
    object.__setattr__(model, "_doran_bank", bank)  # reachable inside a compiled graph
    return bank


def _pre_hook(model: nn.Module, args) -> None:
    if not settings.bank_enabled():
        return
    if torch.compiler.is_compiling():  # traced: the batched computation becomes part of the graph
        bank = model.__dict__.get("_doran_bank")
        if settings.compiled_bank() and bank is not None and bank.usable and bank.groups and \
                not any(layer.merged for layer in bank.layers) and not _gathered_elsewhere(bank):
            bank.refresh()
        return
    bank = _BANKS.get(model)
    if bank is None or any(layer.merged for layer in bank.layers):  # built once: no module walk per forward
        bank = build(model)
    if bank.usable and bank.groups and not _gathered_elsewhere(bank):
        bank.refresh()


def _post_hook(model: nn.Module, args, output) -> None:
    if torch.compiler.is_compiling():
        bank = model.__dict__.get("_doran_bank")
        if bank is not None and bank.active:
            bank.active = False
            bank.handed = {}
        if bank is not None and bank.stats_synced:
            bank.stats_synced = False
        return
    bank = _BANKS.get(model)
    if bank is not None:
        bank.active = False  # the tensors stay for a recomputation in the backward (checkpointing)
        bank.stats_synced = False


def sync_stats(model: nn.Module) -> None:
    """Before a compiled call of ``model`` (``doran.compile_model`` calls it eagerly): its bank's copies of the
    frozen weights' row norms brought up to date (``AdapterBank.sync_stats``); nothing without a bank or
    when the traced forward would not use it."""
    if not (settings.bank_enabled() and settings.compiled_bank()):
        return
    bank = model.__dict__.get("_doran_bank")
    if bank is None or not bank.usable or not bank.groups or any(layer.merged for layer in bank.layers) or \
            _gathered_elsewhere(bank):
        return
    bank.sync_stats()


def forget(model: nn.Module) -> None:
    """Rebuild the bank of ``model`` from its current layers (``merge`` and ``unmerge`` call this)."""
    bank = _BANKS.pop(model, None)
    if bank is not None:
        bank.clear()
    build(model)


def attach(model: nn.Module) -> None:
    """Register the bank's hooks on ``model`` and build its bank (``inject`` does this)."""
    model.register_forward_pre_hook(_pre_hook)
    model.register_forward_hook(_post_hook)
    build(model)


def detach(model: nn.Module) -> None:
    """Remove the bank's hooks and the bank of ``model`` (``eject`` and ``merged_copy`` do this).

    Hooks are found by function, not by handle: a deep copy of a model copies its hooks, and a handle
    would still point at the original's."""
    for hooks, fn in ((model._forward_pre_hooks, _pre_hook), (model._forward_hooks, _post_hook)):
        for hook_id in [k for k, v in hooks.items() if v is fn]:
            del hooks[hook_id]
    bank = _BANKS.pop(model, None)
    if bank is not None:
        bank.clear()
    model.__dict__.pop("_doran_bank", None)
