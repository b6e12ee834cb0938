"""How the Lightning modules run the adapted model: eager, or whole-model ``torch.compile``.

``compile`` (a hyper-parameter of ``AdapterClassifier`` and ``CausalLMModule``):

``"auto"`` (default)   ``"reduce-overhead"`` on a CUDA device, ``"none"`` elsewhere and under a sharding
                       strategy (FSDP). On a GPU the eager step is bound by the host launching kernels one at
                       a time (docs/performance.md); compiled, DoRAN's small ops are fused (doran/fast/fused.py's
                       autograd nodes and the adapter bank are traced, as one graph: ``compile_model``) and
                       CUDA graphs replay forward and backward in one launch each.
``"none"``             eager, the fused path and the adapter bank.
``"default"``          ``torch.compile`` with Inductor, no CUDA graphs.
``"reduce-overhead"``  Inductor plus CUDA graphs.
``"aot_eager"``        the compiler's tracing without code generation (debugging; tests on a machine
                       without a C compiler).

CUDA graphs are recorded per input shape, so under ``"reduce-overhead"`` token batches are padded on the
right to a multiple of ``TOKEN_MULTIPLE`` (attention mask 0, label -100: the loss and the logits of the
real tokens do not change), which bounds the number of shapes to ``max_length / TOKEN_MULTIPLE``. The
first steps of each shape and of each mode (training, evaluation) pay the compilation (tens of seconds).

On a GPU the modules step ``doran.fast.optim.FusedAdamW`` (``doran.fast.optim.adamw``), whatever the compile
mode: torch's fused AdamW without its per-tensor host work, which the compiled step cannot hide.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from .bank import sync_stats

COMPILE_MODES = ("auto", "none", "default", "reduce-overhead", "aot_eager")
TOKEN_MULTIPLE = 64


def check_compile(mode: str) -> str:
    """``mode`` if it is one of ``COMPILE_MODES``; else ``ValueError`` naming them."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"unknown compile mode {mode!r}; choose one of {COMPILE_MODES} (\"none\" runs eager)")
    return mode


def resolve_compile(mode: str, device_type: str, sharded: bool = False) -> str:
    """The mode ``"auto"`` stands for on this device: reduce-overhead on CUDA, none on CPU or when sharded."""
    check_compile(mode)
    if mode != "auto":
        return mode
    return "reduce-overhead" if device_type == "cuda" and not sharded else "none"


class WholeCall(nn.Module):
    """Calls ``model``; compiled, its forward hooks and its forward are traced as one frame.

    ``torch.compile(model)`` runs a module's hooks outside the compiled frame and compiles each hook as a
    frame of its own: the adapter bank's pre-hook (doran/fast/bank.py) becomes a first graph whose factors and row
    scales (3 tensors per slice) cross into the forward's graph as outputs and inputs, with a second
    CUDA-graph replay and the outputs rebuilt on the host each step. Compiling this wrapper traces the call
    of ``model`` inside one frame, hooks included: one graph."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)


class CompiledModel(nn.Module):
    """What ``compile_model`` returns: per call, eagerly, the adapter bank's copies of the frozen weights' row
    norms brought up to date (``doran.fast.bank.sync_stats``: a version check per weight, a recomputation
    only when one changed), then the compiled ``WholeCall``. The graph reads those copies instead of
    computing ``||W0||_row`` from every frozen W0 each step (a read of every frozen weight saved per step).
    The compiled call is not a registered submodule: the state dict is the model's, under the name
    ``model``."""

    def __init__(self, model: nn.Module, **compile_kwargs: Any) -> None:
        super().__init__()
        self.model = model
        object.__setattr__(self, "compiled", torch.compile(WholeCall(model), **compile_kwargs))
        self.compiled_ok: bool | None = None  # None until the first call: True once a compiled call returned
        self.fallback: str | None = None  # why the model runs eager after all, if it does

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        sync_stats(self.model)
        if self.compiled_ok is False:
            return self.model(*args, **kwargs)
        try:
            out = self.compiled(*args, **kwargs)
        except torch.OutOfMemoryError:
            raise
        except Exception as err:  # tracing failed (a torch version's compiler cannot handle a construct)
            # The first call, or a later one that needs a new graph (evaluation under no_grad, a new shape):
            # tracing fails before the new graph runs, and the forward changes no state, so the same call
            # eager gives the same values. Say so loudly, never silently; an error of the call itself comes
            # back from the eager call.
            first = "the first call" if self.compiled_ok is None else "a later call (a new graph)"
            self.fallback = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            warnings.warn(f"torch.compile failed on {first} ({self.fallback}); running eager from now on",
                          RuntimeWarning, stacklevel=2)
            object.__setattr__(self, "compiled", self.model)
            torch._dynamo.reset()
            self.compiled_ok = False
            return self.model(*args, **kwargs)
        self.compiled_ok = True
        return out


def compile_model(model: nn.Module, mode: str = "auto") -> nn.Module:
    """``model`` itself for ``"none"``, else a ``CompiledModel``: it shares ``model``'s parameters and traces
    its hooks and forward as one graph (``WholeCall``); ``mode`` is one of ``COMPILE_MODES``, ``"auto"``
    resolved on the device of the model's parameters (CUDA graphs on a GPU, eager on a CPU). Use this
    rather than ``torch.compile(model)`` on an injected model (doran/fast/bank.py).

    Example::

        run = doran.compile_model(model, "default")   # shares model's parameters
        loss = run(x).sum()
    """
    if mode == "auto":
        param = next(model.parameters(), None)
        mode = resolve_compile(mode, param.device.type if param is not None else "cpu")
    check_compile(mode)
    if mode == "none":
        return model
    if mode == "aot_eager":
        return CompiledModel(model, backend="aot_eager")
    return CompiledModel(model, mode=None if mode == "default" else mode)


def pad_tokens(batch: dict[str, Any], multiple: int = TOKEN_MULTIPLE, pad_id: int = 0) -> dict[str, Any]:
    """Right-pad ``input_ids`` / ``attention_mask`` / ``token_type_ids`` (and token ``labels`` with -100) to a multiple of
    ``multiple`` positions; other entries are returned as they are."""
    ids = batch["input_ids"]
    extra = (-ids.shape[1]) % multiple
    if extra == 0:
        return batch
    out = dict(batch)
    out["input_ids"] = nn.functional.pad(ids, (0, extra), value=pad_id)
    out["attention_mask"] = nn.functional.pad(batch["attention_mask"], (0, extra), value=0)
    if "token_type_ids" in batch:  # sentence pairs
        out["token_type_ids"] = nn.functional.pad(batch["token_type_ids"], (0, extra), value=0)
    labels = batch.get("labels")
    if labels is not None and labels.shape == ids.shape:  # token labels (causal LM); class labels stay
        out["labels"] = nn.functional.pad(labels, (0, extra), value=-100)
    return out


class CompiledRunner:
    """The model as the Lightning module runs it, built on first use (when the device is known).

    Kept in a tuple by the modules so that the compiled wrapper is not registered as a submodule (the
    checkpoints hold the adapter of ``module.model`` under its own names)."""

    def __init__(self, model: nn.Module, mode: str, device_type: str, sharded: bool = False) -> None:
        self.device_type = device_type
        self.mode = resolve_compile(mode, device_type, sharded)
        self.model = compile_model(model, self.mode)

    def prepare(self, batch: dict[str, Any], pad_id: int = 0) -> dict[str, Any]:
        if self.mode == "reduce-overhead" and "input_ids" in batch:
            return pad_tokens(batch, TOKEN_MULTIPLE, pad_id)
        return batch
