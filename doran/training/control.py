"""Callbacks that steer a run: ``NonFiniteGuard`` (stops a diverged run and records the step and cause, the bad
step not applied), ``AdapterCheckpoint`` (``last.ckpt`` for exact resumption) and ``ValidationSchedule``."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

import doran

from .module import AdapterModule
from .recorders import _leaves


class NonFiniteGuard(Callback):
    """Stops a run whose training loss (or gradient) becomes NaN/inf, and records the step and the cause.

    The failing step is not applied. On a CPU, ``training_step`` returns None for a non-finite loss (no
    backward, no optimizer step) and a non-finite gradient is dropped before the optimizer sees it, each
    checked at the step. On a GPU the check never makes the host wait: the loss and gradients of each step
    are checked on the device, and an optimizer that takes a ``skip_if`` flag (``doran``'s fused AdamW) skips
    the update on the device; the flag is read every ``poll_every`` steps and at the end of each epoch, and
    the run stops there, recording the first failing step. Under fp16 mixed precision the grad scaler already
    skips steps with inf gradients, so only the loss is checked there.
    ``failure`` is None or ``{"step", "epoch", "batch", "cause"}``.
    """

    def __init__(self, poll_every: int = 10) -> None:
        self.failure: dict[str, Any] | None = None
        self.poll_every = max(1, int(poll_every))
        self._first_bad: torch.Tensor | None = None  # device: first failing step, or -1

    def _fail(self, trainer: pl.Trainer, failure: dict[str, Any]) -> None:
        if self.failure is None:
            self.failure = failure
        trainer.should_stop = True

    def on_train_batch_end(self, trainer, pl_module: AdapterModule, outputs, batch, batch_idx) -> None:
        if pl_module.nonfinite is not None:
            self._fail(trainer, pl_module.nonfinite)
        elif self._first_bad is not None and trainer.global_step % self.poll_every == 0:
            self._poll(trainer)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._poll(trainer)

    def _poll(self, trainer: pl.Trainer) -> None:
        if self._first_bad is None:
            return
        step = int(self._first_bad)  # the only transfer: every poll_every steps
        if step >= 0:
            self._fail(trainer, {"step": step, "epoch": int(trainer.current_epoch), "batch": None,
                                 "cause": "non-finite training loss or gradient (the update was skipped)"})

    def on_before_optimizer_step(self, trainer, pl_module: AdapterModule, optimizer) -> None:
        fp16 = "16-mixed" in str(trainer.precision) and "bf16" not in str(trainer.precision)
        leaves = [p for p, _ in _leaves(pl_module) if p.grad is not None]
        if fp16 or not leaves:
            return
        optimizer = getattr(optimizer, "_optimizer", optimizer)  # Lightning may hand over its wrapper
        if leaves[0].is_cuda and hasattr(optimizer, "skip_if"):
            self._device_check(trainer, pl_module, optimizer, leaves)
            return
        finite = torch.stack([torch.isfinite(p.grad).all() for p in leaves])  # one transfer per step
        if not bool(finite.all()):
            named = list(doran.named_adapter_gradients(pl_module.model))
            bad = [n for n, g in named if not bool(torch.isfinite(g).all())]
            for p in pl_module.model.parameters():
                p.grad = None  # AdamW skips parameters without gradient: the bad step is not applied
            self._fail(trainer, {"step": int(trainer.global_step), "epoch": int(trainer.current_epoch),
                                 "batch": None, "cause": f"non-finite gradient in {len(bad)} tensors, first {bad[:1]}"})

    def _device_check(self, trainer, pl_module, optimizer, leaves: list[torch.Tensor]) -> None:
        device = leaves[0].device
        found = torch.zeros((), device=device)  # 0-dim, as a gradient scaler's found_inf
        # sets found to 1.0 where any gradient is non-finite (the scale 1.0 leaves every gradient unchanged)
        torch._amp_foreach_non_finite_check_and_unscale_([p.grad for p in leaves], found,
                                                         torch.ones((), device=device))
        loss = getattr(pl_module, "last_loss", None)
        if loss is not None:
            found = torch.maximum(found, (~torch.isfinite(loss.detach().float().reshape(()))).float())
        optimizer.skip_if = found
        if self._first_bad is None:
            self._first_bad = torch.full((), -1, dtype=torch.long, device=device)
        step = torch.full((), int(trainer.global_step), dtype=torch.long, device=device)
        self._first_bad = torch.where((self._first_bad < 0) & (found > 0), step, self._first_bad)

    def state_dict(self) -> dict[str, Any]:
        return {"failure": self.failure}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.failure = state.get("failure")


class AdapterCheckpoint(Callback):
    """Writes ``<dirpath>/last.ckpt`` (adapter tensors, optimizer, scheduler, loops, callbacks, RNG) at the
    end of an epoch once at least ``min_interval_s`` seconds have passed since the last one (0: every epoch
    end) and, if ``every_n_steps``, every that many steps.

    The interval bounds what an interruption can lose (a minute of training by default) without writing a
    checkpoint after each of the many short epochs of a small-data run. The module keeps only trainable
    tensors in the checkpoint (``AdapterModule.on_save_checkpoint``). Resuming from an epoch-end checkpoint is
    exact; from a mid-epoch one Lightning restarts the epoch's data iterator, so the rest of that epoch sees a
    different order (Lightning warns).
    """

    def __init__(self, dirpath: str | Path, every_n_steps: int | None = None, min_interval_s: float = 0.0):
        self.dirpath, self.every_n_steps = Path(dirpath), every_n_steps
        self.min_interval_s = float(min_interval_s)
        self._saved_at = time.monotonic()

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
        self._saved_at = time.monotonic()

    def on_train_start(self, trainer, pl_module) -> None:
        self._saved_at = time.monotonic()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.every_n_steps and trainer.global_step % self.every_n_steps == 0:
            self._save(trainer)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if time.monotonic() - self._saved_at >= self.min_interval_s:
            self._save(trainer)


class ValidationSchedule(Callback):
    """Validates after at most ``max_validations`` epochs, evenly spaced and always including the last one
    (0: after every epoch). A run on 1% of the data trains dozens of short epochs; validating after each
    would cost more than the training itself."""

    def __init__(self, epochs: int, max_validations: int = 0):
        k = min(epochs, max_validations) if max_validations > 0 else epochs
        self.epochs = {max(0, round((i + 1) * epochs / k) - 1) for i in range(k)}

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        # Lightning validates an epoch when (epoch + 1) % check_val_every_n_epoch == 0
        trainer.check_val_every_n_epoch = 1 if trainer.current_epoch in self.epochs else 10**9
