"""``AdapterClassifier``: image and text classification around the adapter core, built from plain
hyper-parameters; one ``model_step`` for train/val/test; AdamW with linear warm-up then cosine.

Example::

    module = AdapterClassifier(backbone={"kind": "text", "name": "embedded-minilm"}, method="doran",
                               adapter={"r": 8, "alpha": 16, "targets": ["query", "value"]},
                               num_classes=2, head="classifier", trainable=["classifier"], seed=0)
    trainer = pl.Trainer(max_epochs=2, callbacks=list(default_callbacks(run_dir).values()))
    trainer.fit(module, datamodule)
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .backbones import build_backbone, init_head
from .module import AdapterModule
from .seeds import derive_seed


def warmup_cosine(step: int, total: int, warmup: int, min_ratio: float = 0.0) -> float:
    """LR multiplier: linear warm-up from 0 over ``warmup`` steps, then cosine from 1 to ``min_ratio``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class AdapterClassifier(AdapterModule):
    """A classifier (text or image) whose backbone is adapted by doran; built from plain hyper-parameters.

    Args:
        backbone: ``build_backbone`` arguments without ``num_classes`` (kind, name, pretrained, ...).
        method: an ``AdapterConfig`` preset: "lora", "dora", "doran".
        adapter: ``AdapterConfig`` field overrides (r, alpha, targets, tau_lr, ...).
        num_classes: number of labels.
        head: module re-initialised under the seed (``init_head``); None keeps the backbone's init.
        trainable: module-name suffixes trained besides the adapters (the head, at least).
        lr, weight_decay: AdamW; 1-D tensors (magnitude, tau, biases) get no decay (``doran.param_groups``).
        warmup_ratio / warmup_steps: linear warm-up length (steps win if > 0), then cosine to ``min_lr_ratio``.
        label_smoothing: cross-entropy label smoothing.
        seed: pairs methods: the head and the adapters are initialised from streams derived from it.
        compile: how the model runs (``doran.fast.compiling``): ``"auto"`` compiles with CUDA graphs on a GPU
            and runs eager on a CPU; ``"none"``, ``"default"``, ``"reduce-overhead"``, ``"aot_eager"``.
        model: an already built backbone (tests); not a hyper-parameter.

    Batches are dicts with ``labels`` and either ``input_ids``/``attention_mask`` or ``pixel_values``.
    """

    def __init__(
        self,
        backbone: dict[str, Any],
        method: str,
        adapter: dict[str, Any],
        num_classes: int,
        head: str | None = None,
        trainable: list[str] | tuple[str, ...] = (),
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        warmup_ratio: float = 0.0,
        warmup_steps: int = 0,
        min_lr_ratio: float = 0.0,
        label_smoothing: float = 0.0,
        seed: int = 0,
        compile: str = "auto",
        model: nn.Module | None = None,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["model"])
        if model is None:
            model, _, _ = build_backbone(num_classes=num_classes, **backbone)
        init_head(model, head, derive_seed(seed, "head"))
        self.adapted = self.attach(model, method, adapter, tuple(trainable), seed)

    # ----------------------------------------------------------------- steps
    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        runner = self.runner
        if "pixel_values" in batch:
            out = runner.model(batch["pixel_values"])  # timm: the logits; transformers: an output with .logits
            return out if torch.is_tensor(out) else out.logits  # (B, C)
        batch = runner.prepare(batch)
        pair = {"token_type_ids": batch["token_type_ids"]} if "token_type_ids" in batch else {}
        out = runner.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **pair)
        return out.logits  # (B, C)

    def model_step(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Shared by train/val/test: ``(loss, predictions, labels)``; the loss is computed in float32."""
        logits = self(batch)
        labels = batch["labels"]
        loss = F.cross_entropy(logits.float(), labels, label_smoothing=self.hparams.label_smoothing)
        return loss, logits.argmax(dim=-1), labels

    def training_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        loss, _, labels = self.model_step(batch)
        return loss, len(labels)

    def _eval_step(self, batch: dict[str, torch.Tensor], stage: str) -> None:
        loss, pred, labels = self.model_step(batch)
        n = len(labels)
        # batch_size weights the epoch mean, so the logged accuracy is exact over the whole split
        self.log(f"{stage}/loss", loss, on_epoch=True, batch_size=n)
        self.log(f"{stage}/acc", (pred == labels).float().mean(), on_epoch=True, prog_bar=True, batch_size=n)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def lr_lambda(self, total: int):
        """Linear warm-up (``warmup_steps`` if > 0, else ``warmup_ratio`` of all steps), then cosine to
        ``min_lr_ratio``."""
        hp = self.hparams
        warmup = hp.warmup_steps if hp.warmup_steps > 0 else round(hp.warmup_ratio * total)
        return lambda step: warmup_cosine(step, total, warmup, hp.min_lr_ratio)
