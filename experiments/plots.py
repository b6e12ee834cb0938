"""Every figure of the repository, each from one CSV written by ``experiments.collect``. Trains nothing.

    python -m experiments.plots --profile default                # figures/ (other profiles: figures/<profile>/)
    python -m experiments.plots --profile smoke --results results-dir --out figures-dir

Theme, palette and method order are set once here. Every figure has labelled axes with units, a legend and
error bars over seeds (mean and 95% t-interval, the statistics of ``experiments.collect``), and is written as
PNG and PDF. Figures and the CSV each reads (under ``<results>/<profile>/<sweep>/``):

==================================  =====================================
figure                              CSV
==================================  =====================================
sample_efficiency_accuracy          sample_efficiency/runs.csv
sample_efficiency_paired            sample_efficiency/runs.csv
ablation_tau_accuracy               ablation_tau/runs.csv
ablation_tau_trajectories           ablation_tau/tau.csv.gz
ablation_tau_grad_norm              ablation_tau/grad_norm.csv.gz
ablation_hypernet                   ablation_hypernet/runs.csv
params_matched                      params_matched/runs.csv
==================================  =====================================
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import matplotlib.ticker
import numpy as np
import pandas as pd
import seaborn as sns

from experiments.collect import t_interval
from doran.config import METHOD_NAMES
from experiments.constants import FIGURES_DIR, METHOD_ORDER, RESULTS_DIR, method_order

#: one colour per method, fixed across figures (colour-blind safe).
_COLORS = sns.color_palette("colorblind", 10)
METHOD_COLORS = {m: _COLORS[i] for i, m in enumerate(METHOD_ORDER)}
METHOD_LABELS = METHOD_NAMES
FACTOR_COLORS = {"static": _COLORS[0], "generated": _COLORS[2]}
SHARING_ORDER = ("static", "none", "qv_first", "qv_full", "global")
TAU_ORDER = ("0", "0.001", "0.01", "0.1", "1", "learned")
NORM_MARKERS = {"not detached": "o", "detached": "s"}


def set_theme() -> None:
    """The one theme of every figure."""
    sns.set_theme(
        context="paper",
        style="whitegrid",
        font_scale=1.15,
        rc={
            "figure.dpi": 110,
            "savefig.dpi": 200,
            "axes.titleweight": "bold",
            "legend.frameon": True,
            "legend.framealpha": 0.9,
            "axes.spines.top": False,
            "axes.spines.right": False,
        },
    )


def method_color(method: str) -> tuple:
    if method not in METHOD_COLORS:
        METHOD_COLORS[method] = _COLORS[len(METHOD_COLORS) % len(_COLORS)]
    return METHOD_COLORS[method]


def label(method: str) -> str:
    """A method's display name; a variant "<method>, <tag>" keeps its tag ("DoRAN, static factors")."""
    head, sep, tag = method.partition(", ")
    if method not in METHOD_LABELS and sep and head in METHOD_LABELS:
        return f"{METHOD_LABELS[head]}, {tag}"
    return METHOD_LABELS.get(method, method)


def save(fig: plt.Figure, out: Path, name: str) -> list[Path]:
    """Write ``out/name.png`` and ``out/name.pdf``; close the figure."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{name}.png", out / f"{name}.pdf"]
    fig.tight_layout()
    for path in paths:  # no creation date in the PDF: the same results give the same bytes
        fig.savefig(path, bbox_inches="tight", metadata={"CreationDate": None} if path.suffix == ".pdf" else None)
    plt.close(fig)
    return paths


def _note(fig: plt.Figure, runs: pd.DataFrame) -> None:
    """A footnote: finished runs, seeds, device, and a warning if any run came from a dirty tree."""
    done = runs[runs["status"].isin(["completed", "diverged"])] if "status" in runs else runs
    if done.empty:
        return
    devices = ", ".join(sorted(set(done["device"].dropna().astype(str)))) if "device" in done else "?"
    keys = [k for k in ("variant", "fraction") if k in done]
    per = done.groupby(keys)["seed"].nunique() if keys else pd.Series([done["seed"].nunique()])
    seeds = f"{per.min()}" if per.min() == per.max() else f"{per.min()}-{per.max()}"
    text = f"{len(done)} runs, {seeds} seeds per point; {devices}"
    if "dirty" in done and done["dirty"].fillna(False).astype(bool).any():
        text += "; some runs from an uncommitted tree"
    fig.text(0.99, 0.005, text, ha="right", va="bottom", fontsize=7, color="0.4")


#: the range of an accuracy in percent: its intervals are drawn clipped to it
ACC_BOUNDS = (0.0, 100.0)


def _mean_ci(
    values: Sequence[float], bounds: tuple[float, float] = (-math.inf, math.inf)
) -> tuple[float, float, float]:
    """Mean and the distances from it to the ends of the 95% t-interval (errorbar's ``yerr``), the ends clipped
    to ``bounds``: an accuracy interval stops at 0 and 100% (a t-interval over seeds with one collapsed run
    would otherwise reach past them)."""
    mean, low, high = t_interval(values)
    low, high = max(low, bounds[0]), min(high, bounds[1])
    return mean, (mean - low) if np.isfinite(low) else 0.0, (high - mean) if np.isfinite(high) else 0.0


def _completed(runs: pd.DataFrame) -> pd.DataFrame:
    return runs[(runs["status"] == "completed") & runs["test_acc"].notna()]


# ---------------------------------------------------------------------------------------------------------
# Sample efficiency
# ---------------------------------------------------------------------------------------------------------


def fig_sample_efficiency(csv: Path, out: Path, baseline: str = "lora") -> list[Path]:
    """Test accuracy against the fraction of training data (log axis), mean and 95% interval per variant."""
    runs = pd.read_csv(csv)
    ok = _completed(runs)
    if "variant" not in ok:
        ok = ok.assign(variant=ok["method"])
    fig, ax = plt.subplots(figsize=(8.4, 4.6))
    variants = method_order(ok["variant"].unique())  # one line per variant: "doran, static factors" is not DoRAN
    fractions = sorted(ok["fraction"].unique())
    n = len(variants)
    for i, v in enumerate(variants):
        g = ok[ok["variant"] == v]
        tagged = v != g["method"].iloc[0]  # a method at other settings: dashed, hollow markers
        stats = [
            (f, *_mean_ci(g[g["fraction"] == f]["test_acc"] * 100, ACC_BOUNDS))
            for f in fractions
            if (g["fraction"] == f).any()
        ]
        xs = np.array([s[0] for s in stats])
        dodge = 10 ** (
            (i - (n - 1) / 2) * 0.012
        )  # small multiplicative offset: overlapping bars stay visible
        ax.errorbar(
            xs * dodge,
            [s[1] for s in stats],
            yerr=[[s[2] for s in stats], [s[3] for s in stats]],
            marker="o",
            ms=5,
            mfc="white" if tagged else None,
            ls="--" if tagged else "-",
            capsize=3,
            lw=1.8 if v in ("doran", baseline) else 1.2,
            color=method_color(v),
            label=label(v),
            zorder=3 if v == "doran" else 2,
        )
        ax.scatter(g["fraction"] * dodge, g["test_acc"] * 100, s=8, color=method_color(v), alpha=0.25, lw=0)
    base = ok[(ok["variant"] == baseline) & (ok["fraction"] == max(fractions))]["test_acc"]
    if len(base):
        ax.axhline(
            base.mean() * 100,
            color=method_color(baseline),
            ls="--",
            lw=1,
            alpha=0.7,
            label=f"{label(baseline)} at {max(fractions):.0%} data",
        )
    if "majority_acc" in ok and ok["majority_acc"].notna().any():
        ax.axhline(ok["majority_acc"].iloc[0] * 100, color="0.5", ls=":", lw=1, label="majority class")
    _ylim(ax, [*(ok["test_acc"] * 100), *(ok["majority_acc"] * 100)], margin=3, low=0, high=100)
    ax.set_xscale("log")
    ax.set_xticks(fractions)
    ax.set_xticklabels([f"{f:.0%}" if f >= 0.01 else f"{f:.1%}" for f in fractions])
    ax.minorticks_off()
    ax.set_xlabel("fraction of the training data (log scale)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Sample efficiency: mean and 95% interval over seeds")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    _note(fig, runs)
    return save(fig, out, "sample_efficiency_accuracy")


def seed_differences(runs: pd.DataFrame, baseline: str) -> pd.DataFrame:
    """Per (fraction, variant, seed): ``diff = test_acc - baseline's test_acc`` (completed pairs only)."""
    ok = _completed(runs)
    base = ok[ok["variant"] == baseline][["fraction", "seed", "test_acc"]].rename(
        columns={"test_acc": "base"}
    )
    pairs = ok[ok["variant"] != baseline].merge(base, on=["fraction", "seed"])
    return pairs.assign(diff=pairs["test_acc"] - pairs["base"])


def _ylim(
    ax: plt.Axes, values: Sequence[float], margin: float, low: float = -math.inf, high: float = math.inf
) -> None:
    """Frame the data points (not the intervals, which can be wide with few seeds) with a margin."""
    values = [v for v in values if np.isfinite(v)]
    if values:
        ax.set_ylim(max(low, min(values) - margin), min(high, max(values) + margin))


def fig_sample_efficiency_paired(csv: Path, out: Path, baseline: str = "lora") -> list[Path]:
    """Seed-by-seed difference with the baseline (percentage points), one panel per fraction: seeds as dots,
    mean and 95% t-interval as error bars."""
    runs = pd.read_csv(csv)
    diffs = seed_differences(runs, baseline)
    fractions = sorted(diffs["fraction"].unique())
    methods = method_order(diffs["variant"].unique())
    fig, axes = plt.subplots(
        1, len(fractions), figsize=(3.4 * len(fractions) + 0.8, 4.0), sharey=True, squeeze=False
    )
    for ax, fraction in zip(axes[0], fractions):
        d = diffs[diffs["fraction"] == fraction]
        for i, m in enumerate(methods):
            x = d[d["variant"] == m]["diff"] * 100
            if x.empty:
                continue
            mean, lo, hi = _mean_ci(x)
            ax.errorbar(i, mean, yerr=[[lo], [hi]], fmt="o", ms=6, capsize=4, color=method_color(m), zorder=3)
            ax.scatter(i + np.linspace(-0.12, 0.12, len(x)), x, s=10, color=method_color(m), alpha=0.4, lw=0)
        ax.axhline(0, color="0.3", lw=1)
        ax.set_xticks(range(len(methods)))
        ax.set_xticklabels([label(m) for m in methods], rotation=40, ha="right")
        ax.set_title(
            f"{fraction:.0%} of the training data" if fraction >= 0.01 else f"{fraction:.1%} of the data",
            fontsize=10,
        )
    axes[0][0].set_ylabel(f"test accuracy − {label(baseline)} (percentage points)")
    _ylim(axes[0][0], diffs["diff"] * 100, margin=1.5)
    fig.suptitle(
        f"Paired difference with {label(baseline)}, seed by seed: dots = seeds, bars = mean and 95% "
        "t-interval",
        fontweight="bold",
        fontsize=10,
    )
    _note(fig, runs)
    return save(fig, out, "sample_efficiency_paired")


# ---------------------------------------------------------------------------------------------------------
# Tau ablation
# ---------------------------------------------------------------------------------------------------------


def _tau_category(tau: str, norm: str) -> str:
    tau = str(tau)
    name = "τ = 0" if tau == "0" else "τ learned" if tau == "learned" else f"τ = {tau}"
    return name + ("\n(detached)" if norm == "detached" else "")


def _tau_sort_key(tau: str, norm: str) -> tuple:
    tau = str(tau)
    return (TAU_ORDER.index(tau) if tau in TAU_ORDER else len(TAU_ORDER), norm != "detached")


def fig_ablation_tau(csv: Path, out: Path) -> list[Path]:
    """Test accuracy per tau setting, static vs generated factors; seeds as dots, mean and 95% interval."""
    runs = pd.read_csv(csv, dtype={"tag_tau": str})
    ok = _completed(runs)
    cats = sorted(
        {(t, n) for t, n in zip(runs["tag_tau"], runs["tag_norm"])}, key=lambda c: _tau_sort_key(*c)
    )
    factors = [f for f in ("static", "generated") if f in set(runs["tag_factors"])]
    fig, ax = plt.subplots(figsize=(max(6.5, 1.0 * len(cats) + 2), 4.6))
    for j, fac in enumerate(factors):
        off = (j - (len(factors) - 1) / 2) * 0.25
        for i, (tau, norm) in enumerate(cats):
            g = ok[(ok["tag_factors"] == fac) & (ok["tag_tau"] == tau) & (ok["tag_norm"] == norm)]
            if g.empty:
                continue
            mean, lo, hi = _mean_ci(g["test_acc"] * 100, ACC_BOUNDS)
            ax.errorbar(
                i + off,
                mean,
                yerr=[[lo], [hi]],
                fmt=NORM_MARKERS.get(norm, "o"),
                ms=7,
                capsize=4,
                color=FACTOR_COLORS.get(fac),
                mfc="white" if norm == "detached" else FACTOR_COLORS.get(fac),
                mew=1.5,
                zorder=3,
            )
            jitter = np.linspace(-0.05, 0.05, len(g))
            ax.scatter(
                i + off + jitter, g["test_acc"] * 100, s=10, color=FACTOR_COLORS.get(fac), alpha=0.35, lw=0
            )
        diverged = runs[(runs["tag_factors"] == fac) & (runs["status"] == "diverged")]
        for _, row in diverged.iterrows():
            i = cats.index((row["tag_tau"], row["tag_norm"]))
            ax.annotate("×", (i + off, ax.get_ylim()[0]), color="red", ha="center", fontsize=12)
    handles = [
        plt.Line2D([], [], color=FACTOR_COLORS.get(f), marker="o", ls="", label=f"{f} factors")
        for f in factors
    ]
    handles += [plt.Line2D([], [], color="0.3", marker="s", mfc="white", ls="", label="norm detached")]
    ax.legend(handles=handles, fontsize=8, loc="lower right")
    ax.set_xticks(range(len(cats)))
    ax.set_xticklabels([_tau_category(*c) for c in cats], fontsize=8)
    ax.set_xlabel("τ added to the row norm (relative to the mean row norm of W0)")
    ax.set_ylabel("test accuracy (%)")
    frac = ok["fraction"].max() if len(ok) else math.nan
    ax.set_title(
        f"Tau ablation, {frac:.0%} of the training data\n(seeds as dots; mean and 95% t-interval, clipped to 0-100%)"
    )
    _note(fig, runs)
    return save(fig, out, "ablation_tau_accuracy")


def fig_tau_trajectories(csv: Path, out: Path) -> list[Path]:
    """Learned tau (relative units) over training, per layer (colour) and projection (column), per variant
    (row); line: mean over seeds, band: min-max over seeds."""
    tau = pd.read_csv(csv, dtype={"tag_tau": str})
    learned = tau[tau["tag_tau"] == "learned"] if "tag_tau" in tau else tau
    if learned.empty:
        learned = tau
    variants = list(dict.fromkeys(learned["variant"]))
    projections = sorted(learned["projection"].unique())
    layers = sorted(learned["layer"].dropna().unique())
    colors = sns.color_palette("viridis", len(layers))
    fig, axes = plt.subplots(
        len(variants),
        len(projections),
        figsize=(4.2 * len(projections), 2.8 * len(variants)),
        sharex=True,
        squeeze=False,
    )
    for r, variant in enumerate(variants):
        for c, proj in enumerate(projections):
            ax = axes[r][c]
            g = learned[(learned["variant"] == variant) & (learned["projection"] == proj)]
            for k, layer in enumerate(layers):
                h = g[g["layer"] == layer].groupby("step")["tau"].agg(["mean", "min", "max"]).reset_index()
                ax.plot(h["step"], h["mean"], color=colors[k], lw=1.4, label=f"layer {int(layer)}")
                ax.fill_between(h["step"], h["min"], h["max"], color=colors[k], alpha=0.15, lw=0)
            ax.set_title(f"{variant} — {proj}", fontsize=9)
            ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
            if r == len(variants) - 1:
                ax.set_xlabel("optimizer step")
    fig.supylabel("τ (relative to the mean row norm of W0)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(
        handles,
        labels,
        loc="upper left",
        bbox_to_anchor=(1.0, 0.93),
        fontsize=8,
        title="line: mean over seeds\nband: min–max",
        title_fontsize=8,
    )
    fig.suptitle("Learned τ per layer and projection over training", fontweight="bold")
    return save(fig, out, "ablation_tau_trajectories")


def _adapter_norm(grad: pd.DataFrame) -> pd.Series:
    groups = [c for c in ("factors", "generator", "magnitude", "tau", "diag", "rotation") if c in grad]
    return np.sqrt((grad[groups].fillna(0) ** 2).sum(axis=1))


def fig_grad_norm(csv: Path, out: Path, window: int = 10) -> list[Path]:
    """Adapter gradient norm (all adapter parameters, head excluded) per step, log scale: the stability claim.
    Line: median over seeds of a ``window``-step rolling mean; band: min-max over seeds."""
    grad = pd.read_csv(csv, dtype={"tag_tau": str})
    grad["adapter"] = _adapter_norm(grad)
    factors = [f for f in ("static", "generated") if f in set(grad["tag_factors"])]
    cats = sorted(
        {(t, n) for t, n in zip(grad["tag_tau"], grad["tag_norm"])}, key=lambda c: _tau_sort_key(*c)
    )
    colors = dict(zip(cats, sns.color_palette("rocket_r", len(cats) + 1)[1:]))
    fig, axes = plt.subplots(1, len(factors), figsize=(6.0 * len(factors), 4.4), sharey=True, squeeze=False)
    for c, fac in enumerate(factors):
        ax = axes[0][c]
        for cat in cats:
            g = grad[
                (grad["tag_factors"] == fac) & (grad["tag_tau"] == cat[0]) & (grad["tag_norm"] == cat[1])
            ]
            if g.empty:
                continue
            smooth = (
                g.sort_values("step")
                .groupby("run_id", group_keys=False)
                .apply(lambda d: d.assign(s=d["adapter"].rolling(window, min_periods=1).mean()))
            )
            h = smooth.groupby("step")["s"].agg(["median", "min", "max"]).reset_index()
            ax.plot(
                h["step"],
                h["median"],
                color=colors[cat],
                lw=1.4,
                ls="--" if cat[1] == "detached" else "-",
                label=_tau_category(*cat).replace("\n", " "),
            )
            ax.fill_between(h["step"], h["min"], h["max"], color=colors[cat], alpha=0.12, lw=0)
        ax.set_yscale("log")
        ax.set_title(f"{fac} factors", fontsize=10)
        ax.set_xlabel("optimizer step")
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        if c == 0:
            ax.set_ylabel("adapter gradient L2 norm (log scale)")
    handles = [
        plt.Line2D(
            [],
            [],
            color=colors[cat],
            ls="--" if cat[1] == "detached" else "-",
            label=_tau_category(*cat).replace("\n", " "),
        )
        for cat in cats
    ]
    fig.legend(
        handles=handles,
        loc="upper left",
        bbox_to_anchor=(1.0, 0.9),
        fontsize=8,
        title=f"line: median over seeds\nof a {window}-step mean\nband: min–max",
        title_fontsize=8,
    )
    fig.suptitle("Adapter gradient norm during training", fontweight="bold")
    return save(fig, out, "ablation_tau_grad_norm")


# ---------------------------------------------------------------------------------------------------------
# Hypernetwork sharing
# ---------------------------------------------------------------------------------------------------------


def fig_hypernet(csv: Path, out: Path) -> list[Path]:
    """Accuracy (mean and 95% interval, seeds as dots) and trainable adapter parameters per sharing variant."""
    runs = pd.read_csv(csv)
    ok = _completed(runs)
    variants = [v for v in SHARING_ORDER if v in set(runs["variant"])] + [
        v for v in dict.fromkeys(runs["variant"]) if v not in SHARING_ORDER
    ]
    colors = dict(zip(variants, sns.color_palette("colorblind", len(variants))))
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 4.2), gridspec_kw={"width_ratios": [1.4, 1]})
    for i, v in enumerate(variants):
        g = ok[ok["variant"] == v]
        if g.empty:
            continue
        mean, lo, hi = _mean_ci(g["test_acc"] * 100, ACC_BOUNDS)
        ax.errorbar(i, mean, yerr=[[lo], [hi]], fmt="o", ms=7, capsize=4, color=colors[v], zorder=3)
        ax.scatter(
            i + np.linspace(-0.08, 0.08, len(g)), g["test_acc"] * 100, s=12, color=colors[v], alpha=0.35, lw=0
        )
        bx.bar(i, g["params_adapter"].median(), color=colors[v])
        bx.text(
            i,
            g["params_adapter"].median(),
            f"{int(g['params_adapter'].median()):,}",
            ha="center",
            va="bottom",
            fontsize=7,
        )
    for a in (ax, bx):
        a.set_xticks(range(len(variants)))
        a.set_xticklabels(variants)
        a.set_xlabel("auxiliary-network sharing")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Accuracy: mean and 95% interval over seeds")
    bx.set_ylabel("trainable adapter parameters")
    bx.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:,.0f}"))
    bx.set_title("Trainable parameters (head excluded)")
    _note(fig, runs)
    return save(fig, out, "ablation_hypernet")


def fig_params_matched(csv: Path, out: Path) -> list[Path]:
    """Accuracy (mean and 95% interval over seeds) against trainable adapter parameters (log scale): each method
    at its tuned rank (filled) and LoRA / DoRA at DoRAN's parameter count (open), one colour per method."""
    runs = pd.read_csv(csv)
    ok = _completed(runs)
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for variant in dict.fromkeys(runs["variant"]):
        g = ok[ok["variant"] == variant]
        if g.empty:
            continue
        method = str(g["method"].iloc[0])
        matched = variant != method
        mean, lo, hi = _mean_ci(g["test_acc"] * 100, ACC_BOUNDS)
        ax.errorbar(g["params_adapter"].median(), mean, yerr=[[lo], [hi]], fmt="s" if matched else "o", ms=8,
                    capsize=4, color=method_color(method), mfc="white" if matched else method_color(method),
                    mew=1.6, label=f"{label(method)}, {'rank matched to DoRAN' if matched else 'tuned rank'}",
                    zorder=3)
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:,.0f}"))
    ax.set_xlabel("trainable adapter parameters (head excluded, log scale)")
    ax.set_ylabel("test accuracy (%)")
    fraction = ok["fraction"].iloc[0] if len(ok) else math.nan
    ax.set_title(f"Accuracy against parameters, {fraction:.0%} of the data: mean and 95% interval")
    ax.legend(fontsize=8, loc="best")
    _note(fig, runs)
    return save(fig, out, "params_matched")


# ---------------------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------------------

#: figure function -> (sweep folder, CSV file)
FIGURES: dict[str, tuple[Callable[[Path, Path], list[Path]], str, str]] = {
    "sample_efficiency_accuracy": (fig_sample_efficiency, "sample_efficiency", "runs.csv"),
    "sample_efficiency_paired": (fig_sample_efficiency_paired, "sample_efficiency", "runs.csv"),
    "ablation_tau_accuracy": (fig_ablation_tau, "ablation_tau", "runs.csv"),
    "ablation_tau_trajectories": (fig_tau_trajectories, "ablation_tau", "tau.csv.gz"),
    "ablation_tau_grad_norm": (fig_grad_norm, "ablation_tau", "grad_norm.csv.gz"),
    "ablation_hypernet": (fig_hypernet, "ablation_hypernet", "runs.csv"),
    "params_matched": (fig_params_matched, "params_matched", "runs.csv"),
}


def default_out(profile: str) -> Path:
    """``figures/`` for the default profile, ``figures/<profile>/`` for the others."""
    return FIGURES_DIR if profile == "default" else FIGURES_DIR / profile


def make_figures(
    profile: str = "default",
    results_dir: str | Path = RESULTS_DIR,
    out: str | Path | None = None,
    only: Sequence[str] | None = None,
) -> dict[str, list[Path]]:
    """Every figure whose CSV exists (run ``experiments.collect`` first); returns name -> files written."""
    set_theme()
    root = Path(results_dir) / profile
    out = Path(out) if out is not None else default_out(profile)
    written = {}
    for name, (fn, sweep, csv) in FIGURES.items():
        if only and name not in only:
            continue
        path = root / sweep / csv
        if not (path.is_file() and path.stat().st_size > 1):
            continue
        if csv == "runs.csv" and _completed_count(path) == 0:  # a sweep stopped before any run finished
            print(f"[plot] {profile}/{sweep}: no finished run yet, no {name} figure", file=sys.stderr)
            continue
        written[name] = fn(path, out)
    return written


def _completed_count(path: Path) -> int:
    """Runs of a ``runs.csv`` that finished with a test accuracy (0 when none did: then collect writes no
    result columns at all)."""
    runs = pd.read_csv(path)
    return len(_completed(runs)) if {"status", "test_acc"} <= set(runs.columns) else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.plots",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    parser.add_argument("--profile", default="default")
    parser.add_argument("--results", default=str(RESULTS_DIR))
    parser.add_argument("--out", default=None, help="figure folder (default: figures/ or figures/<profile>/)")
    parser.add_argument("--only", nargs="+", default=None, choices=sorted(FIGURES))
    args = parser.parse_args(argv)
    matplotlib.use("Agg")  # files only (a notebook importing this module keeps its inline backend)
    written = make_figures(args.profile, args.results, args.out, args.only)
    if not written:
        print(
            f"[plots] no collected CSVs under {Path(args.results) / args.profile}; run "
            f"`python -m experiments.collect --profile {args.profile}` first",
            file=sys.stderr,
        )
        return 1
    for name, paths in written.items():
        print(f"[plots] {name}: {', '.join(str(p) for p in paths)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
