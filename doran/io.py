"""Adapter-only checkpoints: every trainable tensor of an adapted model plus its config, in safetensors.

The file's metadata holds the ``AdapterConfig`` (JSON), the ``trainable`` patterns given to ``inject`` and
the shape of every adapted module, so that ``load_adapter`` can inject a fresh base model itself and refuse
a file saved for other shapes or another config before it changes anything.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .config import AdapterConfig
from .errors import AdapterFileError as AdapterFileError  # importable from here as before
from .errors import DoranError
from .inject import STATE_ATTR, _state, adapted_modules, eject, inject, named_adapter_parameters

FORMAT = "doran-adapter/1"


def save_adapter(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write the adapter tensors (and other trainable tensors, e.g. a head) and the config, atomically.

    Example::

        doran.save_adapter(model, "adapter.safetensors")
    """
    state = _state(model)
    if any(m.merged for _, m in adapted_modules(model)):
        raise AdapterFileError("the model is merged; call doran.unmerge(model) before save_adapter")
    tensors = {name: p.detach().cpu().clone() for name, p, _ in named_adapter_parameters(model)}  # packed rows: own storage
    metadata = {
        "format": FORMAT,
        "config": state["config"].to_json(),
        "trainable": json.dumps(list(state["trainable"])),
        "targets": json.dumps(state["targets"], sort_keys=True),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def read_adapter(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], AdapterConfig, dict]:
    """(tensors, config, metadata) of an adapter file; raises :class:`AdapterFileError` if unreadable.

    Example::

        tensors, cfg, meta = doran.read_adapter("adapter.safetensors")
    """
    path = Path(path)
    if not path.is_file():
        raise AdapterFileError(f"no adapter file at {path}; save one with doran.save_adapter(model, path)")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is no dict)
    except Exception as err:  # safetensors raises several types for a damaged header or body
        raise AdapterFileError(f"{path} is not a readable safetensors adapter file ({err}); the file is "
                               "corrupt or truncated: save it again with doran.save_adapter") from err
    if metadata.get("format") != FORMAT:
        raise AdapterFileError(f"{path} is not a doran adapter (format {metadata.get('format')!r}, expected "
                               f"{FORMAT!r})")
    try:
        cfg = AdapterConfig.from_dict(json.loads(metadata["config"]))
        metadata = {**metadata, "trainable": json.loads(metadata["trainable"]),
                    "targets": json.loads(metadata["targets"])}
    except (KeyError, ValueError, TypeError) as err:
        raise AdapterFileError(f"{path} has damaged doran metadata ({err}); save it again") from err
    return tensors, cfg, metadata


def load_adapter(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load an adapter file into ``model``; a model without adapters is injected with the file's config.

    Everything is checked before anything is changed: a file saved for other shapes, another config or
    other targets raises :class:`AdapterFileError` and leaves the model as it was.

    Example::

        model = build_base_model()
        doran.load_adapter(model, "adapter.safetensors")   # injects, then loads
    """
    tensors, cfg, meta = read_adapter(path)
    injected = hasattr(model, STATE_ATTR)
    if injected:
        state = _state(model)
        if state["config"] != cfg:
            mine, theirs = state["config"].to_dict(), cfg.to_dict()
            diff = {k: (theirs[k], mine[k]) for k in mine if mine[k] != theirs[k]}
            raise AdapterFileError(f"{path} was saved with another config; differing fields (file, model): "
                                   f"{diff}. Load it into a base model without adapters instead")
        if state["targets"] != meta["targets"]:
            raise AdapterFileError(f"{path} was saved for other adapted modules or shapes than this model's; "
                                   "load it into the model it was trained on")
        if any(m.merged for _, m in adapted_modules(model)):
            raise AdapterFileError("the model is merged; call doran.unmerge(model) before load_adapter")
    else:
        for name, info in meta["targets"].items():
            try:
                module = model.get_submodule(name)
            except AttributeError:
                raise AdapterFileError(f"{path} adapts module {name}, which this model does not have; load it "
                                       "into the architecture it was trained on") from None
            shape = list(getattr(module, "weight", torch.empty(0)).shape)
            if not isinstance(module, nn.Linear) or shape != info["shape"]:
                raise AdapterFileError(f"{path} was saved for {name} of shape {info['shape']}, but this model's "
                                       f"{name} is {type(module).__name__} of shape {shape}")
    if not injected:
        flags = [(p, p.requires_grad) for p in model.parameters()]
        try:
            inject(model, cfg, trainable=tuple(meta["trainable"]))
        except DoranError as err:
            raise AdapterFileError(f"{path} cannot be injected into this model: {err}") from err
        try:
            if _state(model)["targets"] != meta["targets"]:
                raise AdapterFileError(f"{path} adapts other modules than its config selects in this model")
            params = _check_tensors(model, tensors, path)
        except AdapterFileError:
            eject(model)
            for p, flag in flags:
                p.requires_grad_(flag)
            raise
    else:
        params = _check_tensors(model, tensors, path)
    with torch.no_grad():
        for name, t in tensors.items():
            params[name].copy_(t.to(device=params[name].device, dtype=params[name].dtype))
    return model


def _check_tensors(model: nn.Module, tensors: dict[str, torch.Tensor], path) -> dict[str, nn.Parameter]:
    params = {name: p for name, p, _ in named_adapter_parameters(model)}
    missing = sorted(set(params) - set(tensors))
    unexpected = sorted(set(tensors) - set(params))
    if missing or unexpected:
        raise AdapterFileError(f"{path} does not fit this model: missing tensors {missing[:5]}, unexpected "
                               f"tensors {unexpected[:5]}")
    for name, t in tensors.items():
        if tuple(t.shape) != tuple(params[name].shape):
            raise AdapterFileError(f"{path}: tensor {name} has shape {tuple(t.shape)}, the model expects "
                                   f"{tuple(params[name].shape)}")
        if not torch.isfinite(t).all():
            raise AdapterFileError(f"{path}: tensor {name} holds NaN or inf; the run that saved it diverged")
    return params
