"""Does DoRAN stabilise DoRA? The stability study's tables and figures from its saved results. Trains nothing.

    python -m experiments.stability_report --profile default        # make stability runs it after the sweeps
    python -m experiments.stability_report --across default suite/trec6 vision/elpv_type   # the verdict over tasks

It reads the sweep folders ``stability`` (the learning-rate grid), ``stability_precision`` (the same grid in
float16 mixed precision, where run) and ``stability_init`` (hard initial conditions) of a profile (or of one
task of a multi-task profile: ``--profile suite/trec6``), and writes next to them:

- ``stability_lr.csv``: per sweep, method and learning rate: finished runs, diverged runs (a non-finite loss or
  gradient, or the majority class at the end) and how many of them non-finite, runs refused before training,
  runs not run yet, the mean test accuracy of the runs that
  did not diverge with its 95% t-interval, the divergence rate, and gradient-norm percentiles;
- ``stability_width.csv``: per sweep and method, the width of its stable learning-rate range in decades: the
  longest run of consecutive grid points where no seed diverged and the mean accuracy is within 1 point of the
  method's best, each grid point counting for one grid step (half a decade on the default grid);
- ``stability_paired.csv``: DoRAN - DoRA per learning rate, seed by seed where both finished;
- ``stability_init.csv``: per condition and method: runs, diverged, refused, mean accuracy;
- ``stability_verdict.csv``: per sweep, the three criteria for "DoRAN is more stable than DoRA" fixed before
  the runs (docs/stability.md), each true or false, and the verdict: ``supported``, ``contradicted`` (DoRA
  strictly more stable: criteria 1 and 2 reversed) or ``not supported``;

and the figures ``figures/<profile>/stability_lr.{png,pdf}`` (accuracy against the learning rate, diverged runs
marked and counted, not averaged; the divergence rate) and ``stability_init.{png,pdf}``.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from experiments.collect import collect_sweep, t_interval
from experiments.constants import RESULTS_DIR, SWEEP_FILE
from experiments.plots import default_out
from experiments.runner import REFUSALS

SWEEPS = ("stability", "stability_precision")
FAMILIES = ("lora", "dora", "doran", "doran, static factors", "doran, tau=0")
#: within this many accuracy points of a method's best mean, a learning rate counts as stable
TOLERANCE_POINTS = 1.0


def _runs(folder: Path) -> pd.DataFrame:
    runs = collect_sweep(folder)["runs"]
    if runs.empty:
        return runs
    runs = runs.copy()
    runs["refused"] = runs["status"].eq("error") & runs.get("error_type", pd.Series(dtype=str)).isin(REFUSALS)
    runs["diverged"] = runs.get("diverged", False).fillna(False).astype(bool) | runs["status"].eq("diverged")
    return runs


def lr_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Per method and learning rate: counts, divergence rate, accuracy of the runs that did not diverge."""
    rows = []
    for (family, lr), g in runs.groupby(["tag_family", "tag_lr"], sort=False):
        ok = g[(g["status"] == "completed") & ~g["diverged"]]
        mean, low, high = t_interval((100 * ok["test_acc"].astype(float)).tolist())
        norms = g["grad_norm_median"].dropna().astype(float)
        finished = g[g["status"].isin(["completed", "diverged"])]  # not: refused, raised, not run yet
        rows.append({
            "method": family, "lr": float(lr), "runs": len(finished), "diverged": int(finished["diverged"].sum()),
            "nonfinite": int(finished["nonfinite"].fillna(False).astype(bool).sum()) if "nonfinite" in finished else 0,
            "refused": int(g["refused"].sum()), "errors": int((g["status"] == "error").sum() - g["refused"].sum()),
            "not_run": int((g["status"] == "missing").sum()),
            "divergence_rate": float(finished["diverged"].mean()) if len(finished) else math.nan,
            "acc_mean": mean, "acc_ci_low": low, "acc_ci_high": high,
            "grad_norm_p50": float(norms.median()) if len(norms) else None,
            "grad_norm_p95": float(g["grad_norm_p95"].dropna().astype(float).median()) if len(norms) else None,
            "grad_spike_ratio": float(g["grad_spike_ratio"].dropna().astype(float).median()) if len(norms) else None,
            "loss_spikes": int(g["loss_spikes"].fillna(0).sum()),
        })
    return pd.DataFrame(rows).sort_values(["method", "lr"], kind="stable").reset_index(drop=True)


def stable_width(table: pd.DataFrame, tolerance: float = TOLERANCE_POINTS) -> pd.DataFrame:
    """Per method: the longest run of consecutive grid learning rates with no divergence and a mean accuracy
    within ``tolerance`` points of the method's best, in decades (each point counting for one grid step)."""
    rows = []
    for method, g in table.groupby("method", sort=False):
        g = g.sort_values("lr")
        lrs = g["lr"].to_numpy()
        step = float(np.median(np.diff(np.log10(lrs)))) if len(lrs) > 1 else 0.0
        best = g["acc_mean"].max()
        ran = (g["runs"] > 0) & (g["errors"] == 0) & (g.get("not_run", 0) == 0)  # every seed finished
        good = (ran & (g["diverged"] == 0) & (g["acc_mean"] >= best - tolerance)).to_numpy()
        longest = current = 0
        first = last = None
        for i, ok in enumerate(good):
            current = current + 1 if ok else 0
            if current > longest:
                longest, last = current, i
                first = i - current + 1
        rows.append({"method": method, "best_acc": best, "stable_points": longest,
                     "width_decades": longest * step,
                     "lr_low": float(lrs[first]) if longest else None, "lr_high": float(lrs[last]) if longest else None})
    return pd.DataFrame(rows)


def paired(runs: pd.DataFrame, a: str = "doran", b: str = "dora") -> pd.DataFrame:
    """``a - b`` per learning rate, seed by seed, over the seeds where both finished without diverging."""
    rows = []
    ok = runs[(runs["status"] == "completed") & ~runs["diverged"]]
    for lr, g in ok.groupby("tag_lr", sort=True):
        x = g[g["tag_family"] == a].set_index("seed")["test_acc"]
        y = g[g["tag_family"] == b].set_index("seed")["test_acc"]
        seeds = sorted(set(x.index) & set(y.index))
        mean, low, high = t_interval([100 * (float(x[s]) - float(y[s])) for s in seeds])
        rows.append({"lr": float(lr), "pairs": len(seeds), "diff_mean": mean, "ci_low": low, "ci_high": high})
    return pd.DataFrame(rows)


def verdict(table: pd.DataFrame, width: pd.DataFrame, a: str = "doran", b: str = "dora",
            tolerance: float = TOLERANCE_POINTS) -> dict[str, object]:
    """The criteria for "``a`` is more stable than ``b``" (docs/stability.md), from one sweep's tables.

    1. ``a``'s stable range is wider than ``b``'s by at least one grid step;
    2. at no learning rate does ``a`` diverge in more seeds than ``b``;
    3. where ``b`` diverges in at least one seed and ``a`` in none, ``a``'s mean accuracy is within
       ``tolerance`` points of its best (it did not survive by not learning).

    ``supported`` when all three hold; ``contradicted`` when 1 and 2 hold with the methods swapped; otherwise
    ``not supported``. A grid point where either method has runs not finished yet makes the verdict
    ``incomplete``.
    """
    ta = table[table["method"] == a].set_index("lr")
    tb = table[table["method"] == b].set_index("lr")
    wa = width[width["method"] == a].iloc[0]
    wb = width[width["method"] == b].iloc[0]
    lrs = sorted(set(ta.index) & set(tb.index))
    out: dict[str, object] = {"a": a, "b": b, "grid_points": len(lrs),
                              "a_stable_points": int(wa["stable_points"]), "b_stable_points": int(wb["stable_points"]),
                              "a_width_decades": float(wa["width_decades"]), "b_width_decades": float(wb["width_decades"])}
    if not lrs or any(ta.loc[lr, "not_run"] or tb.loc[lr, "not_run"] for lr in lrs):
        return {**out, "c1_wider": None, "c2_never_more_divergent": None, "c3_learned_where_b_failed": None,
                "verdict": "incomplete"}
    c1 = wa["stable_points"] >= wb["stable_points"] + 1
    c2 = all(ta.loc[lr, "diverged"] <= tb.loc[lr, "diverged"] for lr in lrs)
    rescued = [lr for lr in lrs if tb.loc[lr, "diverged"] >= 1 and ta.loc[lr, "diverged"] == 0]
    best = table.loc[table["method"] == a, "acc_mean"].max()
    c3 = all(ta.loc[lr, "acc_mean"] >= best - tolerance for lr in rescued)
    reverse = wb["stable_points"] >= wa["stable_points"] + 1 and all(
        tb.loc[lr, "diverged"] <= ta.loc[lr, "diverged"] for lr in lrs)
    result = "supported" if (c1 and c2 and c3) else "contradicted" if reverse else "not supported"
    return {**out, "c1_wider": bool(c1), "c2_never_more_divergent": bool(c2), "c3_learned_where_b_failed": bool(c3),
            "rescued_lrs": " ".join(f"{lr:g}" for lr in rescued), "verdict": result}


def across(verdicts: dict[str, str]) -> str:
    """Across tasks (per task: ``supported`` / ``contradicted`` / ``not supported`` / ``incomplete``):
    supported if it holds on at least two of three tasks (two thirds of them) and is contradicted on none."""
    if not verdicts or any(v == "incomplete" for v in verdicts.values()):
        return "incomplete"
    held = sum(v == "supported" for v in verdicts.values())
    if any(v == "contradicted" for v in verdicts.values()):
        return "not supported (contradicted on " + ", ".join(k for k, v in verdicts.items() if v == "contradicted") + ")"
    return "supported" if 3 * held >= 2 * len(verdicts) else "not supported"


def init_table(runs: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for (condition, family), g in runs.groupby(["tag_condition", "tag_family"], sort=False):
        ok = g[(g["status"] == "completed") & ~g["diverged"]]
        mean, low, high = t_interval((100 * ok["test_acc"].astype(float)).tolist())
        g = g[g["status"] != "missing"]  # not run yet
        rows.append({"condition": condition, "method": family, "runs": len(g), "diverged": int(g["diverged"].sum()),
                     "refused": int(g["refused"].sum()), "acc_mean": mean, "acc_ci_low": low, "acc_ci_high": high})
    return pd.DataFrame(rows)


def figures(tables: dict[str, pd.DataFrame], init: pd.DataFrame | None, out_dir: Path, title: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from experiments.plots import save, set_theme

    set_theme()
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    if tables:
        fig, axes = plt.subplots(2, len(tables), figsize=(6 * len(tables), 7.5), squeeze=False, sharex=True)
        for col, (sweep, table) in enumerate(tables.items()):
            top, bottom = axes[0][col], axes[1][col]
            for i, method in enumerate(m for m in FAMILIES if m in set(table["method"])):
                g = table[table["method"] == method].sort_values("lr")
                # methods side by side around each learning rate, so that equal values stay visible
                x = g["lr"] * 10 ** (0.03 * (i - (len(FAMILIES) - 1) / 2))
                top.errorbar(x, g["acc_mean"], yerr=[g["acc_mean"] - g["acc_ci_low"], g["acc_ci_high"] - g["acc_mean"]],
                             marker="o", capsize=3, color=f"C{i}", label=method)
                for _, r in g[g["diverged"] > 0].iterrows():  # one row of counts per method
                    top.annotate(f"{int(r['diverged'])}x", (r["lr"], 0.01 + 0.05 * i), xycoords=("data", "axes fraction"),
                                 color=f"C{i}", ha="center", va="bottom", fontsize=7)
                bottom.plot(x, 100 * g["divergence_rate"], marker="s", color=f"C{i}", label=method)
            top.set(xscale="log", ylabel="test accuracy (%), runs that did not diverge",
                    title=f"{sweep}: accuracy (counts: diverged runs, not averaged)")
            # limits from the means, not the intervals: with 2 or 3 surviving seeds a t-interval can span more
            # than 0..100 and would flatten every curve; bars that leave the axes are cut at its edge
            means = table["acc_mean"].dropna()
            low, high = (max(0.0, means.min() - 5), min(100.0, means.max() + 3)) if len(means) else (0.0, 100.0)
            top.set_ylim(low - 0.3 * (high - low), high)  # room for the counts below the curves
            top.set_yticks([t for t in top.get_yticks() if low <= t <= high])  # no accuracy ticks below 0
            bottom.set(xscale="log", xlabel="learning rate",
                       ylabel="diverged runs (%): non-finite or\nat the majority class", ylim=(-5, 105))
            top.legend(fontsize=7)
        fig.suptitle(title)
        written += save(fig, out_dir, "stability_lr")
    if init is not None and not init.empty:
        conditions = list(dict.fromkeys(init["condition"]))
        methods = [m for m in FAMILIES if m in set(init["method"])]
        fig, ax = plt.subplots(figsize=(1.8 * len(conditions) + 2, 4))
        width = 0.8 / max(1, len(methods))
        for i, method in enumerate(methods):
            for j, condition in enumerate(conditions):
                r = init[(init["condition"] == condition) & (init["method"] == method)]
                if r.empty:
                    continue
                r = r.iloc[0]
                x = j + (i - (len(methods) - 1) / 2) * width
                if r["refused"] == r["runs"]:
                    ax.text(x, 1, "refused", rotation=90, ha="center", va="bottom", fontsize=7, color=f"C{i}")
                    continue
                value = 0 if math.isnan(r["acc_mean"]) else r["acc_mean"]
                ax.bar(x, value, width, color=f"C{i}", label=method if j == 0 else None)
                if r["diverged"]:
                    ax.text(x, value + 1, f"{int(r['diverged'])}/{int(r['runs'])}\ndiv.", ha="center", fontsize=7)
        ax.set_xticks(range(len(conditions)), conditions)
        ax.set(ylabel="test accuracy (%),\nruns that did not diverge", ylim=(0, 100),
               title=f"{title}: hard initial conditions (diverged runs counted, not averaged)")
        ax.legend(fontsize=7, ncol=len(methods), loc="upper center")
        written += save(fig, out_dir, "stability_init")
    return written


def report(profile: str, results_dir: Path = RESULTS_DIR, figures_dir: Path | None = None) -> dict[str, pd.DataFrame]:
    """Every table of the module docstring for ``profile``; writes the CSVs and the figures."""
    root = Path(results_dir) / profile
    tables, widths, pairs, verdicts = {}, [], [], []
    for sweep in SWEEPS:
        folder = root / sweep
        if not (folder / SWEEP_FILE).is_file():
            continue
        runs = _runs(folder)
        if runs.empty:
            continue
        table = lr_table(runs)
        tables[sweep] = table
        width = stable_width(table)
        widths.append(width.assign(sweep=sweep))
        if {"doran", "dora"} <= set(table["method"]):
            verdicts.append({"sweep": sweep, **verdict(table, width)})
        pairs.append(paired(runs).assign(sweep=sweep))
    init = None
    if (root / "stability_init" / SWEEP_FILE).is_file():
        runs = _runs(root / "stability_init")
        init = init_table(runs) if not runs.empty else None
    if not tables and init is None:
        raise FileNotFoundError(f"no stability sweep under {root}: run `make stability PROFILE={profile}` first")
    out = {}
    if tables:
        out["lr"] = pd.concat([t.assign(sweep=s) for s, t in tables.items()], ignore_index=True)
        out["width"] = pd.concat(widths, ignore_index=True)
        out["paired"] = pd.concat(pairs, ignore_index=True)
        if verdicts:
            out["verdict"] = pd.DataFrame(verdicts)
    if init is not None:
        out["init"] = init
    for name, table in out.items():
        table.to_csv(root / f"stability_{name}.csv", index=False)
    figures(tables, init, Path(figures_dir) if figures_dir else default_out(profile), profile)
    return out


def _print_across(profiles: list[str], results_dir: Path) -> int:
    rows = []
    for profile in profiles:
        path = results_dir / profile / "stability_verdict.csv"
        if not path.is_file():
            print(f"error: no {path}: run `python -m experiments.stability_report --profile {profile}` first",
                  file=sys.stderr)
            return 2
        rows.append(pd.read_csv(path).assign(task=profile))
    table = pd.concat(rows, ignore_index=True)
    with pd.option_context("display.width", 200):
        print(table[["task", "sweep", "a_stable_points", "b_stable_points", "c1_wider", "c2_never_more_divergent",
                     "c3_learned_where_b_failed", "verdict"]].to_string(index=False))
    for sweep, g in table.groupby("sweep", sort=False):
        print(f"{sweep}: DoRAN more stable than DoRA across {len(g)} task(s): "
              f"{across(dict(zip(g['task'], g['verdict'])))}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.stability_report", description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="default")
    parser.add_argument("--across", nargs="+", metavar="PROFILE",
                        help="print the verdict over these profiles/tasks from their stability_verdict.csv")
    parser.add_argument("--results", default=str(RESULTS_DIR))
    parser.add_argument("--figures", default=None, help="figure folder (default: figures/<profile>/)")
    args = parser.parse_args(argv)
    if args.across:
        return _print_across(args.across, Path(args.results))
    try:
        out = report(args.profile, Path(args.results), args.figures)
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    with pd.option_context("display.width", 160):
        if "width" in out:
            print(out["width"].round(3).to_string(index=False))
        if "verdict" in out:
            print(out["verdict"].round(3).to_string(index=False))
        if "init" in out:
            print(out["init"].round(2).to_string(index=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
