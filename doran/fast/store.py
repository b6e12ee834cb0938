"""Where a packed model keeps its adapter tensors, and how the rest of doran reads them.

``doran.pack`` (doran/fast/packing.py) moves the tensors of each adapter-bank group into one
:class:`PackedStore`, a submodule of the model (``model.doran_packed``); the modules that owned them read
rows of it. This module holds the store and its readers: the bank takes a group's tensors as stored
(``group_roles``, ``stacked``); the parameter queries of doran/inject.py and the merged-layer check of
doran/layers.py see the rows under their unpacked names (``named_views``, ``adapter_tensors``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from ..inject import RowView

ATTR = "doran_packed"
REFS = "_doran_packed_refs"  # on a module whose tensors are packed: {attribute: Ref}


class Role(NamedTuple):
    """Where one role of a packed group lives: the store's parameter ``key`` and, per slice, its row."""

    key: str
    index: tuple[int, ...]


class PackedGroup(NamedTuple):
    """One packed bank group: its SliceAdapters in the bank's order and, per role (the tensor's name inside a
    SliceAdapter, e.g. ``generator.first_A.linear.weight``), where it is stored."""

    slices: list[nn.Module]
    roles: dict[str, Role]


class Ref(NamedTuple):
    """A packed attribute of a module: row ``index`` of the parameter ``key`` of ``store``."""

    store: PackedStore
    key: str
    index: int


class GroupStorage(NamedTuple):
    """A bank group's packed storage: the store and the group's roles in it."""

    store: PackedStore
    roles: dict[str, Role]


class PackedStore(nn.Module):
    """The packed tensors of a model (``model.doran_packed``): one parameter per group and kind.

    ``groups`` lists the packed groups; ``names`` lists, per key, the model-relative names of its rows (the
    unpacked state-dict names)."""

    def __init__(self) -> None:
        super().__init__()
        self.groups: list[PackedGroup] = []
        self.names: dict[str, list[list[str]]] = {}  # key -> per row, its names (a shared tensor has several)
        self.kinds: dict[str, str] = {}  # key -> the role it packs (its last name part tells the group)


def store_of(model: nn.Module) -> PackedStore | None:
    """The model's packed store, or None when it is not packed."""
    store = model._modules.get(ATTR)
    return store if isinstance(store, PackedStore) else None


def is_packed(model: nn.Module) -> bool:
    """Whether ``doran.pack`` packed this model's adapter tensors.

    Example::

        doran.pack(model)
        assert doran.is_packed(model)
    """
    return store_of(model) is not None


def drop_store(model: nn.Module) -> None:
    """Remove the packed store from a model without giving its tensors back (a merged copy needs none)."""
    model._modules.pop(ATTR, None)


def group_roles(ads: list[nn.Module], model: nn.Module | None) -> GroupStorage | None:
    """The storage of ``ads`` (a bank group, in order) when it is exactly one packed group, else None."""
    store = store_of(model) if model is not None else None
    if store is None:
        return None
    for slices, roles in store.groups:
        if len(slices) == len(ads) and all(a is b for a, b in zip(slices, ads)):
            return GroupStorage(store, roles)
    return None


def stacked(store: PackedStore, roles: dict[str, Role], role: str) -> torch.Tensor | None:
    """The (S, ...) stack of ``role`` over a packed group's slices: the packed tensor itself, or (a tensor
    shared by runs of consecutive slices) expanded; None when the role is not packed."""
    if role not in roles:
        return None
    key, index = roles[role]
    P = getattr(store, key)
    n = len(index)
    if index == tuple(range(n)):
        return P
    k = n // P.shape[0]
    if P.shape[0] * k == n and index == tuple(i // k for i in range(n)):
        return P.unsqueeze(1).expand(P.shape[0], k, *P.shape[1:]).reshape(n, *P.shape[1:])
    return P[list(index)]


def packed_roles(module: nn.Module) -> dict[str, Ref]:
    """``{attribute: Ref}`` of a module's packed tensors (empty when none)."""
    return module.__dict__.get(REFS, {})


def adapter_tensors(ad: nn.Module) -> list[torch.Tensor]:
    """Every tensor of a SliceAdapter, packed ones as their views (each shared one once)."""
    out: list[torch.Tensor] = list(ad.parameters())
    seen: set[tuple[int, str, int]] = set()
    for module in ad.modules():
        for store, key, index in packed_roles(module).values():
            if (id(store), key, index) not in seen:
                seen.add((id(store), key, index))
                out.append(store._parameters[key][index])
    return out


def named_views(model: nn.Module) -> dict[int, list[RowView]]:
    """Per packed tensor (by id): its rows as ``RowView(unpacked name, view, role)``."""
    store = store_of(model)
    if store is None:
        return {}
    return {id(P): [RowView(names[0], P[i], store.kinds[key]) for i, names in enumerate(store.names[key])]
            for key, P in store._parameters.items()}


def trainable_names(model: nn.Module) -> list[str]:
    """The state-dict names of ``model``'s trainable tensors, packed ones by their unpacked names (a shared
    tensor by its first name, as ``named_parameters`` lists it): what an adapter-only checkpoint holds.

    Example::

        keys = trainable_names(model)   # what save_adapter writes, under the names of the unpacked model
    """
    views = named_views(model)
    out = []
    for name, p in model.named_parameters():
        if p.requires_grad:
            out.extend([row_name for row_name, _, _ in views[id(p)]] if id(p) in views else [name])
    return out
