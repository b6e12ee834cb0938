"""The command ``python -m doran.export``: a base model built from a local spec, then either export."""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

import doran

from .common import ExportError, ExportWarning, method_name, check_peft_form, _check_out_dir
from .to_peft import export_peft
from .merged import export_merged


def build_base(
    spec: str, base_kwargs: dict[str, Any] | None = None, checkpoint: str | os.PathLike | None = None
) -> nn.Module:
    """The base model of the command line, from local files only, in eval mode.

    ``spec``: a local ``from_pretrained`` folder (transformers), or ``timm:<name>`` built with
    ``base_kwargs`` and the weights of ``checkpoint`` (a local safetensors or torch file; required).

    Example::

        build_base("models/bert-base")
        build_base("timm:vit_base_patch16_224", {"num_classes": 10}, "vit.safetensors")
    """
    if spec.startswith("timm:"):
        name = spec[len("timm:") :]
        try:
            import timm
        except ImportError:
            raise ExportError("--base timm:... needs timm; pip install timm") from None
        if not name or any(c in name for c in "/\\:"):
            raise ExportError(
                f"--base {spec}: give a timm architecture name (e.g. timm:vit_base_patch16_224); "
                "weights come from --checkpoint, never from a download"
            )
        if checkpoint is None:
            raise ExportError(
                f"--base {spec} needs --checkpoint FILE (the base weights, a local safetensors or "
                "torch file): doran never downloads, and random weights are no base"
            )
        try:
            model = timm.create_model(name, pretrained=False, **(base_kwargs or {}))
        except Exception as err:  # unknown name, bad kwargs: several exception types
            raise ExportError(
                f"timm.create_model({name!r}, **{base_kwargs or {}}) fails: {err}; check the name "
                "and --base-kwargs"
            ) from err
        state = _read_checkpoint(Path(checkpoint))
        own = model.state_dict()
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        shapes = [
            f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}"
            for k, v in state.items()
            if k in own and tuple(own[k].shape) != tuple(v.shape)
        ]
        if missing or unexpected or shapes:
            raise ExportError(
                f"--checkpoint {checkpoint} does not fit timm:{name} with --base-kwargs "
                f"{json.dumps(base_kwargs or {})}: missing {missing[:3]}, unexpected "
                f"{unexpected[:3]}, other shapes (file vs model) {shapes[:2]}; give the "
                "--base-kwargs the model was built with"
            )
        model.load_state_dict(state)
        return model.eval()
    if base_kwargs:
        raise ExportError(
            "--base-kwargs is for --base timm:<name>; a from_pretrained folder holds its config"
        )
    if checkpoint is not None:
        raise ExportError(
            "--checkpoint is for --base timm:<name>; a from_pretrained folder holds its weights"
        )
    folder = Path(spec)
    if not folder.is_dir() or not (folder / "config.json").is_file():
        raise ExportError(
            f"--base {spec} is not a local from_pretrained folder (with config.json) nor "
            "timm:<name>; doran never downloads: save the base with model.save_pretrained(DIR) "
            "and give DIR"
        )
    try:
        import transformers
    except ImportError:
        raise ExportError("a from_pretrained folder needs transformers; pip install transformers") from None
    config = transformers.AutoConfig.from_pretrained(str(folder), local_files_only=True)
    arch = (getattr(config, "architectures", None) or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    if cls is None:
        cls = transformers.AutoModel
    return cls.from_pretrained(str(folder), local_files_only=True).eval()


def _read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise ExportError(f"--checkpoint {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # damaged file: several exception types
        raise ExportError(f"--checkpoint {path} cannot be read ({err})") from err
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and set(state) == {key} and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ExportError(f"--checkpoint {path} is no state dict of tensors")
    return state


def main(argv: list[str] | None = None) -> int:
    """The command line; returns the exit status (2: bad input, with the problem and the fix on stderr).

    Example::

        python -m doran.export adapter.safetensors --to peft --base models/bert --out out/peft
        python -m doran.export adapter.safetensors --to merged --base timm:vit_base_patch16_224 \\
            --base-kwargs '{"num_classes": 10}' --checkpoint vit.safetensors --out out/vit
    """
    parser = argparse.ArgumentParser(
        prog="python -m doran.export",
        description="Export a doran adapter file as a PEFT adapter folder (LoRA, DoRA) or as a merged model "
        "(every method) that loads without doran.",
    )
    parser.add_argument("adapter", help="adapter file written by doran.save_adapter")
    parser.add_argument("--to", choices=("peft", "merged"), required=True)
    parser.add_argument(
        "--base", required=True, help="local from_pretrained folder, or timm:<name> (with --checkpoint)"
    )
    parser.add_argument("--base-kwargs", default=None, help="JSON object of timm.create_model arguments")
    parser.add_argument("--checkpoint", default=None, help="local weights file of a timm base")
    parser.add_argument("--out", required=True, help="output folder (new or empty)")
    args = parser.parse_args(argv)
    try:
        _check_out_dir(args.out)
        kwargs = None
        if args.base_kwargs is not None:
            try:
                kwargs = json.loads(args.base_kwargs)
            except ValueError as err:
                raise ExportError(
                    f"--base-kwargs is not valid JSON ({err}); e.g. '{{\"num_classes\": 10}}'"
                ) from err
            if not isinstance(kwargs, dict):
                raise ExportError("--base-kwargs must be a JSON object, e.g. '{\"num_classes\": 10}'")
        _, cfg, _ = doran.read_adapter(args.adapter)  # a corrupt file fails here, before any model loads
        if args.to == "peft":
            check_peft_form(cfg)
        model = build_base(args.base, kwargs, args.checkpoint)
        try:
            doran.load_adapter(model, args.adapter)
        except doran.AdapterFileError as err:
            raise ExportError(f"the base model does not fit the adapter: {err}") from err
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ExportWarning)
            if args.to == "peft":
                name_or_path = None if args.base.startswith("timm:") else args.base  # PEFT's field: HF only
                out = export_peft(model, args.out, base_model_name_or_path=name_or_path)
                how = "peft.PeftModel.from_pretrained(base, DIR)"
            else:
                timm_name = args.base[len("timm:") :] if args.base.startswith("timm:") else None
                out = export_merged(
                    model, args.out, timm_architecture=timm_name, timm_kwargs=kwargs if timm_name else None
                )
                how = (
                    f"timm.create_model('local-dir:{out}', pretrained=True)"
                    if timm_name
                    else "AutoModel...from_pretrained(DIR)"
                )
        for w in caught:
            if issubclass(w.category, ExportWarning):
                print(f"note: {w.message}", file=sys.stderr)
            else:  # other libraries' warnings, as they would have shown
                warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    except doran.DoranError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out} ({method_name(cfg)}, --to {args.to}); load it with {how}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
