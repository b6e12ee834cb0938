"""What a sweep says while it runs: a progress bar weighted by each run's estimated cost, and, before a long
CPU sweep starts, its estimated time from a step measured on this machine."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence
from typing import Any


class Progress:
    """A tqdm bar over the grid weighted by estimated cost (so the ETA accounts for long runs), or lines."""

    def __init__(self, total: float, done: float, n_runs: int, n_done: int, enabled: bool | None):
        from tqdm.auto import tqdm

        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.n_runs, self.n_done, self.errors = n_runs, n_done, 0
        self.bar = tqdm(
            total=total,
            initial=done,
            disable=not self.enabled,
            dynamic_ncols=True,
            bar_format="{desc} {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}, weighted by run cost]",
        )
        self._postfix()

    def _postfix(self) -> None:
        errors = f", {self.errors} errors" if self.errors else ""
        self.bar.set_description_str(f"[sweep] {self.n_done}/{self.n_runs} runs{errors}")

    def update(self, point, new_state: str, seconds: float) -> None:
        self.n_done += 1
        self.errors += new_state == "error"
        self.bar.update(min(point.cost, self.bar.total - self.bar.n))
        self._postfix()
        message = (
            f"[sweep] {new_state:8s} {point.run_id} ({point.variant}, seed {point.seed}, fraction "
            f"{point.fraction:g}) in {seconds:.0f}s"
        )
        if self.enabled:
            self.bar.write(message, file=sys.stderr)
        else:
            print(message, flush=True)

    def close(self) -> None:
        self.bar.close()


def measure_step(cfg, steps: int = 3, threads: int | None = None) -> float:
    """Seconds per optimizer step of ``cfg``'s model on this machine: the real model, adapters and batch,
    timed over ``steps`` steps after one warm-up step (eager; data and model loading not counted), with
    ``threads`` torch threads if given (a run's own count: one thread steps slower than two)."""
    import torch

    if threads:
        before = torch.get_num_threads()
        torch.set_num_threads(int(threads))
        try:
            return measure_step(cfg, steps)
        finally:
            torch.set_num_threads(before)

    import doran
    from experiments.config import replace
    from experiments.grid import data_of
    from experiments.run import build, train_subset

    splits = data_of(cfg)[0]
    train = splits.train.take(train_subset(cfg, splits))
    probe = replace(cfg, **{"runtime.compile": "none"})
    module, datamodule, _ = build(probe, splits.num_classes, (train, train, train))
    batch = next(iter(datamodule.train_dataloader()))
    optimizer = torch.optim.AdamW(doran.param_groups(module.model, lr=1e-6, weight_decay=0.0))
    times = []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        loss = module.model_step(batch)[0]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i:
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def estimate(points: Sequence[Any], jobs: int, threads: int | None = None) -> str | None:
    """A line with the grid's estimated time on this CPU (a measured step times the grid's cost), said
    before a long CPU sweep starts; None on a GPU (the per-profile budgets in the docs apply there). The step
    is measured with the torch threads each run will have (``threads``, else the run's ``runtime.threads``)."""
    import torch

    if not points or torch.cuda.is_available():
        return None
    first = max(points, key=lambda p: p.cost)
    seconds = measure_step(first.cfg, threads=threads or first.cfg.runtime.threads)
    total = sum(p.cost for p in points) * seconds / max(1, min(jobs, os.cpu_count() or 1))
    line = (
        f"[sweep] estimate: {len(points)} runs to do, about {_duration(total)} on this CPU ({seconds:.2f} s per "
        f"optimizer step of {first.method} measured now, {sum(p.cost for p in points):,.0f} step equivalents)"
    )
    if total > 3600:
        line += (
            "\n[sweep] warning: that is long for a CPU; only `cpu` and the `*_cpu` profiles are sized for one (the "
            "others for a GPU), and PROFILE=smoke checks every target in minutes. Ctrl-C stops at any time: finished "
            "runs are kept and the same command resumes."
        )
    return line


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
