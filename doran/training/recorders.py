"""Recorders for the paper's claims: ``TauRecorder`` (tau per layer and projection), ``MagnitudeRecorder``,
``GradNormRecorder`` (adapter gradient norm per group and step: the stability claim), ``HistoryRecorder``
(learning curves, epoch times) and ``StepLossRecorder`` (per-batch loss over all ranks, tokens/s). Values stay
on the device and reach the host in few transfers, so that recording does not make the host wait for the GPU.
"""

from __future__ import annotations

import math
import re
import time
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
    (both are recorded: a relative tau says how large it is against the row norm). Recorded at the start, every ``every_n_steps`` optimizer steps and at
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

    Measured in ``on_before_optimizer_step``, after backward and before clipping, in the units of the loss: under
    float16 mixed precision, where an optimizer that unscales inside its own step (a fused AdamW) leaves the
    gradients multiplied by the loss scale at this point, the norms are divided by that scale, recorded in a
    column ``loss_scale`` (the scale of that step; absent without a gradient scaler). Records every
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
        self._member_key: tuple | None = None
        self._member: torch.Tensor | None = None
        self._pending_scaled = False  # the pending rows end with the loss scale

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
        key = (tuple(g for _, g in leaves), leaves[0][0].device)
        if groups != self._groups or key != self._member_key:
            self._flush()
            self._groups, self._member_key = groups, key
            # group sums as a product with a 0/1 membership matrix (G, N): deterministic on every device
            # (index_add_ is not on a GPU); built once per run
            self._member = torch.tensor([[float(g == group) for _, g in leaves] for group in groups],
                                        device=leaves[0][0].device)
        norms = torch._foreach_norm([g.detach().float() for g, _ in leaves])
        squares = self._member @ (torch.stack(norms) ** 2)
        scale = _loss_scale(trainer, optimizer)
        if self._pending and (scale is not None) != self._pending_scaled:
            self._flush()  # rows of one transfer have one length
        self._pending_scaled = scale is not None
        if scale is not None:  # the gradients still carry the loss scale: divide it out, keep it (one transfer)
            scale = scale.reshape(1).to(squares)
            squares = torch.cat([squares / scale**2, scale])
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
            extra = {"loss_scale": values.pop()} if len(values) > len(self._groups) else {}
            row = {g: math.sqrt(v) if math.isfinite(v) else None for g, v in zip(self._groups, values)}
            row.update(extra)
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


def _loss_scale(trainer: pl.Trainer, optimizer: Any) -> torch.Tensor | None:
    """The gradient scaler's current scale (a device tensor: no host sync) when the gradients have not been
    unscaled yet at ``on_before_optimizer_step``, else None (no scaler, or Lightning unscaled them already)."""
    scaler = getattr(getattr(trainer, "precision_plugin", None), "scaler", None)
    if scaler is None or not scaler.is_enabled():
        return None
    from torch.amp.grad_scaler import OptState

    raw = getattr(optimizer, "_optimizer", optimizer)  # a LightningOptimizer wraps the torch optimizer
    state = scaler._per_optimizer_states.get(id(raw), {})
    if state.get("stage") == OptState.UNSCALED:
        return None
    return scaler._get_scale_async()


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
