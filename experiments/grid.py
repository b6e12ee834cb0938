"""Grids: profiles (backbone, data, budget), sweep specs (variants x seeds x fractions), tuned
hyper-parameters, and the one resolved ``RunConfig`` of every grid point.

The run config of a grid point is built in one pass (``experiments.config.load``), each layer merged over the
previous one::

    RunConfig defaults < profile config file < profile ``run:`` < tuned/<profile>/<method>.yaml
    < variant ``set:`` < ``--set KEY=VALUE`` < the point's method, seed, fraction and out

The fraction goes into the config and nowhere else: the run draws its subset and computes its length from it
(``train.min_steps``). The grid reads each data set once (cached) for the run ids, which cover the data's
content, and for the cost of each run (the progress bar's ETA).
"""

from __future__ import annotations

import functools
import json
import math
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from doran.errors import ConfigError, DoranError
from experiments.config import RunConfig, load, parse_overrides, unflatten
from experiments.constants import PROFILE_DIR, REPO, RESULTS_DIR, SWEEP_DIR, TUNED_DIR, all_methods


class SweepError(ConfigError):
    """A bad sweep, profile or command-line value; the message names it and the valid choices."""


@dataclass
class Profile:
    """Backbone, data and budget: the run config every sweep of the profile starts from.

    ``config``: a run config file (or None); ``run``: a nested mapping of run-config keys merged over it;
    ``seeds``: the default seeds; ``tune``: settings of ``experiments.tune`` (trials, fraction, seeds, ...).
    """

    name: str
    path: Path
    config: Path | None = None
    run: dict[str, Any] = field(default_factory=dict)
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])
    tune: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    tasks: list[str] = field(default_factory=list)  # a multi-task profile: the tasks a target runs by default
    task_settings: dict[str, dict[str, Any]] = field(default_factory=dict)  # per task: dotted run-config keys
    family: str = ""  # the profile file's name (a task's view keeps it: sweep files' profiles.<family> sections)
    tuned_from: str | None = None  # take tuned hyper-parameters from this profile's files instead of its own

    def for_task(self, task: str) -> Profile:
        """This profile on one of its tasks: named ``<profile>/<task>``, so that its results, tuned files and
        figures live in folders of their own (``results/<profile>/<task>/<sweep>/``), with ``data.task`` and
        the task's own settings merged over ``run``."""
        if not self.tasks:
            raise SweepError(f"profile {self.name} runs one data set, not tasks; drop --tasks (or TASKS=)")
        run = _deep_merge(self.run, {"data": {"task": task}})
        run = _deep_merge(run, unflatten(self.task_settings.get(task, {})))
        return Profile(name=f"{self.name}/{task}", path=self.path, config=self.config, run=run, seeds=self.seeds,
                       tune=self.tune, description=f"{self.description}: {task}", family=self.family or self.name,
                       tuned_from=f"{self.tuned_from}/{task}" if self.tuned_from else None)


def _deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        out[key] = _deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


@dataclass
class Variant:
    """One curve or bar of a sweep: a method preset plus overrides, and tags that the figures group by."""

    label: str
    method: str
    set: dict[str, Any] = field(default_factory=dict)  # dotted run-config keys -> values
    tuned: str | None = None  # the method whose tuned hyper-parameters apply (default: ``method``)
    tags: dict[str, Any] = field(default_factory=dict)
    match: str | None = None  # another variant's label: take the rank whose adapter parameters come closest to it


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
    defined: list[Variant] = field(default_factory=list)  # every variant of the file (``match`` targets)
    #: a profile whose tuned files every task of this sweep reads (``profiles.<family>.tuned_from``);
    #: ``"none"``: no tuned files, every variant at the profile's own values
    tuned_from: str | None = None

    def tuned_source(self, profile: Profile) -> str:
        """The folder under the tuned directory whose files this sweep reads on ``profile``."""
        return self.tuned_from or profile.tuned_from or profile.name


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
    _check_keys(data, ("description", "config", "run", "seeds", "tune", "tasks", "task_settings", "tuned_from"),
                str(path))
    config = data.get("config")
    if config is not None:
        config = Path(config) if Path(config).is_absolute() else REPO / config
        if not config.is_file():
            raise SweepError(f"{path}: config {config} does not exist")
    seeds = data.get("seeds", [0, 1, 2, 3, 4])
    if not seeds or not all(isinstance(s, int) and s >= 0 for s in seeds):
        raise SweepError(f"{path}: seeds must be a non-empty list of integers >= 0, got {seeds!r}")
    tasks = [str(t) for t in data.get("tasks") or []]
    settings = data.get("task_settings") or {}
    unknown = sorted(set(settings) - set(tasks))
    if unknown:
        raise SweepError(f"{path}: task_settings for tasks not in `tasks`: {unknown}; tasks: {tasks}")
    return Profile(name=path.stem, path=path, config=config, run=data.get("run") or {}, seeds=list(seeds),
                   tune=data.get("tune") or {}, description=str(data.get("description", "")), tasks=tasks,
                   task_settings={k: dict(v) for k, v in settings.items()}, family=path.stem,
                   tuned_from=data.get("tuned_from"))


def profiles_for(profile: Profile, tasks: Sequence[str] | None) -> list[Profile]:
    """The profile(s) a target runs: one per task (``tasks``, else the profile's own task list), or the
    profile itself when it runs one data set."""
    chosen = list(tasks) if tasks else profile.tasks
    if tasks and profile.tasks:
        unknown = sorted(set(tasks) - set(profile.tasks))
        if unknown:
            raise SweepError(f"profile {profile.name} has no task(s) {unknown}; its tasks: {profile.tasks}")
    return [profile.for_task(t) for t in chosen] if chosen else [profile]


def _variant(entry: dict[str, Any], source: str) -> Variant:
    _check_keys(entry, ("label", "method", "set", "tuned", "tags", "match"), source)
    if "method" not in entry:
        raise SweepError(f"{source}: a variant needs a method, got {entry!r}")
    method = str(entry["method"]).lower()
    if "match" in entry and {"adapter.r", "adapter.alpha"} & set(entry.get("set") or {}):
        raise SweepError(f"{source}: variant {entry.get('label', method)!r} sets the rank and matches a parameter "
                         "count; give one of them")
    return Variant(label=str(entry.get("label", method)), method=method, set=dict(entry.get("set") or {}),
                   tuned=entry.get("tuned", method), tags=dict(entry.get("tags") or {}),
                   match=None if entry.get("match") is None else str(entry["match"]))


def load_sweep(name: str | Path, profile: Profile) -> SweepSpec:
    """The sweep ``name`` as the grid that ``profile`` runs (the sweep's ``profiles.<name>`` section applied).

    >>> spec = load_sweep("sample_efficiency", load_profile("smoke"))
    >>> spec.fractions, spec.baseline
    ([0.01, 0.05], 'lora')
    """
    import doran

    path = _find("sweep", name, SWEEP_DIR)
    data = _read_yaml(path)
    _check_keys(data, ("name", "description", "variants", "methods", "seeds", "fractions", "baseline", "profiles",
                       "grid"), str(path))
    family = profile.family or profile.name
    section = (data.get("profiles") or {}).get(family) or {}
    _check_keys(section, ("variants", "methods", "seeds", "fractions", "grid", "tuned_from"),
                f"{path}: profiles.{family}")
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
            raise SweepError(f"{path}: variant {v.label!r}: unknown method {v.method!r}; valid: {sorted(doran.PRESETS)}")
    keep = section.get("variants", section.get("methods"))
    if keep is not None:
        missing = sorted(set(keep) - set(labels))
        if missing:
            raise SweepError(f"{path}: profiles.{family} names unknown variants {missing}; valid: {labels}")
        variants = [v for v in variants if v.label in keep]
    variants = _expand(variants, section.get("grid", data.get("grid")) or {}, path)
    labels = [v.label for v in variants]
    defined = [_variant(e, str(path)) for e in data.get("variants", [])]
    all_labels = {v.label for v in [*variants, *defined]}
    for v in variants:
        if v.match is not None and v.match not in all_labels:
            raise SweepError(f"{path}: variant {v.label!r} matches {v.match!r}, which is not a variant label; "
                             f"valid: {sorted(all_labels)}")
    baseline = data.get("baseline")
    if baseline is not None and baseline not in labels:
        raise SweepError(f"{path}: baseline {baseline!r} is not a variant label; valid: {labels}")
    return SweepSpec(
        name=str(data.get("name", path.stem)),
        path=path,
        variants=variants,
        defined=defined,
        seeds=[int(s) for s in section.get("seeds", data.get("seeds", profile.seeds))],
        fractions=[float(f) for f in section.get("fractions", data.get("fractions", [1.0]))],
        baseline=baseline,
        description=str(data.get("description", "")),
        tuned_from=section.get("tuned_from"),
    )


def _expand(variants: list[Variant], axes: dict[str, Any], path: Path) -> list[Variant]:
    """Every variant at every point of ``axes`` (``{dotted run-config key: [values]}``, a cross product): label
    ``"<label>, <key>=<value>"``, the value set over the tuned ones and tagged under the key's last part."""
    for key, values in axes.items():
        if not isinstance(values, list) or not values:
            raise SweepError(f"{path}: grid.{key} must be a non-empty list of values, got {values!r}")
        short = key.rsplit(".", 1)[-1]
        variants = [Variant(label=f"{v.label}, {short}={value:g}" if isinstance(value, float) else
                            f"{v.label}, {short}={value}", method=v.method, set={**v.set, key: value},
                            tuned=v.tuned, tags={**v.tags, short: value})
                    for v in variants for value in values]
    return variants


# ---------------------------------------------------------------------------------------------------------
# Tuned hyper-parameters
# ---------------------------------------------------------------------------------------------------------


#: ``tuned_from`` of a sweep's profile section that reads no tuned file (a study run at the profile's values)
UNTUNED = "none"


def tuned_path(profile: str, method: str, tuned_dir: Path = TUNED_DIR) -> Path:
    """Where ``experiments.tune`` writes (and sweeps read) the best hyper-parameters of ``method``."""
    return Path(tuned_dir) / profile / f"{method}.yaml"


def load_tuned(profile: str, method: str, tuned_dir: Path = TUNED_DIR) -> tuple[dict[str, Any], Path | None]:
    """``(overrides, path)`` of the tuned file of ``method`` under ``profile``; ``({}, None)`` if none exists."""
    path = tuned_path(profile, method, tuned_dir)
    if not path.is_file():
        return {}, None
    overrides = _read_yaml(path).get("overrides")
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
    cfg: RunConfig
    run_id: str
    tuned: str | None
    tags: dict[str, Any]
    cost: float  # estimated relative cost (optimizer-step equivalents), for the progress bar's ETA

    @property
    def key(self) -> str:
        return f"{self.variant}|s{self.seed}|f{self.fraction:g}"

    @property
    def out(self) -> Path:
        return Path(self.cfg.out)

    @property
    def result_path(self) -> Path:
        from doran.results import result_path

        return result_path(self.out, self.run_id)

    @property
    def error_path(self) -> Path:
        return self.out / f"{self.run_id}.error.json"

    def manifest_entry(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "sweep": self.sweep, "variant": self.variant, "method": self.method,
                "seed": self.seed, "fraction": self.fraction, "tuned": self.tuned, "tags": self.tags}


def point_config(profile: Profile, *layers: dict[str, Any], extra: Sequence[str] = ()) -> RunConfig:
    """The validated run config of ``profile`` with ``layers`` (dotted or nested mappings) merged in order,
    then ``extra`` (``KEY=VALUE`` strings, the command line's ``--set``) before the last layer (the point's
    own coordinates)."""
    *middle, last = layers if layers else ({},)
    try:
        return load(RunConfig, files=[profile.config],
                    layers=[profile.run, *middle, *(m for _, m in parse_overrides(RunConfig, extra)), last])
    except ConfigError as err:
        raise SweepError(f"profile {profile.name}: {err}") from None


_DATA_CACHE: dict[str, Any] = {}


def data_of(cfg: RunConfig):
    """``(splits, fingerprint)`` of the run's data (read and validated once per data config, no model); the
    fingerprint is part of every run_id."""
    from experiments.assets import ENV_DATA_FILE
    from experiments.run import read_data

    key = json.dumps([cfg.data.kind, cfg.data.loader_args(), os.environ.get(ENV_DATA_FILE)], sort_keys=True,
                     default=str)
    if key not in _DATA_CACHE:
        try:
            splits = read_data(cfg)[0]
        except (ValueError, FileNotFoundError) as err:  # DataError, AssetError, missing paths
            raise SweepError(f"data.kind={cfg.data.kind}: {err} (give paths with --set data.path=... or in the "
                             "profile)") from None
        _DATA_CACHE[key] = (splits, splits.fingerprint())
    return _DATA_CACHE[key]


def point_run_id(cfg: RunConfig) -> str:
    """The run_id ``experiments.run`` gives ``cfg``: its config and its data's fingerprint."""
    from experiments.run import run_id_of

    return run_id_of(cfg, data_of(cfg)[1])


def estimate_cost(cfg: RunConfig) -> float:
    """Optimizer-step equivalents of a run, for the progress bar's ETA: training steps, evaluation (forward
    only: about a third of a training example's cost per example) and a constant for building the model."""
    from doran.data import subset_size
    from experiments.run import protocol_epochs

    splits = data_of(cfg)[0]
    t, limit = cfg.train, cfg.data.eval_limit
    n_train = subset_size(splits.train.labels, cfg.fraction, cfg.data.min_per_class)  # the same for every seed
    n_val, n_test = (min(len(s), limit or len(s)) for s in (splits.val, splits.test))
    epochs = protocol_epochs(t.epochs, t.min_steps, n_train, t.batch_size)
    steps = math.ceil(n_train / t.batch_size) * epochs
    steps = steps if t.max_steps < 0 else min(steps, t.max_steps)
    return steps + (epochs * n_val + n_test) / (3 * t.batch_size) + 20


@functools.lru_cache(maxsize=4)
def _backbone(kind: str, name: str, kwargs: str, tokenizer: str | None) -> Any:
    """The backbone of a run (its pretrained weights when it has them; only the shapes matter here)."""
    from doran.training import build_backbone

    model, _, _ = build_backbone(kind=kind, name=name, num_classes=2, tokenizer=tokenizer, kwargs=json.loads(kwargs))
    return model


def adapter_parameters(cfg: RunConfig) -> int:
    """Trainable adapter parameters (the head left out: every method shares it) of ``cfg``'s method and
    adapter settings on ``cfg``'s backbone."""
    import copy

    from experiments.param_table import adapter_count

    m = cfg.model
    model = copy.deepcopy(_backbone(m.kind, m.name, json.dumps(m.kwargs or {}, sort_keys=True), m.tokenizer))
    return adapter_count(model, cfg.method, **cfg.adapter)


def matching_rank(make: Callable[[dict[str, Any]], RunConfig], target: int, max_rank: int = 512) -> dict[str, Any]:
    """``{"adapter.r": r, "adapter.alpha": alpha}``: the rank whose adapter parameters come closest to
    ``target`` (ties to the smaller rank) for the run configs ``make(layer)`` (``layer`` merged last), alpha
    scaled with it so that s = alpha / r stays the variant's. The count of a method without generators is
    affine in r: two counts give the line, a third checks it."""
    cfg = make({})
    ratio = float(cfg.adapter["alpha"]) / float(cfg.adapter["r"])
    method = cfg.method

    def count(r: int) -> int:
        return adapter_parameters(make({"adapter.r": r, "adapter.alpha": ratio * r}))

    c1, c2 = count(1), count(2)
    slope = c2 - c1
    if slope <= 0:
        raise SweepError(f"{method}: its adapter parameters do not grow with the rank; nothing to match")
    best = max(1, min(max_rank, round((target - c1) / slope) + 1))
    candidates = sorted({max(1, best - 1), best, min(max_rank, best + 1)})
    r = min(candidates, key=lambda k: (abs(c1 + (k - 1) * slope - target), k))
    try:
        exact = count(r)
    except DoranError as err:  # the rank is more than the model's Linears allow
        raise SweepError(f"{method}: {target:,} adapter parameters need rank {r}, which this model does not "
                         f"allow ({err}); match a smaller variant or drop the matched one") from None
    if exact != c1 + (r - 1) * slope:
        raise SweepError(f"{method}: its adapter parameters are not affine in the rank; cannot match a count")
    return {"adapter.r": r, "adapter.alpha": ratio * r}


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
            raise SweepError(f"unknown variant(s) {unknown} in sweep {spec.name}; valid: "
                             f"{[v.label for v in spec.variants]}")
        chosen = [v for v in spec.variants if v.label in variants or v.method in variants]
    else:
        chosen = spec.variants
    seeds = list(seeds) if seeds is not None else spec.seeds
    fractions = [float(f) for f in fractions] if fractions is not None else spec.fractions
    out = Path(results_dir) / profile.name / spec.name
    by_label = {v.label: v for v in [*spec.defined, *spec.variants]}

    def tuned_of(v: Variant) -> tuple[dict[str, Any], Path | None]:
        return (({}, None) if tuned_dir is None or v.tuned is None or spec.tuned_from == UNTUNED
                else load_tuned(spec.tuned_source(profile), v.tuned, tuned_dir))

    matched = {}  # label -> {"adapter.r": r, "adapter.alpha": alpha} of the variants with ``match``
    for v in chosen:
        if v.match is not None:
            other = by_label[v.match]
            target = adapter_parameters(point_config(profile, tuned_of(other)[0], other.set,
                                                     {"method": other.method}, extra=extra))
            matched[v.label] = matching_rank(
                lambda layer, v=v: point_config(profile, tuned_of(v)[0], v.set, layer, {"method": v.method},
                                                extra=extra), target)
    points = []
    for seed in seeds:
        for fraction in fractions:
            for v in chosen:
                tuned, tuned_file = tuned_of(v)
                coords = {"method": v.method, "seed": seed, "fraction": fraction, "out": str(out)}
                cfg = point_config(profile, tuned, v.set, matched.get(v.label, {}), coords, extra=extra)
                points.append(Point(
                    sweep=spec.name, variant=v.label, method=v.method, seed=seed, fraction=cfg.fraction, cfg=cfg,
                    run_id=point_run_id(cfg), tuned=None if tuned_file is None else os.path.relpath(tuned_file, REPO),
                    tags=dict(v.tags), cost=estimate_cost(cfg),
                ))
    return points
