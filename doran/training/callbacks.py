"""The callbacks every run records with (``default_callbacks``), the precision a run uses, and what lets the
recorders read sharded (FSDP) tensors (``full_params``, ``fsdp_safe``)."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from .control import AdapterCheckpoint, NonFiniteGuard, ValidationSchedule
from .recorders import (
    GradNormRecorder,
    HistoryRecorder,
    MagnitudeRecorder,
    StepLossRecorder,
    TauRecorder,
    split_projection,
)

__all__ = [
    "AdapterCheckpoint", "GradNormRecorder", "HistoryRecorder", "MagnitudeRecorder", "NonFiniteGuard",
    "StepLossRecorder", "TauRecorder", "ValidationSchedule", "default_callbacks", "fsdp_safe", "full_params",
    "resolve_precision", "split_projection",
]  # fmt: skip


def default_callbacks(
    run_dir: str | Path | None,
    every_n_steps: int = 10,
    max_grad_records: int = 5000,
    ckpt_every_n_steps: int | None = None,
    ckpt_min_interval_s: float = 0.0,
    max_points: int = 0,
) -> dict[str, Callback]:
    """The diagnostics every run records, by name; add ``checkpoint`` when ``run_dir`` is given."""
    callbacks: dict[str, Callback] = {
        "history": HistoryRecorder(every_n_steps),
        "tau": TauRecorder(every_n_steps, max_points),
        "magnitude": MagnitudeRecorder(every_n_steps, max_points),
        "grad_norm": GradNormRecorder(max_grad_records),
        "guard": NonFiniteGuard(every_n_steps),
    }
    if run_dir is not None:
        callbacks["checkpoint"] = AdapterCheckpoint(Path(run_dir) / "checkpoints", ckpt_every_n_steps,
                                                    ckpt_min_interval_s)
    return callbacks


def resolve_precision(precision: str) -> str:
    """``auto``: bf16 mixed precision on a GPU that supports it, fp16 mixed on other GPUs, fp32 on CPU."""
    if precision != "auto":
        return precision
    if torch.cuda.is_available():
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "32-true"


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
