"""The fast path: the same adapted layers as doran/layers.py, with fewer kernels and host operations.

The maths (``doran.config``, ``doran.norm``, ``doran.generators``, ``doran.layers``, ``doran.targets``,
``doran.inject``, ``doran.io``) never imports this package; this package imports the maths. The maths
offers two plugs, which importing this package fills (``import doran`` does it, so users see one library):

- ``doran.layers.use_fast_path(FastPath(...))``: ``AdaptedLinear.forward`` takes ``FastPath.forward`` for
  the layers it ``serves`` while the execution settings say so (``doran.settings``: ``path``, and
  ``compiled`` inside torch.compile). ``SliceAdapter.scale_vector`` computes g with ``FastPath.row_scale``,
  and the merged-layer check reads a slice's tensors with ``FastPath.tensors`` (packed ones included).
  Without a fast path every layer runs the reference forward.
- ``doran.inject.HOOKS``: lists of functions that ``inject``, ``merge``/``unmerge``, ``eject`` and
  ``merged_copy`` call at each change of a model (the adapter bank is attached, rebuilt, detached; packed
  storage is given back or dropped), and the source of the rows of packed tensors that the parameter
  queries list under their unpacked names.

A plug is a module-level value the maths reads at call time, the same lookups the direct calls did, so
behaviour and speed are those of the direct calls.

Modules, each importing only those above it:

``slices``     how a layer's slices lie in its rows; which layers the fused path computes (``fusable``)
``ops``        products with a frozen W0 in the adapter's precision; tree-shaped stacks for the compiler
``rowscale``   g = m / (||W0 + s B A||_row + tau) as one autograd node, per slice or per bank group
``store``      packed storage (``model.doran_packed``) and its readers
``groups``     which slices the bank computes together
``bank``       the adapter bank: every slice's factors and g, batched, once per forward
``fused``      the fused layer (``fused_forward``)
``packing``    ``pack`` / ``unpack``
``compiling``  ``compile_model`` and how the Lightning modules run a model
``optim``      ``FusedAdamW`` and ``adamw``, the optimizer choice of the Lightning modules

Example::

    import doran
    doran.inject(model, doran.AdapterConfig.preset("doran", targets=("query", "value")))
    doran.pack(model)                          # doran.fast.packing.pack
    run = doran.compile_model(model)           # doran.fast.compiling.compile_model
"""

from __future__ import annotations

from ..inject import HOOKS
from ..layers import FastPath, use_fast_path
from . import bank, compiling, fused, groups, ops, optim, packing, rowscale, slices, store
from .compiling import CompiledModel, CompiledRunner, check_compile, compile_model, resolve_compile
from .fused import fused_forward
from .optim import FusedAdamW, adamw
from .packing import pack, unpack
from .store import is_packed

use_fast_path(FastPath(serves=slices.fusable, forward=fused_forward, row_scale=rowscale.row_scale,
                       tensors=store.adapter_tensors))
HOOKS.injected.append(bank.attach)  # the adapter bank's forward hooks
HOOKS.changed.append(bank.forget)  # merge / unmerge: the bank rebuilt
HOOKS.ejecting.append(packing.unpack)  # packed tensors given back before the base layers return
HOOKS.removed += [store.drop_store, bank.detach]
HOOKS.views.append(store.named_views)  # packed rows under their unpacked names

__all__ = [
    "CompiledModel",
    "CompiledRunner",
    "FusedAdamW",
    "adamw",
    "bank",
    "check_compile",
    "compile_model",
    "compiling",
    "fused",
    "fused_forward",
    "groups",
    "is_packed",
    "ops",
    "optim",
    "pack",
    "packing",
    "resolve_compile",
    "rowscale",
    "slices",
    "store",
    "unpack",
]
