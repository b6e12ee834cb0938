"""Where a study's time goes: one real run (``experiments.run``) broken into its phases, next to the bare step.

    python -m benchmarks.study_time --profile default --methods lora doran --fractions 1.0 0.01 \
        --out benchmarks/results/study-time.json

For each method and fraction it runs the real loop once (the profile's run config and the method's tuned
values, seed 0, in a temporary folder) with a timing callback that never synchronises the GPU, and reports:

- ``startup_s``: from the call to the first training batch (data read and checked, model built, adapters
  injected and packed, Lightning set up);
- ``data_ms``: per step, the wait for the next batch (DataLoader and collate);
- ``step_ms``: per step, the median wall time between consecutive batch ends after the first ``--warmup``
  steps, validation excluded: what the loop costs per step;
- ``diagnostics_ms``: per step, the host time inside the recorders and the guard (tau, magnitude, gradient
  norms, history, non-finite check);
- ``compile_s``: the excess of the first ``--warmup`` steps over the steady step (compilation, CUDA-graph
  recording, allocator warm-up);
- ``validation_s`` and ``test_s``; ``fit_s`` and ``wall_s``;
- ``bare_step_ms``: ``benchmarks.step_time.time_variant`` on the same model, adapters, batch and execution mode
  (forward, backward, optimizer step, synchronised per step), and ``loop_over_bare``.

Benchmarks, not tests: nothing here asserts a time. Ratios of methods are measured in the same process.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch


class PhaseTimer(pl.Callback):
    """Host timestamps at the loop's hooks (no GPU synchronisation), and the host time of the other callbacks."""

    def __init__(self) -> None:
        self.batch_start: list[float] = []
        self.batch_end: list[float] = []
        self.in_validation: list[bool] = []
        self.val_s = 0.0
        self.train_start = self.train_end = 0.0
        self._val_t0 = 0.0
        self._validated = False
        self.callback_s = 0.0

    def on_train_start(self, trainer, pl_module) -> None:
        self.train_start = time.perf_counter()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.batch_start.append(time.perf_counter())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.batch_end.append(time.perf_counter())
        self.in_validation.append(self._validated)
        self._validated = False

    def on_validation_start(self, trainer, pl_module) -> None:
        self._val_t0 = time.perf_counter()

    def on_validation_end(self, trainer, pl_module) -> None:
        self.val_s += time.perf_counter() - self._val_t0
        self._validated = True

    def on_train_end(self, trainer, pl_module) -> None:
        self.train_end = time.perf_counter()

    def time_callbacks(self, trainer: pl.Trainer) -> None:
        """Wrap the hooks of every other callback to add up their host time."""
        hooks = ("on_train_batch_end", "on_before_optimizer_step", "on_train_batch_start", "on_train_epoch_end",
                 "on_before_backward", "on_after_backward")
        for cb in trainer.callbacks:
            if cb is self or type(cb).__module__.startswith("lightning"):
                continue
            for name in hooks:
                if getattr(type(cb), name) is getattr(pl.Callback, name):  # not overridden: nothing to time
                    continue
                original = getattr(cb, name)

                def timed(*args, _original=original, **kwargs):
                    t0 = time.perf_counter()
                    try:
                        return _original(*args, **kwargs)
                    finally:
                        self.callback_s += time.perf_counter() - t0

                setattr(cb, name, timed)

    def setup(self, trainer, pl_module, stage) -> None:
        if stage == "fit":
            self.time_callbacks(trainer)


def bare_step_ms(cfg, steps: int, warmup: int, device: str) -> dict[str, Any]:
    """``benchmarks.step_time.time_variant`` on the run's own model, adapters, batch and compile mode."""
    from benchmarks.step_time import time_variant
    from experiments.grid import data_of
    from experiments.run import build, compile_mode, train_subset

    splits = data_of(cfg)[0]
    train = splits.train.take(train_subset(cfg, splits))
    torch._dynamo.reset()  # as each run does
    module, datamodule, _ = build(cfg, splits.num_classes, (train, train, train), compile=compile_mode(cfg, 10**9))
    module.to(device)
    module.setup("fit")  # packs the adapter tensors, as the run does
    batch = next(iter(datamodule.train_dataloader()))
    batch = {k: v.to(device) for k, v in batch.items()}
    work = {"step": lambda m: module.model_step(batch)[0]}
    return time_variant(work, module.model, device, steps=steps, warmup=warmup, profile_steps=0 if device == "cpu" else 3)


def measure(cfg, warmup: int) -> dict[str, Any]:
    """One real run of ``cfg`` with a ``PhaseTimer``: the phases of its time (module docstring)."""
    from experiments.run import run

    timer = PhaseTimer()
    t0 = time.perf_counter()
    result = run(cfg, callbacks=[timer], verbose=False)
    wall = time.perf_counter() - t0
    ends, starts = timer.batch_end, timer.batch_start
    intervals = [b - a for a, b, v in zip(ends, ends[1:], timer.in_validation[1:]) if not v]
    steady = statistics.median(intervals[warmup:]) if len(intervals) > warmup else statistics.median(intervals)
    waits = [s - e for e, s in zip(ends, starts[1:])]
    n = len(ends)
    first = (ends[min(warmup, n - 1)] - timer.train_start) if n else 0.0
    return {
        "run_id": result["run_id"], "status": result["status"], "steps": result["steps"], "epochs": result["epochs"],
        "test_acc": result["metrics"].get("test/acc"), "compile": result["device"]["compile"],
        "wall_s": wall, "fit_s": result["fit_wall_s"], "startup_s": (starts[0] - t0) if starts else None,
        "step_ms": 1e3 * steady, "data_ms": 1e3 * statistics.median(waits) if waits else None,
        "diagnostics_ms": 1e3 * timer.callback_s / max(1, n),
        "compile_s": max(0.0, first - min(warmup, n) * steady),
        "validation_s": timer.val_s, "test_s": wall - (timer.train_end - t0),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.study_time", description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="default")
    parser.add_argument("--methods", nargs="+", default=["lora", "doran"])
    parser.add_argument("--fractions", nargs="+", type=float, default=[1.0])
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="run-config overrides")
    parser.add_argument("--warmup", type=int, default=20, help="steps left out of the steady step (compilation)")
    parser.add_argument("--bare-steps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from doran.results import device_info
    from experiments.grid import load_profile, load_tuned, point_config

    device = "cuda" if torch.cuda.is_available() else "cpu"
    profile = load_profile(args.profile)
    rows = []
    with tempfile.TemporaryDirectory(prefix="study-time-") as tmp:
        for fraction in args.fractions:
            for method in args.methods:
                tuned, _ = load_tuned(profile.name, method)
                coords = {"method": method, "seed": 0, "fraction": fraction, "out": tmp}
                cfg = point_config(profile, tuned, {"runtime.force": True}, coords, extra=args.set)
                row = {"method": method, "fraction": fraction, **measure(cfg, args.warmup)}
                row["bare"] = bare_step_ms(cfg, args.bare_steps, 5, device)
                row["bare_step_ms"] = row["bare"]["step_ms_median"]
                row["loop_over_bare"] = row["step_ms"] / row["bare_step_ms"]
                rows.append(row)
                print(f"[study_time] {method} f={fraction:g}: wall {row['wall_s']:.1f}s, step {row['step_ms']:.1f} ms "
                      f"(bare {row['bare_step_ms']:.1f} ms, x{row['loop_over_bare']:.2f}), data {row['data_ms']:.2f} ms, "
                      f"diagnostics {row['diagnostics_ms']:.2f} ms, startup {row['startup_s']:.1f}s, compile "
                      f"{row['compile_s']:.1f}s, validation {row['validation_s']:.1f}s, test {row['test_s']:.1f}s",
                      flush=True)
    for fraction in args.fractions:
        base = next((r for r in rows if r["method"] == "lora" and r["fraction"] == fraction), None)
        for r in rows:
            if base is not None and r["fraction"] == fraction:
                r["wall_over_lora"] = r["wall_s"] / base["wall_s"]
                r["fit_over_lora"] = r["fit_s"] / base["fit_s"]
    out = {"benchmark": "study_time", "profile": args.profile, "device": device_info(), "set": args.set,
           "torch": torch.__version__, "threads": torch.get_num_threads(), "rows": rows,
           "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
