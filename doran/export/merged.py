"""Any method merged into the base weights, loadable without doran (``export_merged``)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

import doran

from .common import MERGED_NOTE, ExportError, _check_out_dir, _Staging


def _is_transformers(model: nn.Module) -> bool:
    return hasattr(model, "save_pretrained") and hasattr(model, "config")


def _is_timm(model: nn.Module) -> bool:
    return type(model).__module__.startswith("timm.") or hasattr(model, "pretrained_cfg")


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


def _timm_config(
    model: nn.Module, plain: nn.Module, architecture: str | None, kwargs: dict[str, Any] | None
) -> dict[str, Any]:
    """timm's config.json (architecture, model_args, pretrained_cfg) for ``plain``, checked by a rebuild."""
    import timm
    import timm.models

    pcfg = dict(getattr(model, "pretrained_cfg", None) or {})
    architecture = architecture or pcfg.get("architecture")
    if not architecture:
        raise ExportError(
            "cannot tell the timm architecture of this model; pass timm_architecture= (the name "
            "given to timm.create_model)"
        )
    if kwargs is None:
        if not hasattr(timm.models, "get_model_args"):
            raise ExportError(
                "this timm version does not record the arguments a model was built with; pass "
                "timm_kwargs= (those given to timm.create_model)"
            )
        kwargs = timm.models.get_model_args(model)
    kwargs = {k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()}
    if not _jsonable(kwargs):
        raise ExportError(f"the timm arguments {kwargs} are not JSON; pass timm_kwargs= with plain values")
    want = {k: tuple(v.shape) for k, v in plain.state_dict().items()}
    try:
        with torch.device("meta"):
            rebuilt = timm.create_model(architecture, pretrained=False, **kwargs)
    except Exception as err:  # timm raises TypeError / RuntimeError / AssertionError for bad arguments
        raise ExportError(
            f"timm.create_model({architecture!r}, **{kwargs}) fails ({err}); pass the "
            "timm_architecture= and timm_kwargs= the model was built with"
        ) from err
    got = {k: tuple(v.shape) for k, v in rebuilt.state_dict().items()}
    if got != want:
        diff = sorted(set(got.items()) ^ set(want.items()))[:4]
        raise ExportError(
            f"timm.create_model({architecture!r}, **{kwargs}) does not rebuild this model (first "
            f"differences: {diff}); pass the timm_kwargs= it was built with"
        )
    drop = {"url", "hf_hub_id", "hf_hub_filename", "file", "source", "state_dict", "tag"}
    pretrained_cfg = {k: v for k, v in pcfg.items() if k not in drop and _jsonable(v)}
    pretrained_cfg["architecture"] = architecture
    if "num_classes" in kwargs:
        pretrained_cfg["num_classes"] = kwargs["num_classes"]
    config = {"architecture": architecture, "model_args": kwargs, "pretrained_cfg": pretrained_cfg}
    if "num_classes" in kwargs:
        config["num_classes"] = kwargs["num_classes"]
    return config


def export_merged(
    model: nn.Module,
    out_dir: str | os.PathLike,
    *,
    timm_architecture: str | None = None,
    timm_kwargs: dict[str, Any] | None = None,
) -> Path:
    """Write the model with every adapter merged into its weights, loadable without doran; returns the folder.

    Any method (LoRA, DoRA, DoRAN, RepLoRA, HoRA, Pre-Diag, SORA). The folder holds, for a transformers
    model, its ``save_pretrained`` output (load with ``AutoModel...from_pretrained``); for a timm model,
    ``model.safetensors`` and timm's ``config.json`` naming the architecture and the ``model_args`` to rebuild
    it (checked here by rebuilding; give ``timm_kwargs`` if this timm does not record them); for any other
    module, ``model.safetensors`` (a state dict for the same class). ``doran_export.json`` says what was
    merged. The merged weights are ``doran.merged_copy(model)``'s.

    Example::

        export_merged(model, "out/merged")                       # transformers
        # without doran:
        AutoModelForSequenceClassification.from_pretrained("out/merged")

        export_merged(vit, "out/vit", timm_kwargs=dict(num_classes=10))   # timm
        # without doran:
        timm.create_model("local-dir:out/vit", pretrained=True)
    """
    out = _check_out_dir(out_dir)
    if not isinstance(model, nn.Module) or not doran.is_injected(model):
        raise ExportError(
            "the model has no doran adapters, so there is nothing to merge; save it with its own "
            "save_pretrained / torch.save"
        )
    cfg = doran.get_config(model)
    plain = doran.merged_copy(model).eval()
    if _is_transformers(plain):
        kind = "transformers"
        timm_config = None
    elif _is_timm(plain):
        kind = "timm"
        timm_config = _timm_config(model, plain, timm_architecture, timm_kwargs)
    else:
        kind = "torch"
        timm_config = None
    note = {
        "format": "doran-merged/1",
        "kind": kind,
        "method": cfg.method,
        "config": cfg.to_dict(),
        "model_class": f"{type(model).__module__}.{type(model).__name__}",
    }
    with _Staging(out) as tmp:
        if kind == "transformers":
            plain.save_pretrained(str(tmp))
        else:
            state = {k: v.detach().to("cpu").clone().contiguous() for k, v in plain.state_dict().items()}
            save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
            if timm_config is not None:
                (tmp / "config.json").write_text(json.dumps(timm_config, indent=2) + "\n")
        (tmp / MERGED_NOTE).write_text(json.dumps(note, indent=2, sort_keys=True) + "\n")
    return out


# ============================================================================================== import
