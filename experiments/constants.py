"""Names and places every experiment script agrees on: folders, the sweeps, the order of methods, the
parameter groups. ``collect``, ``plots``, ``sweep`` and ``tune`` take them from here and nowhere else."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CONFIG_DIR = REPO / "experiments" / "configs"
SWEEP_DIR = CONFIG_DIR / "sweeps"
PROFILE_DIR = CONFIG_DIR / "profiles"
TUNED_DIR = CONFIG_DIR / "tuned"
RESULTS_DIR = REPO / "experiments" / "results"
FIGURES_DIR = REPO / "figures"
#: the file in each sweep folder that maps grid points to run ids
SWEEP_FILE = "sweep.json"
#: the sweeps `all` runs, in this order (the sample-efficiency grid first: the ablations reuse its runs)
SWEEPS = ("sample_efficiency", "ablation_tau", "ablation_hypernet")
#: the stability study's sweeps: their tables live in stability_*.csv and docs/stability.md, not in docs/results.md
STABILITY_SWEEPS = ("stability", "stability_precision", "stability_init")
#: methods in the order every table and figure uses; presets not listed here follow in alphabetical order
METHOD_ORDER = ("lora", "dora", "doran", "replora", "hora", "prediag", "sora")


def method_order(methods: Iterable[str]) -> list[str]:
    """``methods`` in the project's fixed order (METHOD_ORDER first, others alphabetically after)."""
    methods = list(dict.fromkeys(methods))
    known = [m for m in METHOD_ORDER if m in methods]
    return known + sorted(m for m in methods if m not in METHOD_ORDER)


def all_methods() -> list[str]:
    """Every preset of the core (``doran.PRESETS``) in the fixed method order."""
    import doran

    return method_order(doran.PRESETS)


def param_groups() -> tuple[str, ...]:
    """The trainable-parameter groups of ``doran.trainable_parameter_counts``, the last one (``other``) being
    the tensors that are no adapter (the classifier head)."""
    from doran.inject import GROUPS

    return tuple(GROUPS)
