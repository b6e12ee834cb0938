"""Packed adapter storage: the parameters of each adapter-bank group held as one tensor per kind.

Injected, every projection owns its tensors: DoRAN on ViT-B/16's 24 q/v slices has 194 (embeddings,
generator layers, magnitude, tau), LoRA 50. The bank (doran/fast/bank.py) stacks them each forward, autograd
accumulates 194 gradients, a CUDA-graph replay rebuilds 194 gradient outputs and the optimizer walks 194
tensors: host work per tensor that a step whose kernels are replayed cannot hide. ``pack(model)`` stores
the tensors of each bank group (the slices whose shapes and settings agree, doran/fast/groups.py) stacked, one
``nn.Parameter`` per kind: ``emb_A`` (S, r, k), ``magnitude`` (S, out), a first layer shared by the q and v
of a block as (S / 2, hidden, k), and so on (ViT-B/16: 12 tensors). They live in a submodule of the
model, ``model.doran_packed`` (doran/fast/store.py); the bank takes them as they are (no stack forward, no
unbind backward).

Everything else sees the model as before:

- ``slice.magnitude``, ``generator.emb_A``, ``first_A.linear.weight`` ... are views of the packed tensors
  (a row of the stack), read on each access: the per-slice path, merge, the recorders and the tests compute
  with them, and their gradients reach the packed tensor.
- ``model.state_dict()`` and ``load_state_dict`` use the unpacked names (a checkpoint written packed loads
  unpacked and the other way round); ``doran.named_adapter_parameters``, ``save_adapter`` and
  ``load_adapter`` too.
- ``doran.param_groups`` hands the optimizer the packed tensors with the group of their kind (decay on
  matrices only, as the per-slice tensors): AdamW is elementwise, so the update is the per-slice one.
- ``model.parameters()`` yields the packed tensors instead of the per-slice ones: build the optimizer after
  ``pack`` (the Lightning modules pack in ``setup``, before the optimizer exists). A row's gradient is its
  row of the packed tensor's (``doran.named_adapter_gradients``), and ``requires_grad`` is the packed
  tensor's: freeze tensors before packing (tensors of one kind and group with mixed flags stay unpacked).

Only tensors used by one group alone are packed: a generator layer shared across groups (``sharing=
"global"`` over projections of different shapes) stays where it is, and so do the adapters the bank does
not serve (LoRA, HoRA's per-head factors, Pre-Diag, SORA). Not for sharded models (FSDP shards each
block's tensors, and the packed ones would belong to the root); ``pack`` refuses one. ``unpack`` (and
``eject``) restore per-slice parameters with the current values.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..inject import _state, adapted_modules, slice_adapters
from . import bank
from .groups import bank_entries, group_entries, sharded
from .store import REFS, PackedGroup, Ref, Role

# Re-exported: the readers of packed storage as other code reaches them (doran.packing.<name>)
from .store import ATTR as ATTR
from .store import PackedStore as PackedStore
from .store import adapter_tensors as adapter_tensors
from .store import is_packed as is_packed
from .store import named_views as named_views
from .store import store_of as store_of
from .store import trainable_names as trainable_names

_CLASSES: dict[tuple[type, tuple[str, ...]], type] = {}


def _view(attr: str) -> property:
    def get(self: nn.Module) -> torch.Tensor:
        store, key, index = self.__dict__[REFS][attr]
        return getattr(store, key)[index]

    return property(get, doc=f"``{attr}``: a row of a packed tensor (doran.fast.packing)")


def _packed_class(cls: type, attrs: tuple[str, ...]) -> type:
    """A subclass of ``cls`` whose ``attrs`` are read from the packed store (cached per class and names)."""
    key = (cls, attrs)
    if key not in _CLASSES:
        body = {a: _view(a) for a in attrs}
        body.update(_doran_unpacked_class=cls, _doran_attrs=attrs, __reduce_ex__=_reduce_ex)
        _CLASSES[key] = type(f"Packed{cls.__name__}", (cls,), body)
    return _CLASSES[key]


def _rebuild(cls: type, attrs: tuple[str, ...]) -> nn.Module:
    packed = _packed_class(cls, attrs)
    return packed.__new__(packed)


def _reduce_ex(self: nn.Module, protocol: int):
    """Pickle (``torch.save(model)``) and ``copy.deepcopy`` a module of a made-up class by its base class and
    packed names: the class is made again where it is loaded."""
    cls = type(self)
    return _rebuild, (cls._doran_unpacked_class, cls._doran_attrs), self.__getstate__()


def _owner(root: nn.Module, local: str) -> tuple[nn.Module, str]:
    path, _, attr = local.rpartition(".")
    return (root.get_submodule(path) if path else root), attr


def _group_tensors(group, slice_names: dict[int, str]):
    """Per role of a group: the slices' tensors and the roles' model-relative names."""
    roles: dict[str, list[tuple[torch.Tensor, str]]] = {}
    for _, ad in group:
        for local, p in ad.named_parameters(remove_duplicate=False):
            roles.setdefault(local, []).append((p, f"{slice_names[id(ad)]}.{local}"))
    return roles


def pack(model: nn.Module) -> PackedStore | None:
    """Store the adapter tensors of each bank group of ``model`` stacked (see the module docstring).

    Returns the store, or None when there is nothing to pack (no bank groups, or already packed: then the
    existing store). Build the optimizer after this call: ``model.parameters()`` changes.

    Example::

        doran.inject(model, cfg)
        doran.pack(model)
        opt = torch.optim.AdamW(doran.param_groups(model, lr=1e-3))
    """
    _state(model)
    if is_packed(model):
        return store_of(model)
    if any(m.merged for _, m in adapted_modules(model)):
        raise RuntimeError("the model is merged; call doran.unmerge(model) before doran.pack(model)")
    if sharded(model):
        raise RuntimeError("doran.pack does not work on a sharded model (FSDP shards each block's tensors, "
                           "packed ones would belong to the root); leave it unpacked (the Lightning modules do)")
    slice_names = {id(ad): f"{name}.doran.{key}" for name, layer in adapted_modules(model)
                   for key, ad in layer.doran.items()}  # module paths: the state-dict names
    groups = group_entries(bank_entries(model))
    # where each tensor is used: only tensors used within one group are packed
    users: dict[int, set[int]] = {}
    for gi, group in enumerate(groups):
        for _, ad in group:
            for _, p in ad.named_parameters(remove_duplicate=False):
                users.setdefault(id(p), set()).add(gi)
    banked = {id(ad) for group in groups for _, ad in group}
    for _, ad, _ in slice_adapters(model):  # and tensors of slices outside the bank
        if id(ad) not in banked:
            for p in ad.parameters():
                users.setdefault(id(p), set()).add(-1)
    plan = []
    for gi, group in enumerate(groups):
        roles = {}
        for role, items in _group_tensors(group, slice_names).items():
            distinct: list[torch.Tensor] = []
            names: list[list[str]] = []  # per distinct tensor, every name it has in the state dict
            index = []
            for p, name in items:
                pos = next((j for j, q in enumerate(distinct) if q is p), None)
                if pos is None:
                    pos = len(distinct)
                    distinct.append(p)
                    names.append([])
                names[pos].append(name)
                index.append(pos)
            if any(users[id(p)] != {gi} for p in distinct) or len({p.requires_grad for p in distinct}) > 1 or \
                    len({(p.shape, p.dtype, p.device) for p in distinct}) > 1:
                continue
            roles[role] = (distinct, names, tuple(index))
        plan.append(roles)
    if not any(plan):
        return None

    store = PackedStore()
    for gi, (group, roles) in enumerate(zip(groups, plan)):
        entry: dict[str, Role] = {}
        for role, (distinct, names, index) in roles.items():
            key = f"g{gi}_{role.replace('.', '_')}"
            flag = distinct[0].requires_grad
            store.register_parameter(key, nn.Parameter(torch.stack([p.detach() for p in distinct]),
                                                       requires_grad=flag))
            store.names[key] = names
            store.kinds[key] = role
            entry[role] = Role(key, index)
        store.groups.append(PackedGroup([ad for _, ad in group], entry))
    # commit: every packed tensor leaves its module, which reads it from the store from now on
    model.add_module(ATTR, store)
    for slices, roles in store.groups:
        for role, (key, index) in roles.items():
            done: set[int] = set()
            for ad, pos in zip(slices, index):
                if pos in done:
                    continue
                done.add(pos)
                owner, attr = _owner(ad, role)
                del owner._parameters[attr]
                refs = owner.__dict__.setdefault(REFS, {})
                refs[attr] = Ref(store, key, pos)
                base = getattr(type(owner), "_doran_unpacked_class", type(owner))
                owner.__class__ = _packed_class(base, tuple(sorted(refs)))
    _hook(model)
    bank.forget(model)
    return store


def unpack(model: nn.Module) -> None:
    """Give every packed tensor back to its module as an ``nn.Parameter`` holding its current value (the
    inverse of :func:`pack`; ``eject`` calls it). Build the optimizer again afterwards.

    Example::

        doran.unpack(model)
        opt = torch.optim.AdamW(doran.param_groups(model, lr=1e-3))
    """
    store = store_of(model)
    if store is None:
        return
    for slices, roles in store.groups:
        for role, (key, index) in roles.items():
            P = store._parameters[key]
            for ad, pos in zip(slices, index):
                owner, attr = _owner(ad, role)
                refs = owner.__dict__.get(REFS)
                if not refs or attr not in refs:
                    continue  # shared: given back at its first slice
                del refs[attr]
                base = owner.__class__._doran_unpacked_class
                owner.__class__ = _packed_class(base, tuple(sorted(refs))) if refs else base
                if not refs:
                    del owner.__dict__[REFS]
                owner.register_parameter(attr, nn.Parameter(P.detach()[pos].clone(), requires_grad=P.requires_grad))
    del model._modules[ATTR]
    bank.forget(model)


# ------------------------------------------------------------------------------ state-dict names
def _save_hook(module: nn.Module, state_dict: dict, prefix: str, local_metadata: Any) -> None:
    store = store_of(module)
    if store is None:
        return
    for key in store._parameters:
        P = state_dict.pop(f"{prefix}{ATTR}.{key}", None)
        if P is None:
            continue
        for i, names in enumerate(store.names[key]):
            for name in names:
                state_dict[prefix + name] = P[i]


def _load_hook(module: nn.Module, state_dict: dict, prefix: str, local_metadata: Any, strict: bool,
               missing_keys: list, unexpected_keys: list, error_msgs: list) -> None:
    store = store_of(module)
    if store is None:
        return
    for key in store._parameters:
        rows = [[prefix + n for n in names] for names in store.names[key]]
        if f"{prefix}{ATTR}.{key}" in state_dict or not all(names[0] in state_dict for names in rows):
            continue  # written packed, or a row missing: load_state_dict reports the packed key missing
        state_dict[f"{prefix}{ATTR}.{key}"] = torch.stack([state_dict[names[0]] for names in rows])
        for names in rows:
            for name in names:
                state_dict.pop(name, None)


def _hook(model: nn.Module) -> None:
    if not getattr(model, "_doran_packed_hooks", False):
        model.register_state_dict_post_hook(_save_hook)
        model.register_load_state_dict_pre_hook(_load_hook)
        object.__setattr__(model, "_doran_packed_hooks", True)
