"""A sweep's grid on a cluster: one submitit job per unfinished run, with the local runner's guarantees.

    python -m experiments.sweep ablation_tau --profile default --backend submitit \\
        --cluster-partition gpu --cluster-gpus 1 --cluster-time 120 --cluster-max-jobs 16
    python -m experiments.sweep all --profile default --backend submitit --cluster-no-wait   # submit, return

``--backend submitit`` hands the grid to submitit: SLURM where ``srun`` exists (a job array, at most
``--cluster-max-jobs`` jobs at a time), its local executor elsewhere (subprocesses of this machine, the same
limit kept by this process). Each job runs ``experiments.runner.run_point`` on one grid point, so results land
where local runs land: ``<results>/<profile>/<sweep>/<run_id>.json.gz``, written atomically by the run.

Nothing is lost, as with the local runner:

* finished runs (``done``, ``diverged``) are skipped and identical runs of other sweeps reused, before
  anything is submitted;
* a run that raises is recorded by the job in ``<run_id>.error.json``; a job that dies without a word (killed,
  out of memory, over its time limit too often) is recorded there by the submitting command, with the tail of
  the job's stderr; either way the next invocation resubmits it;
* on a time-out or a preemption signal (SIGUSR2, ``--cluster-signal-delay`` seconds before the time limit)
  submitit requeues the job (at most three time-outs) and the run resumes from
  ``<out>/<run_id>/checkpoints/last.ckpt``;
* each submitted job is noted in ``<out>/logs/jobs/<run_id>.json`` (job id, log files): a later invocation
  waits for a job still queued or running instead of submitting the run twice, and records the error of one
  that died while nobody was waiting.

The submitting command waits for its jobs (a progress line per finished run and the summary line of the
local runner) unless ``--cluster-no-wait`` is given; the same command run later collects what finished,
resubmits what failed and waits for the rest. submitit's own files (pickled jobs, stdout, stderr) go to
``--cluster-logs`` (default ``<out>/logs/submitit``), one folder per job id.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from experiments.grid import Point, SweepError
from experiments.runner import Outcome, record_error, run_point, state, unfinished

try:  # the local backend needs no submitit; `--backend submitit` says how to install it
    from submitit.helpers import Checkpointable
except ImportError:  # pragma: no cover
    Checkpointable = object  # type: ignore[assignment,misc]

__all__ = ["ClusterOptions", "ClusterOutcome", "PointJob", "add_cluster_arguments", "cluster_options",
           "run_on_cluster"]

#: the local executor restarts a task that exits with this status (submitit's own constant)
LOCAL_REQUEUE_STATUS = 144
#: states of a SLURM job that has not ended (sacct's and squeue's words); PREEMPTED is not one of them: a
#: preempted job that SLURM requeues is PENDING again, one that it does not requeue stays PREEMPTED
UNENDED = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED", "REQUEUE_HOLD",
           "REQUEUE_FED", "RESIZING", "READY", "SIGNALING", "STAGE_OUT", "STOPPED", "UNKNOWN"}
#: states of a SLURM job whose process ended by itself (it wrote its result file, maybe not yet visible here)
ENDED_NORMALLY = {"COMPLETED", "COMPLETING", "FAILED"}


@dataclass
class ClusterOptions:
    """Where and how the jobs run (``--cluster-*`` on the command line)."""

    executor: str | None = None  # slurm | local | None: submitit decides (SLURM where srun exists)
    logs: Path | None = None  # submitit's folder (default: <out>/logs/submitit), one subfolder per job
    partition: str | None = None  # SLURM partition
    gpus: int = 1  # GPUs per job (0 on CPU nodes)
    cpus: int | None = None  # CPUs per job (default: the cluster's)
    mem_gb: float | None = None  # memory per job (default: the cluster's)
    time_min: float = 120.0  # time limit per job in minutes (SLURM rounds up to whole minutes)
    signal_delay_s: int | None = None  # SIGUSR2 this long before the limit (default: SLURM 90 s, local 30 s)
    max_jobs: int = 16  # jobs running at once (a SLURM array's %N)
    extra: dict[str, Any] = field(default_factory=dict)  # any other submitit parameter, e.g. slurm_account
    wait: bool = True  # wait for the jobs (False: submit and return)
    poll_s: float = 5.0  # seconds between two looks at the jobs
    device: str = "auto"  # auto | cpu | cuda, as the local runner's --device
    threads: int | None = None  # torch CPU threads per run


@dataclass
class ClusterOutcome(Outcome):
    """The local runner's ``Outcome``, plus the jobs submitted and those left running."""

    submitted: int = 0
    running: int = 0  # jobs not waited for (--cluster-no-wait): the same command collects them later

    def line(self) -> str:
        line = super().line()
        if self.running:
            line += (f"; {self.running} jobs queued or running, not waited for (run the same command again "
                     "to collect them)")
        return line


# ---------------------------------------------------------------------------------------------------------
# The job
# ---------------------------------------------------------------------------------------------------------

_REQUEUE_ASKED: list[bool] = []  # set in the job when submitit's signal handler checkpoints (requeues) it


class PointJob(Checkpointable):
    """What one cluster job runs: ``runner.run_point(cfg, run_id)``, on the job's node and GPU.

    Checkpointable: on a time-out or a preemption signal submitit calls ``checkpoint`` (the same call again),
    requeues the job and stops this process; the requeued job calls ``run_point`` again, and the run resumes
    from its own ``last.ckpt`` (written at every epoch end, and every ``runtime.ckpt_every_n_steps`` steps).
    Returns the run's new state: ``done``, ``diverged`` or ``error`` (recorded in ``<run_id>.error.json``).
    """

    def __init__(self, device: str = "auto", threads: int | None = None) -> None:
        self.device, self.threads = device, threads

    def __call__(self, cfg, run_id: str) -> str:
        if self.device == "cpu":
            os.environ["CUDA_VISIBLE_DEVICES"] = ""
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        from experiments.assets import use_local_assets

        use_local_assets()  # $DORAN_MINILM_DIR / $DORAN_ROTTEN_TOMATOES_FILE, exported by the submitter
        if self.threads:
            import torch

            torch.set_num_threads(self.threads)
        gpus = os.environ.get("CUDA_VISIBLE_DEVICES")
        gpus = "all visible" if gpus is None else gpus or "none"
        print(f"[cluster] {run_id} on {socket.gethostname()} (GPUs: {gpus}) -> {cfg.out}", flush=True)
        try:
            new_state = run_point(cfg, run_id)
        except KeyboardInterrupt:
            # a signal stopped the run (its checkpoint is kept); submitit asked for a requeue: leave so that
            # it happens (the local executor restarts a task that exits with its requeue status)
            if _REQUEUE_ASKED:
                print(f"[cluster] {run_id}: stopped for a requeue; the run resumes from its checkpoint",
                      flush=True)
                local = os.environ.get("SUBMITIT_EXECUTOR") == "local"
                raise SystemExit(LOCAL_REQUEUE_STATUS if local else -1) from None
            raise
        print(f"[cluster] {run_id}: {new_state}", flush=True)
        return new_state

    def checkpoint(self, cfg, run_id: str):
        """Called by submitit's signal handler: requeue the same call (the run keeps its own checkpoints)."""
        _REQUEUE_ASKED.append(True)
        return super().checkpoint(cfg, run_id)


# ---------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------


def _key_value(text: str) -> tuple[str, Any]:
    import yaml

    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    return key.strip(), yaml.safe_load(value)


def add_cluster_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``--cluster-*`` options of ``python -m experiments.sweep`` (used with ``--backend submitit``)."""
    group = parser.add_argument_group("cluster (--backend submitit; docs/cluster.md)")
    group.add_argument("--cluster-executor", choices=("auto", "slurm", "local"), default="auto",
                       help="submitit executor (auto: SLURM where srun exists, else local subprocesses)")
    group.add_argument("--cluster-partition", default=None, help="SLURM partition")
    group.add_argument("--cluster-gpus", type=int, default=1, help="GPUs per job (default 1; 0 with --device cpu)")
    group.add_argument("--cluster-cpus", type=int, default=None, help="CPUs per job (default: the cluster's)")
    group.add_argument("--cluster-mem-gb", type=float, default=None, help="memory per job in GB")
    group.add_argument("--cluster-time", type=float, default=120.0,
                       help="time limit per job in minutes (default 120); a job over it is requeued and resumes")
    group.add_argument("--cluster-signal-delay", type=int, default=None,
                       help="seconds before the time limit at which a job checkpoints and is requeued "
                       "(default: 90 on SLURM)")
    group.add_argument("--cluster-max-jobs", type=int, default=16, help="jobs running at once (default 16)")
    group.add_argument("--cluster-logs", default=None,
                       help="submitit's folder: pickled jobs, stdout and stderr (default <out>/logs/submitit)")
    group.add_argument("--cluster-set", nargs="+", default=[], type=_key_value, metavar="KEY=VALUE",
                       help="other submitit parameters, e.g. slurm_account=abc slurm_qos=high "
                       "slurm_constraint=a100 'slurm_setup=[module load cuda]'")
    group.add_argument("--cluster-no-wait", action="store_true",
                       help="submit and return; the same command later collects the results")
    group.add_argument("--cluster-poll", type=float, default=None,
                       help="seconds between two looks at the jobs (default: 30 on SLURM, 1 locally)")


def cluster_options(args: argparse.Namespace) -> ClusterOptions:
    """The ``ClusterOptions`` of a parsed sweep command line."""
    if args.cluster_max_jobs < 1 or args.cluster_time <= 0 or args.cluster_gpus < 0:
        raise SweepError("--cluster-max-jobs and --cluster-time must be > 0, --cluster-gpus >= 0")
    executor = None if args.cluster_executor == "auto" else args.cluster_executor
    return ClusterOptions(
        executor=executor,
        logs=None if args.cluster_logs is None else Path(args.cluster_logs),
        partition=args.cluster_partition,
        gpus=0 if args.device == "cpu" else args.cluster_gpus,
        cpus=args.cluster_cpus,
        mem_gb=args.cluster_mem_gb,
        time_min=args.cluster_time,
        signal_delay_s=args.cluster_signal_delay,
        max_jobs=args.cluster_max_jobs,
        extra=dict(args.cluster_set),
        wait=not args.cluster_no_wait,
        poll_s=args.cluster_poll if args.cluster_poll is not None else -1.0,
        device=args.device,
        threads=args.threads,
    )


# ---------------------------------------------------------------------------------------------------------
# Submitting and following the jobs
# ---------------------------------------------------------------------------------------------------------


def _executor(opts: ClusterOptions, folder: Path, name: str):
    try:
        import submitit
    except ImportError:
        raise SweepError("--backend submitit needs submitit: pip install -r requirements.txt") from None
    try:
        executor = submitit.AutoExecutor(folder=str(folder / "%j"), cluster=opts.executor)
    except (RuntimeError, ValueError) as err:
        raise SweepError(f"--cluster-executor {opts.executor}: {err}") from None
    params: dict[str, Any] = {
        "name": name,
        "timeout_min": max(1, math.ceil(opts.time_min)),
        "local_timeout_min": opts.time_min,  # the local executor takes fractions of a minute
        "nodes": 1,
        "tasks_per_node": 1,
        "gpus_per_node": opts.gpus or None,  # 0: no GPU asked for (nor a --gpus-per-node=0 line)
        "cpus_per_task": opts.cpus,
        "mem_gb": opts.mem_gb,
        "slurm_partition": opts.partition,
        "slurm_array_parallelism": opts.max_jobs,
        "slurm_signal_delay_s": opts.signal_delay_s,
        "local_signal_delay_s": opts.signal_delay_s,
    }
    params.update(opts.extra)
    try:
        executor.update_parameters(**params)
    except (NameError, ValueError, AssertionError) as err:
        raise SweepError(f"cluster parameters: {err}") from None
    return executor


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _record_path(point: Point) -> Path:
    return point.out / "logs" / "jobs" / f"{point.run_id}.json"


def _write_record(point: Point, job, executor: str, folder: Path) -> dict[str, Any]:
    from doran.results import atomic_write_json

    record = {"run_id": point.run_id, "job_id": str(job.job_id), "executor": executor,
              "folder": str(folder / "%j"), "stdout": str(job.paths.stdout), "stderr": str(job.paths.stderr),
              "submitted_at": _now(), "host": socket.gethostname(), "collected": False}
    atomic_write_json(_record_path(point), record)
    return record


@dataclass
class _Tracked:
    """A submitted job and its grid point."""

    point: Point
    job: Any  # a submitit Job
    record: dict[str, Any]
    t0: float = field(default_factory=time.monotonic)
    earlier: bool = False  # submitted by an earlier invocation

    def finished(self) -> bool:
        if self.job.paths.result_pickle.exists():
            return True
        if self.record["executor"] == "local" and getattr(self.job, "_process", None) is None:
            return not _local_alive(self.record)  # a local job of an earlier invocation: its controller
        try:
            if self.job.done():
                return True
        except Exception:  # a scheduler that did not answer: ask again later
            return False
        return self.record["executor"] == "slurm" and _slurm_state(self.job) not in UNENDED


def _slurm_state(job) -> str:
    """The state of a SLURM job (first word, upper case): from sacct through submitit, else from squeue (for
    clusters without accounting, where sacct says nothing); ``ENDED`` if SLURM no longer knows the job."""
    import subprocess

    try:
        found = str(job.state).split()[0].upper()  # "CANCELLED by 123" -> CANCELLED
    except Exception:
        found = "UNKNOWN"
    if found != "UNKNOWN":
        return found
    try:
        proc = subprocess.run(["squeue", "--noheader", "--states=all", "--jobs", str(job.job_id), "--format=%T"],
                              capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return "UNKNOWN"
    if proc.returncode != 0:
        return "ENDED" if "invalid job id" in proc.stderr.lower() else "UNKNOWN"
    lines = proc.stdout.split()
    return lines[0].upper() if lines else "ENDED"


def _local_alive(record: dict[str, Any]) -> bool:
    """Whether the local controller process of ``record`` still runs (on this machine)."""
    if record.get("host") != socket.gethostname():
        return False
    try:
        cmdline = Path(f"/proc/{int(record['job_id'])}/cmdline").read_bytes()
    except (OSError, ValueError):
        return False
    return b"submitit" in cmdline


def _reattach(record: dict[str, Any]):
    """The submitit job of an earlier invocation's record."""
    import submitit

    cls = submitit.SlurmJob if record["executor"] == "slurm" else submitit.LocalJob
    return cls(folder=record["folder"], job_id=record["job_id"])


def _tail(text: str | None, n: int = 3000) -> str | None:
    return None if text is None else text[-n:]


def _collect(t: _Tracked) -> str:
    """The new state of a finished job's run; records the error of a job that raised or died silently."""
    from doran.results import atomic_write_json

    job, point = t.job, t.point

    def job_state() -> str:
        if t.record["executor"] == "slurm":
            return _slurm_state(job)
        try:
            return str(job.state)
        except Exception:
            return "UNKNOWN"

    if not job.paths.result_pickle.exists() and t.record["executor"] == "slurm" and job_state() in ENDED_NORMALLY:
        deadline = time.monotonic() + 15.0  # a job that ended by itself wrote a result: a shared disk may lag
        while not job.paths.result_pickle.exists() and time.monotonic() < deadline:
            time.sleep(1.0)
    try:
        log = _tail(job.stderr()) or _tail(job.stdout())
    except OSError:
        log = None
    if state(point) in ("done", "diverged"):  # the run wrote its result (the job may have died just after)
        new_state = state(point)
        point.error_path.unlink(missing_ok=True)
    elif job.paths.result_pickle.exists():
        try:
            new_state = str(job.result())
        except Exception as err:  # the job raised outside the run (e.g. timed out too many times)
            record_error(point.cfg, point.run_id, err, log)
            new_state = "error"
    else:
        record_error(
            point.cfg, point.run_id,
            f"job {job.job_id} ended without a result (state {job_state()}): killed, out of memory or "
            f"cancelled; its logs: {job.paths.stderr}",
            log,
        )
        new_state = "error"
    atomic_write_json(_record_path(point), {**t.record, "collected": True, "state": new_state,
                                            "collected_at": _now()})
    return new_state


def run_on_cluster(
    points: Sequence[Point],
    opts: ClusterOptions,
    *,
    results_dir: Path,
    retry_failed: bool = False,
    reuse: bool = True,
    progress: bool | None = None,
) -> ClusterOutcome:
    """Submit one job per unfinished point of ``points`` and (unless ``opts.wait`` is False) wait for them."""
    from experiments.progress import Progress

    out = ClusterOutcome(total=len(points))
    todo = unfinished(points, results_dir, retry_failed, reuse, out)
    if not todo:
        return out
    folder = Path(opts.logs) if opts.logs is not None else todo[0].out / "logs" / "submitit"
    executor = _executor(opts, folder, f"doran-{todo[0].sweep}")
    kind = executor.cluster
    poll = opts.poll_s if opts.poll_s > 0 else (30.0 if kind == "slurm" else 1.0)
    bar = Progress(sum(p.cost for p in points), sum(p.cost for p in points if p not in todo), len(points),
                   len(points) - len(todo), progress)

    def count(p: Point, new_state: str, seconds: float) -> None:
        out.count(p.run_id, new_state)
        bar.update(p, new_state, seconds)

    active: list[_Tracked] = []
    queue: list[Point] = []
    try:
        # 1. jobs submitted by an earlier invocation: wait for those still queued or running, collect the others
        failed_before = 0
        for p in todo:
            record = _read_record(p)
            if record is None or record.get("collected"):
                queue.append(p)
                continue
            t = _Tracked(p, _reattach(record), record, earlier=True)
            if not t.finished():
                active.append(t)
            elif (new_state := _collect(t)) in ("done", "diverged", "refused"):  # finished since the grid was read
                count(p, new_state, 0.0)
            else:  # its error is recorded (by the job, or just now): submitted again
                failed_before += 1
                queue.append(p)
        if active:
            print(f"[sweep] {len(active)} jobs of an earlier invocation are still queued or running: not "
                  "submitted again", flush=True)
        if failed_before:
            print(f"[sweep] {failed_before} jobs of an earlier invocation failed (recorded in "
                  "<run_id>.error.json): submitted again", flush=True)
        # 2. submit: SLURM takes the whole queue as one array (at most max_jobs at a time); the local executor
        # has no queue, so this process starts max_jobs at a time (all at once with --cluster-no-wait)
        def submit(batch: list[Point]) -> None:
            if not batch:
                return
            fn = PointJob(opts.device, opts.threads)
            try:
                jobs = executor.map_array(fn, [p.cfg for p in batch], [p.run_id for p in batch])
            except Exception as err:  # sbatch refused (partition, account, limits...): say what it said
                raise SweepError(f"submitting {len(batch)} jobs to {kind} failed: {err}") from None
            for p, job in zip(batch, jobs):
                active.append(_Tracked(p, job, _write_record(p, job, kind, folder)))
            out.submitted += len(batch)
            ids = [str(j.job_id) for j in jobs]
            shown = ids[0].split("_")[0] + f"_[0-{len(ids) - 1}]" if "_" in ids[0] else ", ".join(ids)
            print(f"[sweep] submitted {len(batch)} jobs to {kind} ({shown}); logs: {folder}", flush=True)

        if kind == "local" and opts.wait:
            room = max(0, opts.max_jobs - len(active))
            submit(queue[:room])
            queue = queue[room:]
        else:
            submit(queue)
            queue = []
        if not opts.wait:
            out.running = len(active)
            bar.close()
            print(f"[sweep] not waiting: {len(active)} jobs; follow them with `squeue --me` (SLURM) or their "
                  f"logs in {folder}; run the same command again to collect finished runs and resubmit "
                  "failed ones", flush=True)
            return out
        # 3. wait
        while active or queue:
            for t in list(active):
                if t.finished():
                    active.remove(t)
                    count(t.point, _collect(t), time.monotonic() - t.t0)
            if queue and len(active) < opts.max_jobs:
                room = opts.max_jobs - len(active)
                submit(queue[:room])
                queue = queue[room:]
            if active:
                time.sleep(poll)
    except KeyboardInterrupt:
        if active:
            print(f"\n[sweep] stopped waiting: {len(active)} jobs keep running on {kind} (the same command "
                  "collects them later)", file=sys.stderr)
        raise
    finally:
        bar.close()
    return out


def _read_record(point: Point) -> dict[str, Any] | None:
    path = _record_path(point)
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
