"""Callbacks for the paper's claims and for losing nothing: ``TauRecorder`` (tau per layer and projection),
``MagnitudeRecorder``, ``GradNormRecorder`` (adapter gradient norm per group and step: the stability claim),
``NonFiniteGuard`` (stops a diverged run and records the step and cause), ``HistoryRecorder`` (learning
curves, epoch times), ``StepLossRecorder`` (per-batch loss over all ranks, tokens/s) and ``AdapterCheckpoint``
(``last.ckpt`` at every epoch end); ``full_params`` / ``fsdp_safe`` let the recorders read sharded tensors."""

from __future__ import annotations

import math
import os
import re
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

import doran

from .module import AdapterModule


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


def _stride(trainer: pl.Trainer, every_n_steps: int, max_points: int) -> int:
    """Every ``every_n_steps`` steps, or sparser so that a run records at most about ``max_points`` points
    (0: no limit): a long run's trace is kept at the resolution a figure needs."""
    if max_points <= 0:
        return every_n_steps
    total = int(trainer.estimated_stepping_batches)
    return max(every_n_steps, math.ceil(total / max_points))


class TauRecorder(_Columns):
    """Records tau of every adapted projection: columns step, layer, projection, module, tau, tau_abs.

    ``tau`` is relative to the row norm (the parameterised quantity), ``tau_abs`` in weight units
    (REFERENCE.md: record both). Recorded at the start, every ``every_n_steps`` optimizer steps and at
    the end of training. Methods with tau = 0 (LoRA, DoRA) record nothing.
    """

    def __init__(self, every_n_steps: int = 10, max_points: int = 0):
        super().__init__()
        self.every_n_steps = max(1, int(every_n_steps))
        self.max_points = int(max_points)
        self._last = -1

    def on_fit_start(self, trainer: pl.Trainer, pl_module) -> None:
        self.every_n_steps = _stride(trainer, self.every_n_steps, self.max_points)

    def _record(self, pl_module: AdapterModule, step: int) -> None:
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

    def on_train_start(self, trainer: pl.Trainer, pl_module: AdapterModule) -> None:
        self._record(pl_module, trainer.global_step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step % self.every_n_steps == 0:
            self._record(pl_module, trainer.global_step)

    def on_train_end(self, trainer: pl.Trainer, pl_module: AdapterModule) -> None:
        self._record(pl_module, trainer.global_step)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "last": self._last}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self._last = state.get("last", -1)


class MagnitudeRecorder(_Columns):
    """Magnitude statistics per projection: columns step, layer, projection, module, mean, std, min, max,
    rel_change (``||m - m_0|| / ||m_0||``, m_0 the magnitude at the start of training). DoRA family only."""

    def __init__(self, every_n_steps: int = 10, max_points: int = 0):
        super().__init__()
        self.every_n_steps = max(1, int(every_n_steps))
        self.max_points = int(max_points)
        self.initial: dict[str, torch.Tensor] = {}
        self._last = -1

    def on_fit_start(self, trainer: pl.Trainer, pl_module) -> None:
        self.every_n_steps = _stride(trainer, self.every_n_steps, self.max_points)

    def _record(self, pl_module: AdapterModule, step: int) -> None:
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


def _leaves(pl_module: AdapterModule) -> list[tuple[torch.Tensor, str]]:
    """(tensor, group) of every tensor the optimizer steps, walked once per run (packed tensors once)."""
    cache = getattr(pl_module, "_diagnostic_leaves", None)
    if cache is None:
        cache = [(p, group) for p, group, _ in doran.adapter_leaves(pl_module.model) if p.requires_grad]
        pl_module._diagnostic_leaves = cache
    return cache


class GradNormRecorder(_Columns):
    """L2 norm of the gradient of each parameter group (factors, generator, magnitude, tau, other) per step.

    Measured in ``on_before_optimizer_step``: after backward and AMP unscaling, before clipping. Records every
    step while the run has at most ``max_records`` steps, else every ``ceil(steps / max_records)`` steps.
    Columns: step and one column per group present, and ``total`` (a non-finite norm is kept as None).

    The norms stay on the device (one ``_foreach_norm`` per step) and are copied to the host in one transfer
    every ``flush_every`` records and at the end of each epoch: recording never makes the host wait for the
    GPU in the middle of training.
    """

    def __init__(self, max_records: int = 5000, flush_every: int = 64):
        super().__init__()
        self.max_records = max(1, int(max_records))
        self.flush_every = max(1, int(flush_every))
        self.stride = 1
        self._pending: list[tuple[int, torch.Tensor]] = []
        self._groups: list[str] = []

    def on_train_start(self, trainer: pl.Trainer, pl_module) -> None:
        total = int(trainer.estimated_stepping_batches)
        self.stride = max(1, math.ceil(total / self.max_records))

    def on_before_optimizer_step(self, trainer, pl_module: AdapterModule, optimizer) -> None:
        if trainer.global_step % self.stride:
            return
        leaves = [(p.grad, group) for p, group in _leaves(pl_module) if p.grad is not None]
        if not leaves:
            return
        groups = sorted({g for _, g in leaves})
        if groups != self._groups:
            self._flush()
            self._groups = groups
        norms = torch._foreach_norm([g.detach().float() for g, _ in leaves])
        index = torch.tensor([groups.index(g) for _, g in leaves], device=norms[0].device)
        squares = torch.zeros(len(groups), device=norms[0].device).index_add_(0, index, torch.stack(norms) ** 2)
        self._pending.append((int(trainer.global_step), squares))
        if len(self._pending) >= self.flush_every:
            self._flush()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._flush()

    def on_train_end(self, trainer, pl_module) -> None:
        self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        steps = [s for s, _ in self._pending]
        rows = torch.stack([v for _, v in self._pending]).double().tolist()  # one transfer
        self._pending = []
        for step, values in zip(steps, rows):
            row = {g: math.sqrt(v) if math.isfinite(v) else None for g, v in zip(self._groups, values)}
            total = sum(values)
            self._add(step=step, **row, total=math.sqrt(total) if math.isfinite(total) else None)

    def _add(self, **row: Any) -> None:
        # groups can appear later (none does in practice); keep columns aligned
        n = len(self.columns.get("step", []))
        for key in row:
            self.columns.setdefault(key, [None] * n)
        for key in self.columns:
            self.columns[key].append(row.get(key))

    def state_dict(self) -> dict[str, Any]:
        self._flush()
        return {**super().state_dict(), "stride": self.stride}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.stride = state.get("stride", 1)


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
        found = torch.zeros(1, device=device)
        # sets found to 1.0 where any gradient is non-finite (the scale 1.0 leaves every gradient unchanged)
        torch._amp_foreach_non_finite_check_and_unscale_([p.grad for p in leaves], found,
                                                         torch.ones(1, device=device))
        loss = getattr(pl_module, "last_loss", None)
        if loss is not None:
            found = torch.maximum(found, (~torch.isfinite(loss.detach().float())).float().reshape(1))
        optimizer.skip_if = found
        if self._first_bad is None:
            self._first_bad = torch.full((), -1, dtype=torch.long, device=device)
        step = torch.full((), int(trainer.global_step), dtype=torch.long, device=device)
        self._first_bad = torch.where((self._first_bad < 0) & (found[0] > 0), step, self._first_bad)

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
        self._pending_steps: list[tuple[int, torch.Tensor]] = []

    def _flush_steps(self) -> None:
        if self._pending_steps:
            values = torch.stack([v for _, v in self._pending_steps]).tolist()  # one transfer
            self.steps["step"] += [s for s, _ in self._pending_steps]
            self.steps["train_loss"] += values
            self._pending_steps = []

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._t0, self._c0, self._val_s, self._val_cpu = time.perf_counter(), time.process_time(), 0.0, 0.0
        self._loss_sum, self._loss_n = 0.0, 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if loss is None:
            return
        n = len(batch["labels"])
        loss = loss.detach().float()  # stays on the device: read once per epoch, never per step
        self._loss_sum, self._loss_n = self._loss_sum + loss * n, self._loss_n + n
        if trainer.global_step % self.every_n_steps == 0:
            self._pending_steps.append((trainer.global_step, loss))

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
        self._flush_steps()
        e["train_loss"].append(float(self._loss_sum) / self._loss_n if self._loss_n else None)
        e["val_loss"].append(self._pending_val[0])
        e["val_acc"].append(self._pending_val[1])
        e["lr"].append(lrs[0] if lrs else None)
        e["train_wall_s"].append(wall - self._val_s)
        e["train_cpu_s"].append(cpu - self._val_cpu)
        e["val_wall_s"].append(self._val_s)
        self._pending_val = (None, None)

    def on_train_end(self, trainer, pl_module) -> None:
        self._flush_steps()

    def state_dict(self) -> dict[str, Any]:
        self._flush_steps()
        return {"steps": self.steps, "epochs": self.epochs}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps, self.epochs = state["steps"], state["epochs"]


def _num(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


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
