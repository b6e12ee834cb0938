"""Verification of a converted backbone: against the ONNX graph (onnxruntime) and, for the float16 copy on
disk, against the float32 model.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .folder import load_backbone
from .graph import ConversionError, final_layernorm_output

#: Max abs error allowed between the converted float32 model's ``last_hidden_state`` and the ONNX graph's
#: final LayerNorm output on the N(0, 1) verification input. float32 summation order differs between
#: onnxruntime and torch over 12 layers, so the two agree only up to rounding; a wrongly mapped or
#: un-transposed weight gives errors of order 1. ``conversion.json`` records the error of each conversion.
ONNX_TOLERANCE = 1e-4
#: Max abs error allowed between the float16 copy on disk (computed in float32) and the float32 model's
#: ``last_hidden_state`` on the same input. float16 keeps 11 significant bits (relative rounding <= 4.9e-4
#: per weight), which 12 layers accumulate (``conversion.json`` records the error of each conversion).
#: Larger means a damaged or wrongly cast copy.
FP16_TOLERANCE = 5e-2
#: the verification inputs: (batch, 3, size, size) ~ N(0, 1) from this seed, at these sizes
VERIFY_SEED = 0
VERIFY_BATCH = 2
VERIFY_SIZES = (224, 112)


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
