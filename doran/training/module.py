"""``AdapterModule``: what every LightningModule of doran shares around the adapter core.

A subclass builds its backbone and says how a batch becomes a loss and how the learning rate moves; the base
injects the adapters (from a stream of the run seed, so that methods are paired), runs the model compiled or
eager (``doran.fast.compiling``), packs the adapter tensors before the optimizer exists, skips and records a
non-finite training loss, builds AdamW over ``doran.param_groups`` (no decay on 1-D tensors), and writes
adapter-only checkpoints that resume exactly (RNG states included).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

import doran
from doran.fast import CompiledRunner, adamw, check_compile

from .seeds import derive_seed, rng_state, set_rng_state


class AdapterModule(pl.LightningModule):
    """The shared base of ``AdapterClassifier`` and ``CausalLMModule``.

    Subclasses call ``attach(model, method, adapter, trainable, seed)`` from their ``__init__`` (after
    ``save_hyperparameters``, which must record ``lr``, ``weight_decay`` and ``compile``), and implement
    ``training_loss(batch) -> (loss, batch size)`` and ``lr_lambda(total_steps) -> step -> multiplier``.
    """

    model: nn.Module
    #: implemented by each subclass: how a batch becomes ``(loss, batch size)``
    training_loss: Callable[[dict[str, torch.Tensor]], tuple[torch.Tensor, int]]
    #: implemented by each subclass: ``lr_lambda(total_steps)(step)`` is the learning-rate multiplier
    lr_lambda: Callable[[int], Callable[[int], float]]

    def attach(self, model: nn.Module, method: str, adapter: dict[str, Any], trainable: tuple[str, ...] = (),
               seed: int = 0) -> list[str]:
        """Inject the ``method`` adapters into ``model`` (initialised from the seed's own stream; the global
        RNG is untouched) and keep it as ``self.model``; returns the adapted module names."""
        check_compile(self.hparams.compile)
        self.adapter_config = doran.AdapterConfig.preset(method, **adapter)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(seed, "adapter"))
            adapted = doran.inject(model, self.adapter_config, trainable=tuple(trainable))
        model.train()  # from_pretrained returns eval mode; fine-tuning keeps the backbone's dropout on
        self.model = model
        self.strict_loading = False  # checkpoints hold adapter tensors only
        self.nonfinite: dict[str, Any] | None = None  # set by training_step when the loss is NaN/inf
        self._runner: tuple[CompiledRunner, ...] = ()  # a tuple: the compiled wrapper is no submodule
        return adapted

    # ----------------------------------------------------------------- how the model runs
    def _sharded(self) -> bool:
        trainer = self._trainer
        return trainer is not None and type(trainer.strategy).__name__.startswith("FSDP")

    @property
    def runner(self) -> CompiledRunner:
        """The model as it runs (compiled or not, ``doran.compiling``), built on first use on its device."""
        if not self._runner or self._runner[0].device_type != self.device.type:
            self._runner = (CompiledRunner(self.model, self.hparams.compile, self.device.type, self._sharded()),)
        return self._runner[0]

    def setup(self, stage: str) -> None:
        """Pack the adapter tensors (``doran.pack``: one tensor per kind and bank group, far less host work per
        step) before the optimizer is built; not under a sharding strategy (FSDP)."""
        if not self._sharded():
            doran.pack(self.model)

    # ----------------------------------------------------------------- training
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor | None:
        loss, n = self.training_loss(batch)
        self.last_loss = loss.detach()  # NonFiniteGuard checks it on the device (GPU) ...
        if loss.device.type == "cpu" and not torch.isfinite(loss):  # ... or here, where a check costs nothing
            # returning None skips backward and the optimizer step; NonFiniteGuard stops the run
            self.nonfinite = {"step": int(self.global_step), "epoch": int(self.current_epoch),
                              "batch": int(batch_idx), "cause": f"training loss is {loss.item()}"}
            return None
        self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True, batch_size=n)
        return loss

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        groups = doran.param_groups(self.model, lr=hp.lr, weight_decay=hp.weight_decay)
        if not self._sharded():
            covered = {id(p) for g in groups for p in g["params"]}
            missing = [p for p in self.model.parameters() if p.requires_grad and id(p) not in covered]
            if missing:  # defensive: every trainable tensor must be optimised
                raise RuntimeError(f"{len(missing)} trainable tensors are in no doran.param_groups group")
        optimizer = adamw(groups, lr=hp.lr, weight_decay=hp.weight_decay, sharded=self._sharded())
        total = max(1, int(self.trainer.estimated_stepping_batches))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self.lr_lambda(total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ----------------------------------------------------------------- adapter-only checkpoints
    def adapter_state_keys(self) -> list[str]:
        """state_dict keys of the trainable tensors (adapters and head): all that a checkpoint holds."""
        return [f"model.{name}" for name in doran.fast.store.trainable_names(self.model)]

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        keys = {k.replace("_fsdp_wrapped_module.", "") for k in self.adapter_state_keys()}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items()
                                    if k.replace("_fsdp_wrapped_module.", "") in keys}
        checkpoint["doran"] = {"adapter_config": self.adapter_config.to_dict(), "rng": rng_state()}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if not self._sharded():
            saved, expected = set(checkpoint["state_dict"]), set(self.adapter_state_keys())
            if saved != expected:
                raise RuntimeError(
                    f"checkpoint does not fit this model: missing {sorted(expected - saved)[:5]}, unexpected "
                    f"{sorted(saved - expected)[:5]}; delete the run's checkpoints/ folder to start afresh"
                )
        info = checkpoint.get("doran", {})
        if info.get("adapter_config") not in (None, self.adapter_config.to_dict()):
            raise RuntimeError(
                "checkpoint was written with another adapter config; delete the run's checkpoints/ folder to "
                "start afresh"
            )
        if "rng" in info:
            set_rng_state(info["rng"])
