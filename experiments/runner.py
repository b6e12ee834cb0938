"""Running a grid so that nothing is lost: one result file per run, finished runs skipped, identical runs
of other sweeps reused, failures recorded and retried, interrupted runs resumed.

In this process (one job) or on worker processes (``--jobs N``, ``--gpus``), each run is
``experiments.run.run(point.cfg)``. A run that raises is recorded in ``<run_id>.error.json`` (error, traceback,
attempts) and retried at the next invocation; Ctrl-C, SIGTERM or a killed process loses at most the runs in
progress (which resume from their last epoch checkpoint). A run that diverged (NaN loss) has a result with
``status: failed``: an outcome, kept. ``sweep.json`` maps every grid point to its ``run_id``.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from experiments.constants import REPO, RESULTS_DIR, SWEEP_FILE
from experiments.grid import Point, Profile, SweepSpec
from experiments.progress import Progress


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def write_manifest(spec: SweepSpec, profile: Profile, points: Sequence[Point]) -> Path:
    """Merge ``points`` into ``<out>/sweep.json`` (grid coordinates -> run_id; a new run_id replaces an old)."""
    from doran.results import atomic_write_json

    by_out: dict[Path, list[Point]] = {}
    for p in points:
        by_out.setdefault(p.out, []).append(p)
    path = None
    for out, pts in by_out.items():
        path = out / SWEEP_FILE
        old = json.loads(path.read_text()) if path.is_file() else {}
        entries = dict(old.get("entries", {}))
        entries.update({p.key: p.manifest_entry() for p in pts})
        manifest = {
            "sweep": spec.name,
            "profile": profile.name,
            "description": spec.description,
            "baseline": spec.baseline,
            "variants": {v.label: {"method": v.method, "tags": v.tags} for v in spec.variants},
            "updated_at": _now(),
            "entries": dict(sorted(entries.items())),
        }
        unchanged = {k: v for k, v in old.items() if k != "updated_at"} == {
            k: v for k, v in json.loads(json.dumps(manifest)).items() if k != "updated_at"
        }
        if not unchanged:  # a sweep with nothing new leaves the file (and the tree) as it was
            atomic_write_json(path, manifest)
    return path


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """The ``sweep.json`` of a sweep folder (``{}`` if there is none)."""
    path = Path(folder) / SWEEP_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def portable_paths(text: str) -> str:
    """``text`` with this machine's folders written portably: the repository's own files relative to its root,
    the Python installation's as ``<python>/...``, so that a committed error record names no machine."""
    repo = str(REPO) + os.sep
    for prefix in sorted({sys.prefix, sys.base_prefix}, key=len, reverse=True):
        text = text.replace(prefix + os.sep, "<python>" + os.sep)
    return text.replace(repo, "")


def record_error(
    point_cfg, run_id: str, err: BaseException | str, log: str | None = None
) -> Path:
    """Write ``<out>/<run_id>.error.json``: the error, its traceback and the number of attempts so far."""
    from doran.results import atomic_write_json

    path = Path(point_cfg.out) / f"{run_id}.error.json"
    attempts = 1
    if path.is_file():
        try:
            attempts = int(json.loads(path.read_text()).get("attempts", 0)) + 1
        except (ValueError, OSError):
            pass
    if isinstance(err, BaseException):
        kind, message = type(err).__name__, str(err)
        tb = portable_paths("".join(traceback.format_exception(type(err), err, err.__traceback__)))
    else:
        kind, message, tb = "WorkerError", err, None
    atomic_write_json(
        path,
        {
            "run_id": run_id,
            "error": kind,
            "message": message,
            "traceback": tb,
            "log_tail": portable_paths(log) if log else log,
            "attempts": attempts,
            "at": _now(),
            "host": os.uname().nodename,
        },
    )
    return path


def find_finished(point: Point, results_dir: Path) -> Path | None:
    """A completed result with ``point.run_id`` in another sweep folder of the same profile (and task), if any.

    The sweep folders of a profile are the siblings of ``point.out``: ``<results>/<profile>/<sweep>``, or
    ``<results>/<profile>/<task>/<sweep>`` for a multi-task profile.
    """
    from doran.results import find_result, read_json

    profile_dir = Path(point.out).parent
    for folder in sorted(p for p in profile_dir.glob("*") if p.is_dir() and p != Path(point.out)):
        candidate = find_result(folder, point.run_id)
        if candidate is None:
            continue
        try:
            data = read_json(candidate)
        except (ValueError, OSError):
            continue
        if data.get("status") == "completed":
            return candidate
    return None


#: errors by which the library refuses a configuration it cannot adapt (DoRA on a weight with zero rows): the
#: same point refuses again, so a sweep keeps the record as the run's outcome and does not retry it
#: (``--retry-failed`` does)
REFUSALS = ("InjectError",)


def _refused(error_path: Path) -> bool:
    try:
        return json.loads(error_path.read_text()).get("error") in REFUSALS
    except (ValueError, OSError):
        return False


def state(point: Point) -> str:
    """``done`` (result exists), ``diverged`` (result with status failed), ``refused`` (the library rejected the
    configuration: ``REFUSALS``), ``error`` (raised otherwise), ``todo``."""
    from doran.results import read_json

    if point.result_path.is_file():
        try:
            status = read_json(point.result_path).get("status")
        except (ValueError, OSError, EOFError):
            return "todo"
        return "done" if status == "completed" else "diverged"
    if point.error_path.is_file():
        return "refused" if _refused(point.error_path) else "error"
    return "todo"


def _quiet() -> None:
    """Silence Lightning's per-run banners and the known harmless warnings (the progress bar stays readable)."""
    import logging
    import warnings

    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings(
        "ignore", message=".*(weights_only|LeafSpec|num_workers|does not have many workers).*"
    )


def run_point(cfg, run_id: str) -> str:
    """Run one grid point in this process; an exception is recorded (``.error.json``), not raised.

    Returns the new state: ``done``, ``diverged``, ``refused`` or ``error``. KeyboardInterrupt propagates.
    """
    from experiments.run import run

    try:
        result = run(cfg, verbose=False)
    except Exception as err:
        record_error(cfg, run_id, err)
        return "refused" if type(err).__name__ in REFUSALS else "error"
    except SystemExit as err:
        # Lightning turns Ctrl-C into sys.exit(1) after ignoring SIGINT: restore Ctrl-C, report an interrupt
        signal.signal(signal.SIGINT, signal.default_int_handler)
        raise KeyboardInterrupt(f"run {run_id} interrupted") from err
    error_file = Path(cfg.out) / f"{run_id}.error.json"
    error_file.unlink(missing_ok=True)
    return "done" if result["status"] == "completed" else "diverged"


@dataclass
class Outcome:
    """What one sweep invocation did."""

    total: int = 0
    skipped: int = 0
    reused: int = 0
    done: int = 0
    diverged: int = 0
    errors: int = 0
    not_started: int = 0
    refused: int = 0
    failed_ids: list[str] = field(default_factory=list)

    def count(self, run_id: str, new_state: str) -> None:
        """Count a run that just ended in ``new_state``; an error is listed in ``failed_ids``."""
        attr = new_state if new_state in ("done", "diverged", "refused") else "errors"
        setattr(self, attr, getattr(self, attr) + 1)
        if attr == "errors":
            self.failed_ids.append(run_id)

    def line(self) -> str:
        refused = f", {self.refused} refused (the library rejects the configuration; kept)" if self.refused else ""
        return (
            f"{self.total} runs: {self.skipped} already finished, {self.reused} reused from other sweeps, "
            f"{self.done} completed, {self.diverged} diverged (NaN, kept){refused}, {self.errors} errors "
            f"(retried next time), {self.not_started} not started (time limit)"
        )


def usable_cpus() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def threads_per_job(jobs: int, threads: int | None = None) -> int | None:
    """torch CPU threads for each of ``jobs`` concurrent runs: ``threads`` if given, else the usable cores
    divided among the jobs (at least 1); ``None`` (torch's default) for one job.

    Each torch process otherwise starts one OpenMP thread per core. Several such processes on one machine
    oversubscribe the cores, and OpenMP's barriers then wait on threads that are not scheduled: on a 16-core
    GPU host, 12 concurrent vision runs each took about 10 s an optimizer step instead of about 0.05 s.
    """
    if threads:
        return int(threads)
    return max(1, usable_cpus() // jobs) if jobs > 1 else None


def _pool_worker(tasks, results, env: dict[str, str], threads: int | None) -> None:
    """A long-lived worker process (``--jobs``): runs the grid points it is sent, one at a time.

    Imports, CUDA initialisation and data loading are paid once per worker, not once per run. Each run's
    output goes to ``<out>/logs/<run_id>.log``. ``env`` (CUDA_VISIBLE_DEVICES) is set before torch loads.
    """
    from experiments.assets import use_local_assets

    os.environ.update(env)
    _quiet()
    use_local_assets()
    if threads:
        import torch

        torch.set_num_threads(threads)
    while True:
        task = tasks.get()
        if task is None:
            return
        cfg, run_id = task
        logs = Path(cfg.out) / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        sys.stdout.flush()
        sys.stderr.flush()
        saved = os.dup(1), os.dup(2)
        with open(logs / f"{run_id}.log", "a", encoding="utf-8") as log:
            os.dup2(log.fileno(), 1)
            os.dup2(log.fileno(), 2)
            try:
                new_state = run_point(cfg, run_id)
            except KeyboardInterrupt:
                new_state = "interrupted"
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os.dup2(saved[0], 1)
                os.dup2(saved[1], 2)
        results.put((run_id, new_state))
        if new_state == "interrupted":
            return


def _tail(path: Path, n: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


def unfinished(points: Sequence[Point], results_dir: Path, retry_failed: bool, reuse: bool,
               out: Outcome) -> list[Point]:
    """The points still to run, counted into ``out``: finished runs skipped, identical finished runs of other
    sweeps copied (``reuse``), diverged and refused runs re-run only with ``retry_failed``."""
    from doran.results import atomic_write_json, read_json

    todo = []
    for p in points:
        s = state(p)
        if s == "diverged" and retry_failed:
            p.result_path.unlink()
            s = "todo"
        if s == "refused" and retry_failed:
            s = "error"  # its record stays until the run ends (it counts the attempts)
        if s in ("done", "diverged", "refused"):
            out.skipped += 1
            continue
        if reuse and (found := find_finished(p, results_dir)) is not None:
            atomic_write_json(p.result_path, read_json(found))
            p.error_path.unlink(missing_ok=True)
            out.reused += 1
            continue
        todo.append(p)
    return todo


def run_points(points: Sequence[Point], **options) -> Outcome:
    """Run every unfinished point of one grid: :func:`run_groups` with that grid alone (same options)."""
    return run_groups([points], **options)[0]


def run_key(point: Point) -> tuple[str, str]:
    """What makes two grids' points one run: the same run_id in the same profile (and task) folder."""
    return str(Path(point.out).parent), point.run_id


def run_groups(
    groups: Sequence[Sequence[Point]],
    *,
    jobs: int = 1,
    gpus: Sequence[str] = (),
    device: str = "auto",
    threads: int | None = None,
    results_dir: Path = RESULTS_DIR,
    retry_failed: bool = False,
    reuse: bool = True,
    time_limit: float | None = None,
    progress: bool | None = None,
    longest_first: bool = False,
) -> list[Outcome]:
    """Run every unfinished point of several grids (sweeps, tasks of a suite); one ``Outcome`` per grid.

    Runs go in this process (``jobs=1`` and no ``gpus``) or on ``jobs`` worker processes. Worker ``i`` sees GPU
    ``gpus[i % len(gpus)]`` (``CUDA_VISIBLE_DEVICES``), so ``jobs=4, gpus=["0", "1"]`` puts two runs at a time
    on each of two GPUs. ``threads`` defaults to the cores divided among the jobs (``threads_per_job``). A
    worker that dies (out of memory, killed) has its run recorded as an error and is replaced. No new run
    starts after ``time_limit`` seconds.

    The unfinished points of every grid share one pool of workers, so no worker waits for the last runs of one
    grid while another grid has runs to do, and the workers load their libraries once. A point whose run_id
    another grid of the same profile (and task) also has to run is run once: the later copy waits, then copies
    the finished result (``reuse``), and runs itself only where that run did not complete.

    Runs start in grid order (seed by seed: a sweep stopped early leaves whole seeds), or with
    ``longest_first`` by estimated cost, longest first: the pool then ends with short runs, so it finishes
    sooner and a deadline cuts fewer runs short (it leaves the cheap runs undone instead).
    """
    outs = [Outcome(total=len(points)) for points in groups]
    owner: dict[int, int] = {}
    first: list[Point] = []
    waiting: list[tuple[int, Point]] = []
    seen: set[tuple[str, str]] = set()
    for g, points in enumerate(groups):
        for p in unfinished(points, results_dir, retry_failed, reuse, outs[g]):
            key = run_key(p)
            if reuse and key in seen:
                waiting.append((g, p))
                continue
            seen.add(key)
            owner[id(p)] = g
            first.append(p)
    if not first and not waiting:
        return outs
    if longest_first:
        first.sort(key=lambda p: -p.cost)  # stable: grid order among equal costs
    every = [p for points in groups for p in points]
    todo_ids = {id(p) for p in first} | {id(p) for _, p in waiting}
    bar = Progress(
        sum(p.cost for p in every),
        sum(p.cost for p in every if id(p) not in todo_ids),
        len(every),
        len(every) - len(todo_ids),
        progress,
    )
    start = time.monotonic()

    def expired() -> bool:
        return time_limit is not None and time.monotonic() - start > time_limit

    def count(p: Point, new_state: str, seconds: float) -> None:
        outs[owner[id(p)]].count(p.run_id, new_state)
        bar.update(p, new_state, seconds)

    def skip(p: Point) -> None:
        outs[owner[id(p)]].not_started += 1

    try:
        _execute(first, jobs, gpus, device, threads, count, skip, expired)
        second = []
        for g, p in waiting:  # the twin has run: copy its result, or run this one where it did not complete
            owner[id(p)] = g
            if unfinished([p], results_dir, retry_failed, reuse, outs[g]):
                second.append(p)
            else:
                bar.update(p, "reused", 0.0)
        _execute(second, jobs, gpus, device, threads, count, skip, expired)
    finally:
        bar.close()
    return outs


def _execute(todo: list[Point], jobs: int, gpus: Sequence[str], device: str, threads: int | None,
             count, skip, expired) -> None:
    """Run ``todo`` here (one job, no GPUs) or on a pool; ``count`` each ended run, ``skip`` each not started."""
    if not todo:
        return
    threads = threads_per_job(max(1, jobs), threads)
    if jobs <= 1 and not gpus:
        _quiet()
        if threads:
            import torch

            torch.set_num_threads(threads)
        for i, p in enumerate(todo):
            if expired():
                for q in todo[i:]:
                    skip(q)
                break
            t0 = time.monotonic()
            count(p, run_point(p.cfg, p.run_id), time.monotonic() - t0)
    else:
        _run_parallel(
            todo, jobs=max(1, jobs), gpus=list(gpus), device=device, threads=threads, count=count,
            expired=expired, skip=skip,
        )


class _Worker:
    """One pool process, its task queue and the point it is running."""

    def __init__(self, ctx, results, env: dict[str, str], threads: int | None):
        self.ctx, self.results, self.env, self.threads = ctx, results, env, threads
        self.tasks = ctx.Queue()
        self.proc = ctx.Process(target=_pool_worker, args=(self.tasks, results, env, threads), daemon=True)
        self.proc.start()
        self.point: Point | None = None
        self.t0 = 0.0

    def send(self, point: Point) -> None:
        self.point, self.t0 = point, time.monotonic()
        self.tasks.put((point.cfg, point.run_id))

    def stop(self, timeout: float = 20.0) -> None:
        if self.proc.is_alive():
            self.tasks.put(None)
            self.proc.join(timeout)
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(5)


def _run_parallel(
    todo: list[Point],
    *,
    jobs: int,
    gpus: list[str],
    device: str,
    threads: int | None,
    count,
    expired,
    skip,
) -> None:
    """Run ``todo`` on ``jobs`` worker processes (spawned: each sets its GPU before torch is imported)."""
    import multiprocessing as mp
    import queue as queue_mod

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    queue = list(todo)

    def env_of(slot: int) -> dict[str, str]:
        env = {"TOKENIZERS_PARALLELISM": "false"}
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = gpus[slot % len(gpus)]
        elif device == "cpu":
            env["CUDA_VISIBLE_DEVICES"] = ""
        return env

    workers = [_Worker(ctx, results, env_of(i), threads) for i in range(jobs)]
    try:
        while True:
            for w in workers:
                if w.point is None and queue:
                    if expired():
                        for p in queue:
                            skip(p)
                        queue.clear()
                    else:
                        w.send(queue.pop(0))
            if not queue and all(w.point is None for w in workers):
                break
            try:
                run_id, new_state = results.get(timeout=0.5)
            except queue_mod.Empty:
                run_id = new_state = None
            if run_id is not None:
                w = next(w for w in workers if w.point is not None and w.point.run_id == run_id)
                if new_state == "interrupted":
                    raise KeyboardInterrupt(f"run {run_id} interrupted")
                point, w.point = w.point, None
                count(point, new_state, time.monotonic() - w.t0)
            for i, w in enumerate(workers):
                if w.point is not None and not w.proc.is_alive():
                    # killed (out of memory, a signal) before it could record anything itself
                    point, log = w.point, w.point.out / "logs" / f"{w.point.run_id}.log"
                    record_error(
                        point.cfg, point.run_id, f"worker exited with status {w.proc.exitcode}", _tail(log)
                    )
                    count(point, "error", time.monotonic() - w.t0)
                    workers[i] = _Worker(ctx, results, w.env, threads)
    except BaseException:
        for w in workers:  # Ctrl-C / kill: stop the runs in progress (they resume from their checkpoints)
            if w.proc.is_alive():
                w.proc.terminate()
        for w in workers:
            w.proc.join(10)
        raise
    finally:
        for w in workers:
            w.stop()


