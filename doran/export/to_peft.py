"""LoRA and DoRA adapters as PEFT adapter folders (``export_peft``)."""

from __future__ import annotations

import json
import os
import re
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

import doran

from .common import PEFT_PREFIX, PEFT_CONFIG, PEFT_WEIGHTS, EXPORT_FORMAT, ExportError, ExportWarning, method_name, check_peft_form, _training_notes, _Proj, _from_model, _from_file, _check_out_dir, _Staging, _number


def _peft_tensors(proj: _Proj, cfg: doran.AdapterConfig) -> tuple[dict[str, torch.Tensor], int]:
    """PEFT's lora_A / lora_B / magnitude of one module, and its rank."""
    if not proj.partial:
        A, B = proj.A["all"], proj.B["all"]
        m = proj.m.get("all")
    else:  # fused qkv: A = [A_q; A_v], B block-diagonal with zero rows outside the slices
        r, keys = cfg.r, list(proj.slices)
        A = torch.cat([proj.A[k] for k in keys])  # (n r, in)
        B = torch.zeros(proj.shape[0], r * len(keys), dtype=proj.B[keys[0]].dtype)
        for i, k in enumerate(keys):
            a, b = proj.slices[k]
            B[a:b, i * r : (i + 1) * r] = proj.B[k]
        m = None
        if cfg.magnitude:
            dtype = proj.m[keys[0]].dtype
            if not proj.uncovered:
                m = torch.empty(proj.shape[0], dtype=dtype)
            elif proj.weight is None:
                raise ExportError(
                    f"DoRA on part of the rows of {proj.name} needs the base weights; pass base_model="
                )
            else:  # rows outside the slices: m = ||W0_row||, so PEFT's m / ||W0_row + 0|| is 1 there
                m = torch.linalg.norm(proj.weight.to(dtype), dim=1)
            for k in keys:
                a, b = proj.slices[k]
                m[a:b] = proj.m[k]
    out = {
        f"{PEFT_PREFIX}{proj.name}.lora_A.weight": A.contiguous(),
        f"{PEFT_PREFIX}{proj.name}.lora_B.weight": B.contiguous(),
    }
    if m is not None:
        out[f"{PEFT_PREFIX}{proj.name}.lora_magnitude_vector"] = m.contiguous()
    return out, A.shape[0]


def export_peft(
    model_or_adapter_file: nn.Module | str | os.PathLike,
    out_dir: str | os.PathLike,
    base_model: nn.Module | None = None,
    *,
    base_model_name_or_path: str | None = None,
) -> Path:
    """Write a LoRA or DoRA adapter as a PEFT adapter folder; returns the folder.

    ``model_or_adapter_file``: a model with doran adapters, or a file written by ``doran.save_adapter``.
    For a file, ``base_model`` (the plain base it was trained on) is optional for LoRA and DoRA on whole
    Linears, and needed for DoRA on a fused ``qkv`` (the k rows' magnitude is their base norm); given, it is
    checked against the file. Other trainable modules (a classifier head) become PEFT's ``modules_to_save``.
    Raises :class:`ExportError` for a method with no PEFT form (DoRAN, RepLoRA, HoRA, Pre-Diag, SORA) or a
    non-empty ``out_dir``; warns with :class:`ExportWarning` of what differs only in continued training.

    Example::

        export_peft(model, "out/peft")
        # without doran:
        from peft import PeftModel
        peft_model = PeftModel.from_pretrained(base, "out/peft")
    """
    out = _check_out_dir(out_dir)
    if isinstance(model_or_adapter_file, nn.Module):
        if base_model is not None:
            raise ExportError(
                "base_model is for an adapter file; a model with adapters already holds its base"
            )
        if doran.is_injected(model_or_adapter_file):
            check_peft_form(doran.get_config(model_or_adapter_file))
        adapter = _from_model(model_or_adapter_file)
    else:
        adapter = _from_file(model_or_adapter_file, base_model)
    cfg = adapter.cfg

    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, tuple[int, float]] = {}
    for proj in adapter.projs:
        part, rank = _peft_tensors(proj, cfg)
        tensors.update(part)
        ranks[proj.name] = (rank, cfg.alpha * rank / cfg.r)  # same scale alpha / r for every module
    for owner, values in adapter.extra.items():
        for local, t in values.items():
            tensors[f"{PEFT_PREFIX}{owner}.{local}"] = t.contiguous()
    (r_all, alpha_all), _ = Counter(ranks.values()).most_common(1)[0]
    other = {n: v for n, v in ranks.items() if v != (r_all, alpha_all)}
    config: dict[str, Any] = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "inference_mode": True,
        "r": r_all,
        "lora_alpha": _number(alpha_all),
        "lora_dropout": cfg.dropout,
        "target_modules": [p.name for p in adapter.projs],
        "exclude_modules": None,
        "fan_in_fan_out": False,
        "bias": "none",
        "lora_bias": False,
        "use_rslora": False,
        "use_dora": cfg.magnitude,
        "init_lora_weights": True,
        "modules_to_save": list(adapter.extra) or None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {re.escape(n): r for n, (r, _) in other.items()},
        "alpha_pattern": {re.escape(n): _number(a) for n, (_, a) in other.items()},
    }
    if adapter.model_class is not None:
        config["auto_mapping"] = {
            "base_model_class": adapter.model_class[0],
            "parent_library": adapter.model_class[1],
        }
    fused = any(p.partial for p in adapter.projs)
    notes = _training_notes(cfg, fused)
    metadata = {
        "format": "pt",
        "doran_format": EXPORT_FORMAT,
        "doran_config": cfg.to_json(),
        "doran_layout": json.dumps(
            {p.name: {k: list(v) for k, v in p.slices.items()} for p in adapter.projs}
        ),
        "doran_notes": json.dumps(notes),
    }
    with _Staging(out) as tmp:
        save_file(tensors, str(tmp / PEFT_WEIGHTS), metadata=metadata)
        (tmp / PEFT_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    for note in notes:
        warnings.warn(
            f"{method_name(cfg)} exported to PEFT with equal outputs, but {note}", ExportWarning, stacklevel=2
        )
    return out


# ============================================================================================== merged
