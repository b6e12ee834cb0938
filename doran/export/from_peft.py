"""PEFT LoRA / DoRA folders injected into a base model as doran adapters (``import_peft``)."""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

import doran

from .common import PEFT_PREFIX, PEFT_CONFIG, PEFT_WEIGHTS, PEFT_WEIGHTS_BIN, EXPORT_FORMAT, _PLAIN_INITS, ExportError, ExportWarning, peft_problems


def _read_peft_folder(peft_dir: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, str]]:
    cfg_path = peft_dir / PEFT_CONFIG
    if not cfg_path.is_file():
        raise ExportError(
            f"no {PEFT_CONFIG} in {peft_dir}; give a folder written by PEFT's save_pretrained or "
            "doran.export.export_peft"
        )
    try:
        config = json.loads(cfg_path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise ExportError(f"{cfg_path} is not valid JSON ({err}); the folder is damaged") from err
    meta: dict[str, str] = {}
    if (peft_dir / PEFT_WEIGHTS).is_file():
        try:
            with safe_open(str(peft_dir / PEFT_WEIGHTS), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is no dict)
        except Exception as err:  # safetensors raises several types for a damaged header or body
            raise ExportError(
                f"{peft_dir / PEFT_WEIGHTS} is not a readable safetensors file ({err}); the folder is damaged"
            ) from err
    elif (peft_dir / PEFT_WEIGHTS_BIN).is_file():
        try:
            tensors = torch.load(peft_dir / PEFT_WEIGHTS_BIN, map_location="cpu", weights_only=True)
        except Exception as err:  # torch.load raises many types for a damaged pickle
            raise ExportError(f"{peft_dir / PEFT_WEIGHTS_BIN} cannot be read ({err})") from err
        if not isinstance(tensors, dict) or not all(isinstance(t, torch.Tensor) for t in tensors.values()):
            raise ExportError(f"{peft_dir / PEFT_WEIGHTS_BIN} is no state dict of tensors")
    else:
        raise ExportError(f"no {PEFT_WEIGHTS} (or {PEFT_WEIGHTS_BIN}) in {peft_dir}")
    return config, tensors, meta


def _check_peft_config(config: dict[str, Any], where: Path) -> None:
    if config.get("peft_type") != "LORA":
        raise ExportError(
            f"{where} holds a {config.get('peft_type')} adapter; doran imports PEFT's LORA "
            "(LoRA and DoRA) only"
        )
    refused = {
        "fan_in_fan_out": "the layers are transposed Conv1D (GPT-2 style); doran adapts nn.Linear only",
        "lora_bias": "B has a bias, which doran's LoRA has not",
        "use_qalora": "QALoRA pools the input, which doran does not",
        "use_bdlora": "block-diagonal LoRA is not doran's form",
        "layer_replication": "layer replication changes the model",
        "trainable_token_indices": "trainable tokens are no doran adapter",
        "target_parameters": "parameter targets (nn.Parameter LoRA) are no doran adapter",
        "alora_invocation_tokens": "activated LoRA depends on the input tokens",
        "megatron_config": "Megatron parallel layers are no nn.Linear",
    }
    for key, why in refused.items():
        if config.get(key):
            raise ExportError(f"{where}: {key}={config[key]!r} cannot be imported: {why}")
    if config.get("bias", "none") != "none":
        raise ExportError(
            f"{where}: bias={config['bias']!r} trains base biases, which the adapter file does "
            "not hold apart; only bias='none' is imported"
        )
    init = config.get("init_lora_weights", True)
    if init not in _PLAIN_INITS:
        raise ExportError(
            f"{where}: init_lora_weights={init!r} may rewrite the base weights at creation (PiSSA, OLoRA, "
            "LoftQ, CorDA, LoRA-GA ...), so the adapter would need that rewritten base; convert it to a "
            "plain LoRA with PEFT first (save_pretrained(..., path_initial_model_for_weight_conversion=...))"
        )


def _pattern_value(pattern: dict[str, Any], name: str, default: Any) -> Any:
    """PEFT's rank_pattern / alpha_pattern rule: the first key that re.match-es ``(.*\\.)?(key)$``."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _split_peft_keys(tensors: dict[str, torch.Tensor], where: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """({module: {"A", "B", "m"}}, {base-model key: tensor} of the other tensors)."""
    mods: dict[str, dict[str, torch.Tensor]] = {}
    rest = {}
    for key, t in tensors.items():
        if not key.startswith(PEFT_PREFIX):
            raise ExportError(
                f"{where}: tensor {key!r} does not start with {PEFT_PREFIX!r}; not a PEFT LoRA of "
                "a whole model"
            )
        key = key[len(PEFT_PREFIX) :]
        for suffix, part in (
            (".lora_A.weight", "A"),
            (".lora_B.weight", "B"),
            (".lora_magnitude_vector.weight", "m"),
            (".lora_magnitude_vector", "m"),
        ):
            if key.endswith(suffix):
                mods.setdefault(key[: -len(suffix)], {})[part] = t
                break
        else:
            if ".lora_" in key:
                raise ExportError(
                    f"{where}: tensor {key!r} is a PEFT LoRA part doran does not import (only "
                    "Linear lora_A, lora_B and lora_magnitude_vector)"
                )
            rest[key.replace(".modules_to_save.", ".").replace(".original_module.", ".")] = t
    for name, parts in mods.items():
        if "A" not in parts or "B" not in parts:
            raise ExportError(f"{where}: {name} has {sorted(parts)} but needs lora_A and lora_B")
    return mods, rest


def _restore_layout(meta: dict[str, str], mods: dict, use_dora: bool):
    """The doran config and slices of a folder written by export_peft, if its tensors still fit them."""
    if meta.get("doran_format") != EXPORT_FORMAT:
        return None
    try:
        cfg = doran.AdapterConfig.from_dict(json.loads(meta["doran_config"]))
        layout = {n: {k: tuple(v) for k, v in s.items()} for n, s in json.loads(meta["doran_layout"]).items()}
    except (KeyError, ValueError, TypeError):
        return None
    if set(layout) != set(mods) or cfg.magnitude != use_dora or peft_problems(cfg):
        return None
    parts = {}
    for name, slices in layout.items():
        A, B = mods[name]["A"], mods[name]["B"]
        keys, r = list(slices), cfg.r
        if A.shape[0] != r * len(keys) or B.shape[1] != r * len(keys):
            return None
        expected = torch.zeros_like(B)
        part = {"A": {}, "B": {}, "m": {}}
        for i, k in enumerate(keys):
            a, b = slices[k]
            part["A"][k] = A[i * r : (i + 1) * r]
            part["B"][k] = B[a:b, i * r : (i + 1) * r]
            expected[a:b, i * r : (i + 1) * r] = part["B"][k]
            if use_dora:
                part["m"][k] = mods[name]["m"][a:b]
        if not torch.equal(expected, B):  # trained further in PEFT: the k rows moved
            return None
        parts[name] = part
    return cfg, layout, parts


def import_peft(model: nn.Module, peft_dir: str | os.PathLike) -> nn.Module:
    """Inject a PEFT LoRA / DoRA adapter folder into ``model`` (a fresh base) as doran adapters; returns it.

    The outputs equal those of ``PeftModel.from_pretrained(base, peft_dir)``. A folder written by
    :func:`export_peft` comes back exactly (same config, fused-qkv slices, tensors bit for bit); any other
    becomes preset ``lora`` or ``dora`` on the modules it adapts (a fused ``qkv`` as one whole Linear), one
    rank for all (lower ranks padded with zero factors, which changes no output), PEFT's per-module scale
    (``alpha_pattern``, ``use_rslora``) folded into B where it differs from the common ``alpha / r``.
    ``modules_to_save`` become trainable modules. Everything is checked before the model changes.

    Example::

        base = AutoModelForSequenceClassification.from_pretrained("base")
        import_peft(base, "peft-adapter")
        doran.save_adapter(base, "adapter.safetensors")
    """
    where = Path(peft_dir)
    config, tensors, meta = _read_peft_folder(where)
    _check_peft_config(config, where)
    if not isinstance(model, nn.Module):
        raise ExportError(
            f"model must be a torch nn.Module (the plain base model), got {type(model).__name__}"
        )
    if doran.is_injected(model):
        raise ExportError("the model already has doran adapters; import into a fresh base model")
    use_dora = bool(config.get("use_dora", False))
    mods, rest = _split_peft_keys(tensors, where)
    if not mods:
        raise ExportError(f"{where} holds no lora_A / lora_B tensors")

    # ---- check every module against the model
    for name, parts in mods.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ExportError(
                f"{where} adapts {name}, which this model does not have; import into the base "
                "model it was trained on"
            ) from None
        A, B = parts["A"], parts["B"]
        if not isinstance(module, nn.Linear):
            raise ExportError(
                f"{where} adapts {name}, a {type(module).__name__}; doran adapts nn.Linear only"
            )
        if B.shape[0] != module.out_features or A.shape[1] != module.in_features or A.shape[0] != B.shape[1]:
            raise ExportError(
                f"{where}: the adapter of {name} is for a Linear of shape ({B.shape[0]}, "
                f"{A.shape[1]}) (rank {A.shape[0]}/{B.shape[1]}), this model's is "
                f"({module.out_features}, {module.in_features}); import into the base it was "
                "trained on"
            )
        if use_dora and ("m" not in parts or tuple(parts["m"].shape) != (module.out_features,)):
            raise ExportError(
                f"{where}: use_dora is set but {name} has no magnitude vector of "
                f"{module.out_features} entries"
            )
        if not use_dora and "m" in parts:
            raise ExportError(
                f"{where}: {name} has a magnitude vector but use_dora is not set in {PEFT_CONFIG}"
            )
        for part, t in parts.items():
            if not torch.isfinite(t).all():
                raise ExportError(f"{where}: the {part} tensor of {name} holds NaN or inf")
    state = model.state_dict()
    for key, t in rest.items():
        if key not in state:
            raise ExportError(f"{where} holds {key!r} (modules_to_save), which this model does not have")
        if tuple(state[key].shape) != tuple(t.shape):
            raise ExportError(
                f"{where}: {key} has shape {tuple(t.shape)}, this model's {tuple(state[key].shape)}"
            )
    trainable = _owners(model, rest, config.get("modules_to_save") or [])

    # ---- the doran config and the tensors of every slice
    restored = _restore_layout(meta, mods, use_dora)
    if restored is None and meta.get("doran_format") == EXPORT_FORMAT:
        warnings.warn(
            f"{where} was written by doran but its tensors no longer fit the layout it names (trained "
            "further in PEFT?); importing it as a plain PEFT adapter",
            ExportWarning,
            stacklevel=2,
        )
    if restored is not None:
        cfg, layout, parts = restored
    else:
        cfg, layout, parts = _generic_config(config, mods, where, use_dora)
    if cfg.magnitude and cfg.dropout > 0:
        warnings.warn(
            f"imported DoRA with dropout={cfg.dropout}: doran's DoRA drops out only the low-rank "
            "input, PEFT's also the base input in training; eval outputs are equal",
            ExportWarning,
            stacklevel=2,
        )

    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        doran.inject(model, cfg, trainable=tuple(trainable))
    except doran.DoranError as err:
        raise ExportError(f"{where} cannot be injected into this model: {err}") from err
    try:
        got = {
            n: {k: (ad.start, ad.stop) for k, ad in layer.doran.items()}
            for n, layer in doran.adapted_modules(model)
        }
        if got != layout:
            raise ExportError(
                f"{where}: its config selects other modules or slices in this model than the file "
                f"holds ({sorted(got)[:3]} vs {sorted(layout)[:3]}); import into the base it was "
                "trained on"
            )
        with torch.no_grad():
            for name, layer in doran.adapted_modules(model):
                for key, ad in layer.doran.items():
                    ad.lora_A.copy_(parts[name]["A"][key])
                    ad.lora_B.copy_(parts[name]["B"][key])
                    if cfg.magnitude:
                        ad.magnitude.copy_(parts[name]["m"][key])
            for key, t in rest.items():
                target = (
                    model.get_parameter(key)
                    if key in dict(model.named_parameters())
                    else model.get_buffer(key)
                )
                target.copy_(t)
    except BaseException:
        doran.eject(model)
        for p, flag in flags:
            p.requires_grad_(flag)
        raise
    return model


def _owners(model: nn.Module, rest: dict[str, torch.Tensor], modules_to_save: list[str]) -> list[str]:
    """The modules to keep trainable: those of ``modules_to_save`` holding the tensors, else their modules."""
    names = [n for n, _ in model.named_modules() if n]
    owners: list[str] = []
    for key in rest:
        hits = [n for n in names if key.startswith(n + ".") and any(n.endswith(m) for m in modules_to_save)]
        owner = min(hits, key=len) if hits else key.rpartition(".")[0]
        if not owner:
            raise ExportError(
                f"the tensor {key!r} belongs to the model's root module; doran's trainable "
                "patterns name submodules only"
            )
        if owner not in owners:
            owners.append(owner)
    return owners


def _generic_config(config: dict[str, Any], mods: dict, where: Path, use_dora: bool):
    """A doran config for any PEFT LoRA / DoRA: one rank (the largest), one scale (the commonest)."""
    r0, alpha0 = int(config.get("r", 8)), float(config.get("lora_alpha", 8))
    rslora = bool(config.get("use_rslora", False))
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    scales = {}
    for name, parts in mods.items():
        r = int(_pattern_value(rank_pattern, name, r0))
        if parts["A"].shape[0] != r:
            raise ExportError(
                f"{where}: {PEFT_CONFIG} gives {name} rank {r}, its tensors rank "
                f"{parts['A'].shape[0]}; the folder is inconsistent"
            )
        alpha = float(_pattern_value(alpha_pattern, name, alpha0))
        scales[name] = alpha / math.sqrt(r) if rslora else alpha / r
    r = max(p["A"].shape[0] for p in mods.values())
    s, _ = Counter(scales.values()).most_common(1)[0]
    alpha = s * r
    cfg = doran.AdapterConfig.preset(
        "dora" if use_dora else "lora",
        r=r,
        alpha=alpha,
        dropout=float(config.get("lora_dropout", 0.0)),
        targets=tuple(mods),
        fused_qkv=(),
    )
    parts, layout = {}, {}
    for name, p in mods.items():
        A, B = p["A"], p["B"]
        ratio = scales[name] / cfg.scale
        if ratio != 1.0:
            B = B * ratio
        pad = r - A.shape[0]
        if pad:  # zero factors: no output, no gradient to the padding
            A = torch.cat([A, torch.zeros(pad, A.shape[1], dtype=A.dtype)])
            B = torch.cat([B, torch.zeros(B.shape[0], pad, dtype=B.dtype)], dim=1)
        parts[name] = {"A": {"all": A}, "B": {"all": B}, "m": {"all": p.get("m")}}
        layout[name] = {"all": (0, B.shape[0])}
    return cfg, layout, parts


# ============================================================================================== command
