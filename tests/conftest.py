"""Tiny random models of the three families the core must handle, and shared helpers."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))


def tiny_bert(seed: int = 0, num_labels: int = 3):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=32, num_labels=num_labels,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, initializer_range=0.2)
    return BertForSequenceClassification(cfg).eval()


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                      initializer_range=0.2)
    return LlamaForCausalLM(cfg).eval()


def tiny_vit(seed: int = 0):
    import timm

    torch.manual_seed(seed)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8,
                             num_classes=3, depth=2, embed_dim=48, num_heads=3).eval()


# name -> (factory, targets, trainable head, input maker, output getter)
FAMILIES = {
    "bert": (tiny_bert, ("query", "value"), ("classifier",),
             lambda g: {"input_ids": torch.randint(0, 97, (2, 9), generator=g)}, lambda out: out.logits),
    "llama": (tiny_llama, ("q_proj", "v_proj"), ("lm_head",),
              lambda g: {"input_ids": torch.randint(0, 64, (2, 9), generator=g)}, lambda out: out.logits),
    "vit": (tiny_vit, ("qkv",), ("head",),
            lambda g: {"x": torch.randn(2, 3, 32, 32, generator=g)}, lambda out: out),
}


def run(model, family: str, seed: int = 123):
    _, _, _, make_input, get = FAMILIES[family]
    inputs = make_input(torch.Generator().manual_seed(seed))
    out = model(**inputs)
    return get(out)


@torch.no_grad()
def perturb(model, scale: float = 0.3, seed: int = 7) -> None:
    """Move every adapter parameter away from its initial value, so that tests can fail."""
    import doran

    g = torch.Generator().manual_seed(seed)
    for _, p, group in doran.named_adapter_parameters(model):
        if group == "other":
            continue
        noise = torch.randn(p.shape, generator=g, dtype=p.dtype)
        if group == "magnitude":
            p.mul_(1 + 0.2 * noise)
        else:
            p.add_(scale * noise * (p.abs().mean() + 0.1))


@pytest.fixture(params=sorted(FAMILIES))
def family(request):
    return request.param
