"""Across tasks: one verdict from the per-task sweeps of a multi-task profile. Trains nothing.

    python -m experiments.suite_report --profile suite --sweep sample_efficiency --baseline lora dora
    python -m experiments.suite_report --profile vision --sweep ablation_tau --baseline "static, tau=0, detached"

For every task folder ``<results>/<profile>/<task>/<sweep>/`` (collected with ``experiments.collect``), and
every variant and data fraction, it compares the variant with each ``--baseline`` seed by seed (the same subset,
head initialisation and batch order) and writes ``<results>/<profile>/<sweep>_across_tasks.csv``:

- per task: the mean paired difference (percentage points) with its 95% t-interval over seeds, and the
  task's outcome: a win where the interval lies above 0, a loss where it lies below, a tie otherwise;
- pooled (``task = "pooled"``): the mean over tasks of the per-task mean differences, with two 95% intervals
  around it and the counts of wins, ties and losses:

  - ``ci_low``, ``ci_high``: a t-interval over tasks (tasks are the units: a random-effects view in its
    simplest form, which does not let a task with many seeds dominate). It speaks of tasks like these; more
    seeds narrow it only down to the spread between tasks, more tasks narrow it further;
  - ``ci_low_seeds``, ``ci_high_seeds``: the same mean with only the seed-to-seed noise of each task (the
    variance of the mean of k task means, sum(sd_i^2 / n_i) / k^2, Welch-Satterthwaite degrees of freedom). It
    speaks of these tasks, and more seeds narrow it as far as one likes;
  - ``target``: the resolution asked of a pooled interval at that fraction (``RESOLUTION``: +-0.5 points at
    100% of the data, +-1 at 10%), ``meets_target`` and ``meets_target_seeds`` whether each interval's half
    width is within it, and ``seeds_for_target``: the seeds per task (the same for every task) at which the
    seeds-only interval would meet it, from the standard deviations measured so far;
- the mean rank of each variant (1 = the best mean accuracy on a task), averaged over tasks.

the same as markdown tables in ``<sweep>_across_tasks.md`` (:func:`markdown`), and a forest plot
``figures/<profile>/<sweep>_forest.png`` (and ``.pdf``) per fraction: every task's interval and the pooled one.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from experiments.collect import collect_sweep, t_interval
from experiments.constants import RESULTS_DIR, SWEEP_FILE
from experiments.plots import default_out

POOLED = "pooled"

#: the half width (points) asked of a pooled interval, per data fraction; no target at other fractions
RESOLUTION = {1.0: 0.5, 0.1: 1.0}


def task_folders(profile: str, sweep: str, results_dir: Path = RESULTS_DIR) -> dict[str, Path]:
    """``{task: folder}`` of every task of ``profile`` that has a ``sweep`` folder with a manifest."""
    root = Path(results_dir) / profile
    return {p.parent.name: p for p in sorted(root.glob(f"*/{sweep}")) if (p / SWEEP_FILE).is_file()}


def per_task(runs: pd.DataFrame, baseline: str, metric: str = "test_acc") -> pd.DataFrame:
    """Seed-by-seed ``variant - baseline`` per (task, fraction, variant), in points, with its interval."""
    ok = runs[runs["status"] == "completed"]
    rows = []
    for (task, fraction), g in ok.groupby(["task", "fraction"], sort=False):
        base = g[g["variant"] == baseline].set_index("seed")[metric]
        for variant, v in g.groupby("variant", sort=False):
            if variant == baseline:
                continue
            mine = v.set_index("seed")[metric]
            seeds = sorted(set(mine.index) & set(base.index))
            diffs = [100 * (float(mine[s]) - float(base[s])) for s in seeds]
            mean, low, high = t_interval(diffs)
            sd = float(np.std(diffs, ddof=1)) if len(diffs) > 1 else math.nan
            outcome = "win" if low > 0 else "loss" if high < 0 else "tie"
            rows.append({"task": task, "fraction": fraction, "variant": variant, "n_seeds": len(seeds),
                         "diff_mean": mean, "diff_sd": sd, "ci_low": low, "ci_high": high,
                         "outcome": outcome if len(seeds) > 1 else "undetermined"})
    return pd.DataFrame(rows)


def seeds_half_width(sds: Sequence[float], ns: Sequence[int], level: float = 0.95) -> float:
    """Half width of the interval for the mean of k task means when only seeds vary: each task ``i`` has ``ns[i]``
    paired differences with standard deviation ``sds[i]``; variance sum(sd_i^2 / n_i) / k^2, Student t with
    Welch-Satterthwaite degrees of freedom. NaN if a task has fewer than 2 seeds.

    >>> round(seeds_half_width([1.0, 1.0], [5, 5]), 3)  # sqrt(2/5)/2 * t(8)
    0.729
    """
    from scipy import stats

    sds, ns = np.asarray(sds, dtype=float), np.asarray(ns, dtype=float)
    if len(sds) == 0 or (ns < 2).any() or not np.isfinite(sds).all():
        return math.nan
    v = sds**2 / ns
    if v.sum() == 0:
        return 0.0
    df = v.sum() ** 2 / (v**2 / (ns - 1)).sum()
    return float(stats.t.ppf(0.5 + level / 2, df) * math.sqrt(v.sum()) / len(sds))


def seeds_for_half_width(sds: Sequence[float], target: float, most: int = 1000) -> float:
    """The fewest seeds per task (the same for every task) at which :func:`seeds_half_width` is within ``target``,
    given each task's standard deviation of paired differences; NaN if more than ``most`` would be needed."""
    sds = [float(s) for s in sds]

    def meets(n: int) -> bool:
        return seeds_half_width(sds, [n] * len(sds)) <= target

    if not sds or not all(np.isfinite(sds)) or not meets(most):
        return math.nan
    low, high = 1, most  # the half width falls as n grows: bisect for the first n that meets the target
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (low, mid) if meets(mid) else (mid, high)
    return high


def pooled(table: pd.DataFrame) -> pd.DataFrame:
    """Per (fraction, variant): the mean of the per-task mean differences, its 95% t-interval over tasks and its
    seeds-only interval, whether each meets the resolution target, and wins / ties / losses over tasks
    (module docstring)."""
    rows = []
    for (fraction, variant), g in table.groupby(["fraction", "variant"], sort=False):
        mean, low, high = t_interval(g["diff_mean"].tolist())
        sds = g["diff_sd"].tolist() if "diff_sd" in g else [math.nan] * len(g)
        half_seeds = seeds_half_width(sds, g["n_seeds"].astype(int).tolist())
        target = RESOLUTION.get(round(float(fraction), 6), math.nan)
        counts = g["outcome"].value_counts()
        rows.append({"task": POOLED, "fraction": fraction, "variant": variant, "n_tasks": len(g),
                     "diff_mean": mean, "ci_low": low, "ci_high": high,
                     "ci_low_seeds": mean - half_seeds, "ci_high_seeds": mean + half_seeds,
                     "wins": int(counts.get("win", 0)), "ties": int(counts.get("tie", 0)),
                     "losses": int(counts.get("loss", 0)), "target": target,
                     "meets_target": bool((high - low) / 2 <= target) if np.isfinite(target) else None,
                     "meets_target_seeds": bool(half_seeds <= target) if np.isfinite(target) else None,
                     "seeds_for_target": seeds_for_half_width(sds, target) if np.isfinite(target) else math.nan})
    return pd.DataFrame(rows)


def mean_ranks(runs: pd.DataFrame, metric: str = "test_acc") -> pd.DataFrame:
    """Per (fraction, variant): the rank of its mean accuracy among the variants on each task (1 = best,
    ties share the mean rank), averaged over tasks."""
    ok = runs[runs["status"] == "completed"]
    means = ok.groupby(["task", "fraction", "variant"], sort=False)[metric].mean().reset_index()
    means["rank"] = means.groupby(["task", "fraction"])[metric].rank(ascending=False, method="average")
    return means.groupby(["fraction", "variant"], sort=False)["rank"].mean().reset_index(name="mean_rank")


def report(profile: str, sweep: str, baseline: str | Sequence[str], results_dir: Path = RESULTS_DIR) -> pd.DataFrame:
    """The across-task table of ``sweep`` under ``profile`` against each baseline (module docstring; a
    ``baseline`` column tells them apart); written next to the tasks."""
    baselines = [baseline] if isinstance(baseline, str) else list(baseline)
    folders = task_folders(profile, sweep, results_dir)
    if not folders:
        raise FileNotFoundError(f"no task has a {sweep} folder under {Path(results_dir) / profile}; run "
                                f"`make {sweep.replace('_', '-')} PROFILE={profile}` first")
    frames = []
    for task, folder in folders.items():
        runs = collect_sweep(folder)["runs"]
        if len(runs):
            frames.append(runs.assign(task=task))
    runs = pd.concat(frames, ignore_index=True)
    unknown = [b for b in baselines if b not in set(runs["variant"])]
    if unknown:
        raise ValueError(f"baseline(s) {unknown} not variants of {sweep}; variants: {sorted(set(runs['variant']))}")
    parts = []
    for b in baselines:
        table = per_task(runs, b)
        parts.append(pd.concat([table, pooled(table)], ignore_index=True).assign(baseline=b))
    both = pd.concat(parts, ignore_index=True)
    ranks = mean_ranks(runs)
    both = both.merge(ranks, on=["fraction", "variant"], how="left")
    out = Path(results_dir) / profile / f"{sweep}_across_tasks.csv"
    both = keep_other_baselines(out, both, baselines)
    both.to_csv(out, index=False)
    out.with_suffix(".md").write_text(markdown(both, profile, sweep, ranks), encoding="utf-8")
    return both


def _signed(x: float) -> str:
    return "n/a" if not np.isfinite(x) else f"{x:+.1f}"


def _interval(mean: float, low: float, high: float) -> str:
    if not np.isfinite(mean):
        return "n/a"
    if not (np.isfinite(low) and np.isfinite(high)):
        return _signed(mean)
    return f"{_signed(mean)} [{_signed(low)}, {_signed(high)}]"


def markdown(table: pd.DataFrame, profile: str, sweep: str, ranks: pd.DataFrame | None = None) -> str:
    """The across-task table as markdown, one section per data fraction: each comparison's paired difference per
    task and pooled (both intervals), wins / ties / losses, the resolution target, and the mean ranks
    (``ranks``: :func:`mean_ranks`). Written
    beside the CSV as ``<sweep>_across_tasks.md``, so the numbers a write-up quotes come from a file."""
    tasks = [t for t in dict.fromkeys(table["task"]) if t != POOLED]
    lines = [f"# {sweep} across tasks: profile `{profile}`", "",
             "Paired differences, variant - baseline, in accuracy points: mean [95% t-interval over seeds] per "
             "task; pooled: the mean over tasks [95% t-interval over tasks]; seeds only: the same mean with only "
             "the seeds' noise. Generated by `python -m experiments.suite_report` from the result files.", ""]
    for fraction in sorted(set(table["fraction"])):
        at = table[table["fraction"] == fraction]
        lines += [f"## {float(fraction):.0%} of the training data", "",
                  "| comparison | " + " | ".join(tasks) + " | pooled | seeds only | wins / ties / losses | "
                  "target met (tasks / seeds only; seeds needed) |",
                  "|---" * (len(tasks) + 5) + "|"]
        baselines = list(dict.fromkeys(at["baseline"])) if "baseline" in at else [None]
        for base in baselines:
            rows = at if base is None else at[at["baseline"] == base]
            for variant in dict.fromkeys(rows["variant"]):
                cell = rows[rows["variant"] == variant].set_index("task")
                per = [_interval(*cell.loc[t, ["diff_mean", "ci_low", "ci_high"]]) if t in cell.index else "-"
                       for t in tasks]
                if POOLED in cell.index:
                    pool = cell.loc[POOLED]
                    pooled_cells = [
                        _interval(pool["diff_mean"], pool["ci_low"], pool["ci_high"]),
                        _interval(pool["diff_mean"], pool["ci_low_seeds"], pool["ci_high_seeds"]),
                        f"{int(pool['wins'])} / {int(pool['ties'])} / {int(pool['losses'])}",
                    ]
                    target = pool.get("target", math.nan)
                    if np.isfinite(target):
                        needed = pool.get("seeds_for_target", math.nan)
                        yes = {True: "yes", False: "no"}
                        pooled_cells.append(
                            f"+-{target:g}: {yes.get(pool['meets_target'], '-')} / "
                            f"{yes.get(pool['meets_target_seeds'], '-')}"
                            + (f"; {int(needed)}" if np.isfinite(needed) else "")
                        )
                    else:
                        pooled_cells.append("-")
                else:
                    pooled_cells = ["-"] * 4
                label = f"{variant} - {base}" if base is not None else variant
                lines.append(f"| {label} | " + " | ".join(per + pooled_cells) + " |")
        if ranks is not None:
            r = ranks[ranks["fraction"] == fraction].sort_values("mean_rank")
            if len(r):
                lines += ["", "Mean rank over tasks (1 = the best mean accuracy on a task): "
                          + "; ".join(f"{v} {x:.2f}" for v, x in zip(r["variant"], r["mean_rank"]))]
        lines.append("")
    return "\n".join(lines)


def keep_other_baselines(path: Path, table: pd.DataFrame, baselines: Sequence[str]) -> pd.DataFrame:
    """``table`` after the rows of ``path`` (an earlier across-task table) whose baseline is not among
    ``baselines``: a report against one more baseline adds its rows instead of dropping the others'."""
    if not Path(path).is_file():
        return table
    old = pd.read_csv(path)
    if "baseline" not in old:
        return table
    kept = old[~old["baseline"].isin(list(baselines))]
    if kept.empty:
        return table
    print(f"[suite_report] {Path(path).name}: kept the rows against {sorted(set(kept['baseline']))}", file=sys.stderr)
    return pd.concat([kept, table], ignore_index=True)


def axis_range(means: Sequence[float], lows: Sequence[float], highs: Sequence[float], wide: float = 4.0) -> tuple[float, float]:
    """The x-range of one forest panel: every point estimate, and every interval no wider than ``wide`` times
    the median width of the panel's intervals. One seed that failed makes a task's t-interval tens of points
    wide; drawn whole, it would squeeze every other interval of the panel to a dot. Wider intervals are cut
    at the edge, and :func:`forest` writes their ends beside them."""
    means, lows, highs = (np.asarray(v, dtype=float) for v in (means, lows, highs))
    ok = np.isfinite(lows) & np.isfinite(highs)
    widths = highs[ok] - lows[ok]
    if widths.size:
        narrow = widths <= wide * max(float(np.median(widths)), 1e-9)
        points = np.concatenate([means[np.isfinite(means)], lows[ok][narrow], highs[ok][narrow], [0.0]])
    else:
        points = np.concatenate([means[np.isfinite(means)], [0.0]])
    lo, hi = float(points.min()), float(points.max())
    pad = 0.08 * (hi - lo) if hi > lo else 1.0
    return lo - pad, hi + pad


def forest(table: pd.DataFrame, profile: str, sweep: str, baseline: str, out_dir: Path | None = None,
           suffix: str | None = None) -> list[Path]:
    """A forest plot per fraction: each task's paired difference with its interval, and the pooled one
    (``<sweep>_forest``, or ``<sweep>_forest_vs_<suffix>`` for a further baseline)."""
    if "baseline" in table:
        table = table[table["baseline"] == baseline]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from experiments.plots import set_theme

    set_theme()
    out_dir = Path(out_dir) if out_dir is not None else default_out(profile)
    out_dir.mkdir(parents=True, exist_ok=True)
    fractions = sorted(table["fraction"].unique())
    variants = list(dict.fromkeys(table["variant"]))
    tasks = [t for t in dict.fromkeys(table["task"]) if t != POOLED] + [POOLED]
    fig, axes = plt.subplots(1, len(fractions), figsize=(max(7.0, 4.2 * len(fractions)), 0.45 * len(tasks) * len(variants) + 1.5),
                             sharey=True, squeeze=False)
    for ax, fraction in zip(axes[0], fractions):
        sub = table[table["fraction"] == fraction]
        xmin, xmax = axis_range(sub["diff_mean"], sub["ci_low"], sub["ci_high"])
        y, labels = 0, []
        for task in tasks:
            for i, variant in enumerate(variants):
                row = sub[(sub["task"] == task) & (sub["variant"] == variant)]
                if row.empty:
                    continue
                r = row.iloc[0]
                err = None
                if not math.isnan(r["ci_low"]):
                    low, high = max(r["ci_low"], xmin), min(r["ci_high"], xmax)
                    err = [[max(r["diff_mean"] - low, 0.0)], [max(high - r["diff_mean"], 0.0)]]
                    cut = [(edge, "<" if end < edge else ">")  # an end beyond the panel: an arrow at the edge
                           for end, edge in ((r["ci_low"], low), (r["ci_high"], high)) if end != edge]
                    for edge, marker in cut:
                        ax.plot(edge, -y, marker=marker, color=f"C{i}", ms=6, zorder=3)
                    if cut:  # and the interval's ends written above it
                        ax.annotate(f"[{_signed(r['ci_low'])}, {_signed(r['ci_high'])}]", (r["diff_mean"], -y),
                                    xytext=(4, 4), textcoords="offset points", fontsize=7, color=f"C{i}",
                                    ha="left" if r["diff_mean"] < (xmin + xmax) / 2 else "right")
                ax.errorbar(r["diff_mean"], -y, xerr=err, fmt="D" if task == POOLED else "o", color=f"C{i}",
                            capsize=3, ms=6 if task == POOLED else 4, zorder=3)
                if task == POOLED and np.isfinite(r.get("ci_low_seeds", math.nan)):  # seed noise only: a band
                    ax.plot([r["ci_low_seeds"], r["ci_high_seeds"]], [-y, -y], color=f"C{i}", lw=6, alpha=0.35,
                            solid_capstyle="butt", zorder=2)
                labels.append((y, f"{task}: {variant}" if len(variants) > 1 else task))
                y += 1
            y += 0.5
        ax.axvline(0, color="0.3", lw=1)
        ax.set_xlim(xmin, xmax)
        ax.set(title=f"{fraction:.0%} of the training data", xlabel=f"accuracy - {baseline} (points, 95% CI)")
        ax.set_yticks([-p for p, _ in labels], [name for _, name in labels])
    fig.suptitle(f"{profile}, {sweep}: paired differences per task and pooled\n(a task: 95% interval over its "
                 f"seeds; pooled = mean over tasks, whiskers: 95% interval over tasks, band: seed noise only;\n"
                 f"an interval cut at the panel's edge has its ends written above it)")
    fig.tight_layout()
    stem = f"{sweep}_forest" if suffix is None else f"{sweep}_forest_vs_{suffix}"
    paths = [out_dir / f"{stem}.png", out_dir / f"{stem}.pdf"]
    for path in paths:
        fig.savefig(path, bbox_inches="tight", dpi=150, metadata={"CreationDate": None} if path.suffix == ".pdf" else None)
    plt.close(fig)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.suite_report", description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="suite")
    parser.add_argument("--sweep", default="sample_efficiency")
    parser.add_argument("--baseline", nargs="+", default=["lora"],
                        help="one or more variants to compare with (the first names the plain file names)")
    parser.add_argument("--results", default=str(RESULTS_DIR))
    parser.add_argument("--figures", default=None, help="figure folder (default: figures/<profile>/)")
    args = parser.parse_args(argv)
    try:
        table = report(args.profile, args.sweep, args.baseline, Path(args.results))
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    paths = []
    for i, baseline in enumerate(args.baseline):
        suffix = None if i == 0 else re.sub(r"[^a-z0-9]+", "_", baseline.lower()).strip("_")
        paths += forest(table, args.profile, args.sweep, baseline, args.figures, suffix)
    summary: Any = table[table["task"] == POOLED][["baseline", "fraction", "variant", "n_tasks", "diff_mean", "ci_low",
                                                   "ci_high", "ci_low_seeds", "ci_high_seeds", "wins", "ties",
                                                   "losses", "mean_rank", "meets_target", "meets_target_seeds",
                                                   "seeds_for_target"]]
    with pd.option_context("display.width", 160):
        print(summary.round(2).to_string(index=False))
    print(f"-> {Path(args.results) / args.profile / (args.sweep + '_across_tasks.csv')}, "
          f"{', '.join(str(p) for p in paths if p.suffix == '.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

