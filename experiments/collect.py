"""Result files -> CSV tables, paired statistics and the results table (docs/results.md). Trains nothing.

    python -m experiments.collect --profile default                  # every sweep folder of the profile
    python -m experiments.collect --profile default --readme docs/results.md   # also replace the table there

For each sweep folder ``<results>/<profile>/<sweep>/`` (``sweep.json`` names the grid; runs of an older grid
left in the folder are ignored unless ``--all``) it writes, next to the result files:

- ``runs.csv``      one row per grid point: coordinates, status (completed / diverged / error / missing),
                    test and validation accuracy, trainable parameters, adapter switches, tuned file, device,
                    git commit and dirty flag, wall time;
- ``summary.csv``   per (fraction, variant): runs planned and finished, diverged and collapsed (learned,
                    then lost it: ``collapsed``), mean, standard deviation and 95% t-interval of the test
                    accuracy over seeds;
- ``paired.csv``    per (fraction, variant): the seed-by-seed difference with the sweep's baseline variant
                    (same subset, head initialisation and batch order: checked through the subset hash), its
                    mean and 95% t-interval, a paired t-test p-value and the number of seeds where it wins;
- ``tau.csv.gz``    tau per step, layer and projection (relative and absolute units) of every run with tau;
- ``grad_norm.csv.gz`` adapter gradient norm per step and parameter group (gzip; pandas reads it as is);
- ``reach.csv``     (sample-efficiency sweep) the fraction of training data each method needs to reach the
                    baseline's full-data accuracy, interpolated log-linearly between measured fractions;

and ``<results>/<profile>/results_table.md`` (the results section of docs/results.md; ``--readme`` pastes it between
the markers ``<!-- results-table:start -->`` and ``<!-- results-table:end -->``).
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from doran.results import find_result, read_json, result_files, run_id_of_file
from experiments.constants import RESULTS_DIR, STABILITY_SWEEPS, SWEEP_FILE, SWEEPS, method_order, param_groups
from experiments.runner import read_manifest

START, END = "<!-- results-table:start -->", "<!-- results-table:end -->"
PARAM_GROUPS = param_groups()


# ---------------------------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------------------------


def t_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
    """``(mean, low, high)``: the mean of ``values`` and its Student-t confidence interval (NaN if n < 2).

    >>> [round(v, 3) for v in t_interval([1.0, 2.0, 3.0])]
    [2.0, -0.484, 4.484]
    """
    from scipy import stats

    x = np.asarray([v for v in values if v is not None and np.isfinite(v)], dtype=float)
    if len(x) == 0:
        return math.nan, math.nan, math.nan
    mean = float(x.mean())
    if len(x) < 2:
        return mean, math.nan, math.nan
    half = float(stats.t.ppf(0.5 + level / 2, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x)))
    return mean, mean - half, mean + half


def paired_t_pvalue(diffs: Sequence[float]) -> float:
    """Two-sided p-value of a paired t-test (mean difference 0); NaN with fewer than 2 pairs or no spread."""
    from scipy import stats

    x = np.asarray(diffs, dtype=float)
    if len(x) < 2 or np.allclose(x, x[0]):
        return 0.0 if len(x) >= 2 and x[0] != 0 else math.nan
    return float(stats.ttest_1samp(x, 0.0).pvalue)


def reach_fraction(fractions: Sequence[float], accs: Sequence[float], target: float) -> tuple[float, str]:
    """The data fraction at which the accuracy curve first reaches ``target``: ``(fraction, how)``.

    Log-linear interpolation between the two measured fractions around the first crossing (``how`` is
    ``interpolated``); ``measured`` if a measured point equals the target; ``at or below`` (the smallest
    fraction) if the curve starts above it; ``(nan, "not reached")`` if it never does.

    >>> reach_fraction([0.01, 0.1, 1.0], [0.70, 0.80, 0.84], 0.82)
    (0.316..., 'interpolated')
    """
    pts = sorted((float(f), float(a)) for f, a in zip(fractions, accs) if a is not None and np.isfinite(a))
    if not pts:
        return math.nan, "not reached"
    if pts[0][1] >= target:
        return pts[0][0], "at or below"
    for (f0, a0), (f1, a1) in itertools.pairwise(pts):
        if a1 >= target:
            if a1 == target:
                return f1, "measured"
            w = (target - a0) / (a1 - a0)
            return float(math.exp(math.log(f0) + w * (math.log(f1) - math.log(f0)))), "interpolated"
    return math.nan, "not reached"


# ---------------------------------------------------------------------------------------------------------
# Reading result files
# ---------------------------------------------------------------------------------------------------------


def _read_json(path: Path | None) -> dict[str, Any] | None:
    if path is None:
        return None
    try:
        return read_json(path)
    except (OSError, ValueError, EOFError):
        return None


def _entries(folder: Path, include_all: bool) -> list[dict[str, Any]]:
    """Grid points of a sweep folder: the manifest's, plus (``include_all`` or no manifest) stray results."""
    manifest = read_manifest(folder)
    entries = list(manifest.get("entries", {}).values())
    if include_all or not entries:
        known = {e["run_id"] for e in entries}
        for path in result_files(folder):
            if run_id_of_file(path) in known:
                continue
            r = _read_json(path)
            if r and "run_id" in r:
                entries.append(
                    {
                        "run_id": r["run_id"],
                        "sweep": folder.name,
                        "variant": r["method"],
                        "method": r["method"],
                        "seed": r["seed"],
                        "fraction": r["fraction"],
                        "tuned": None,
                        "tags": {},
                    }
                )
    return entries


#: a recorded training loss more than this many times the median of the records before it is a spike
SPIKE_FACTOR = 3.0
#: accuracy within this much of the majority class's counts as ending at the majority class (diverged)
MAJORITY_MARGIN = 0.005
#: a run collapsed (learned, then lost it) when its smoothed training loss fell to at most COLLAPSE_DROP times
#: its start and its end is back at COLLAPSE_BACK times the start or above
COLLAPSE_DROP, COLLAPSE_BACK = 0.5, 0.85


def collapsed(losses: Sequence[float]) -> bool | None:
    """Whether a run learned and then lost it, from its recorded training losses (None: fewer than 6 records).

    A run that trains to chance with finite losses ends ``completed``, and unless it ends within
    ``MAJORITY_MARGIN`` of the majority class the divergence rule does not see it. This sees it from the loss alone. Each record is
    one batch's loss, so the records are first smoothed by a moving average over a tenth of them (at least
    3); the run collapsed when the smoothed loss fell to at most ``COLLAPSE_DROP`` of its start (the mean of
    the first window) and its end (the mean of the last window) is back at ``COLLAPSE_BACK`` of the start or
    above. A run that never learned (a rate too low) is not collapsed.

    >>> collapsed([2.3, 2.2, 1.0, 0.3, 0.2, 0.2, 2.2, 2.3, 2.3, 2.3, 2.3, 2.3])
    True
    >>> collapsed([2.3, 2.2, 1.0, 0.3, 0.2, 0.1, 0.1, 0.1, 0.1]), collapsed([2.3, 2.2, 2.3, 2.2, 2.3, 2.2])
    (False, False)
    """
    x = np.asarray([float(v) for v in losses if v is not None and np.isfinite(v)])
    w = max(3, len(x) // 10)
    if len(x) < 2 * w:
        return None
    smooth = np.convolve(x, np.ones(w) / w, mode="valid")
    start, end = float(smooth[0]), float(smooth[-1])
    if start <= 0:
        return None
    return bool(smooth.min() <= COLLAPSE_DROP * start and end >= COLLAPSE_BACK * start)


def grad_norms(result: dict[str, Any]) -> dict[str, Any]:
    """The run's gradient-norm columns, or {} for a float16 run written before the recorder divided out the
    loss scale (no ``loss_scale`` column): its norms are multiplied by a scale that halved at every overflow,
    so no norm and no spike ratio can be read off them."""
    grad = result.get("grad_norm") or {}
    precision = ((result.get("config") or {}).get("train") or {}).get("precision")
    return {} if precision == "16-mixed" and "loss_scale" not in grad else grad


def stability(result: dict[str, Any]) -> dict[str, Any]:
    """What a run says about its stability (docs/stability.md): ``diverged`` (a non-finite loss or gradient
    stopped it, or it ended at the majority class), ``collapsed`` (:func:`collapsed`), ``loss_spikes``
    (recorded training losses above ``SPIKE_FACTOR`` times the median of the records before them, after the
    first five) and
    ``grad_spike_ratio`` (the largest total adapter-gradient norm over its median; None for a float16 run
    recorded in loss-scaled units, before the recorder divided the scale out)."""
    m = result.get("metrics", {})
    acc, majority = m.get("test/acc"), m.get("test/majority_acc")
    at_majority = acc is not None and majority is not None and acc <= majority + MAJORITY_MARGIN
    losses = [v for v in ((result.get("curves") or {}).get("steps") or {}).get("train_loss", []) if v is not None]
    spikes = sum(1 for i in range(5, len(losses)) if losses[i] > SPIKE_FACTOR * float(np.median(losses[:i])))
    grad = grad_norms(result)
    norms = [v for v in grad.get("total", []) if v is not None]
    median = float(np.median(norms)) if norms else 0.0
    return {
        "diverged": result.get("status") != "completed" or at_majority,
        "nonfinite": result.get("status") == "failed",
        "collapsed": collapsed(losses),
        "loss_spikes": spikes,
        "grad_norm_median": median if norms else None,
        "grad_norm_p95": float(np.percentile(norms, 95)) if norms else None,
        "grad_spike_ratio": max(norms) / median if norms and median > 0 else None,
    }


def _row(
    entry: dict[str, Any], result: dict[str, Any] | None, error: dict[str, Any] | None
) -> dict[str, Any]:
    row: dict[str, Any] = {k: entry.get(k) for k in ("sweep", "variant", "method", "seed", "fraction")}
    row.update({f"tag_{k}": v for k, v in (entry.get("tags") or {}).items()})
    row["tuned"] = entry.get("tuned") or ""
    row["run_id"] = entry["run_id"]
    if result is None:
        row["status"] = "error" if error else "missing"
        row["error"] = f"{error.get('error')}: {error.get('message')}" if error else ""
        row["error_type"] = error.get("error") if error else None
        return row
    m, a, cfg = result.get("metrics", {}), result.get("adapter_config", {}), result.get("config", {})
    row["status"] = "completed" if result["status"] == "completed" else "diverged"
    row["error"] = (result.get("failure") or {}).get("cause", "")
    row.update(
        {
            "test_acc": m.get("test/acc"),
            "test_loss": m.get("test/loss"),
            "val_acc": m.get("val/acc"),
            "majority_acc": m.get("test/majority_acc"),
        }
    )
    params = result.get("params", {})
    row["params_trainable"] = params.get("trainable")
    row["params_adapter"] = (params.get("trainable") or 0) - (params.get("other") or 0)
    row.update({f"params_{g}": params.get(g, 0) for g in PARAM_GROUPS})
    for key in (
        "r",
        "alpha",
        "magnitude",
        "detach_norm",
        "tau_mode",
        "tau_init",
        "factors",
        "sharing",
        "gen_hidden",
        "heads",
        "diag",
        "rotation_rank",
    ):
        row[key] = a.get(key)
    train = cfg.get("train", {})
    row.update(
        {
            "lr": train.get("lr"),
            "weight_decay": train.get("weight_decay"),
            "epochs": train.get("epochs"),
            "batch_size": train.get("batch_size"),
            "steps": result.get("steps"),
        }
    )
    subset = result.get("data", {}).get("subset", {})
    row["train_size"], row["subset_sha256"] = subset.get("size"), subset.get("sha256")
    tau = result.get("tau") or {}
    if tau.get("step"):
        last = max(tau["step"])
        final = [t for s, t in zip(tau["step"], tau["tau"]) if s == last and t is not None]
        row["tau_final_mean"] = float(np.mean(final)) if final else None
    row.update(stability(result))
    device, git = result.get("device", {}), result.get("env", {}).get("git", {})
    cpu = f"CPU, {device.get('cpu_count')} cores" if device.get("type") == "cpu" else None
    row.update(
        {
            "device": device.get("cuda_device") or cpu or device.get("type"),
            "device_type": device.get("type"),
            "precision": device.get("precision"),
            "commit": (git.get("commit") or "")[:12],
            "dirty": git.get("dirty"),
            "wall_time_s": result.get("wall_time_s"),
            "fit_wall_s": result.get("fit_wall_s"),
            "finished_at": result.get("finished_at"),
        }
    )
    return row


def load_sweep_folder(
    folder: str | Path, include_all: bool = False
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, dict[str, Any]]:
    """``(runs, tau, grad_norm, manifest)`` of one sweep folder (see the module docstring for columns)."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    rows, taus, grads = [], [], []
    for entry in _entries(folder, include_all):
        result = _read_json(find_result(folder, entry["run_id"]))
        error = _read_json(folder / f"{entry['run_id']}.error.json") if result is None else None
        rows.append(_row(entry, result, error))
        if result is None:
            continue
        coords = {
            "run_id": entry["run_id"],
            "variant": entry["variant"],
            "method": entry["method"],
            "seed": entry["seed"],
            "fraction": entry["fraction"],
            **{f"tag_{k}": v for k, v in (entry.get("tags") or {}).items()},
        }
        tau = result.get("tau") or {}
        if tau.get("step"):
            frame = pd.DataFrame(
                {k: tau[k] for k in ("step", "layer", "projection", "tau", "tau_abs") if k in tau}
            )
            taus.append(frame.assign(**coords))
        grad = grad_norms(result)
        if grad.get("step"):
            grads.append(pd.DataFrame(grad).assign(**coords))
    runs = pd.DataFrame(rows)
    if not runs.empty:
        order = {v: i for i, v in enumerate(manifest.get("variants", {}))}
        runs["_order"] = runs["variant"].map(order).fillna(len(order))
        runs = runs.sort_values(["_order", "fraction", "seed"]).drop(columns="_order").reset_index(drop=True)
    tau_frame = pd.concat(taus, ignore_index=True) if taus else pd.DataFrame()
    grad_frame = pd.concat(grads, ignore_index=True) if grads else pd.DataFrame()
    return runs, tau_frame, grad_frame, manifest


# ---------------------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------------------


def summarize(runs: pd.DataFrame, metric: str = "test_acc") -> pd.DataFrame:
    """Per (fraction, variant): planned, completed, diverged and errored runs; mean, sd, 95% t-interval.

    ``n_diverged`` counts runs with status ``diverged`` (non-finite, no accuracy, not in the mean); runs that
    finished at the majority class, which the stability column ``diverged`` also marks, count in ``n``."""
    out = []
    for (fraction, variant), g in runs.groupby(["fraction", "variant"], sort=False):
        ok = g[g["status"] == "completed"]
        values = ok[metric].astype(float).tolist() if metric in ok else []
        mean, low, high = t_interval(values)
        tags = {c: g[c].iloc[0] for c in g.columns if c.startswith("tag_")}
        out.append(
            {
                "fraction": fraction,
                "variant": variant,
                "method": g["method"].iloc[0],
                **tags,
                "n_planned": len(g),
                "n": len(ok),
                "n_diverged": int((g["status"] == "diverged").sum()),
                "n_collapsed": int(ok["collapsed"].eq(True).sum()) if "collapsed" in ok else 0,
                "n_error": int(g["status"].isin(["error", "missing"]).sum()),
                "mean": mean,
                "sd": float(np.std(values, ddof=1)) if len(values) > 1 else math.nan,
                "ci_low": low,
                "ci_high": high,
                "params_trainable": ok["params_trainable"].median() if len(ok) else math.nan,
                "params_adapter": ok["params_adapter"].median() if len(ok) else math.nan,
                "tau_final_mean": ok["tau_final_mean"].mean()
                if "tau_final_mean" in ok and len(ok)
                else math.nan,
                "tuned": ";".join(sorted(set(g["tuned"].fillna("")) - {""})) or "(profile defaults)",
            }
        )
    return pd.DataFrame(out)


def paired_differences(runs: pd.DataFrame, baseline: str, metric: str = "test_acc") -> pd.DataFrame:
    """Seed-by-seed ``variant - baseline`` per fraction: n pairs, mean, 95% t-interval, p-value, wins.

    ``paired_ok`` is False if any pair was trained on different subsets (subset hashes differ): then the
    comparison is not paired and the row should not be trusted.
    """
    ok = runs[runs["status"] == "completed"]
    out = []
    for fraction, g in ok.groupby("fraction", sort=False):
        base = g[g["variant"] == baseline].set_index("seed")
        for variant, v in g.groupby("variant", sort=False):
            if variant == baseline:
                continue
            v = v.set_index("seed")
            seeds = sorted(set(v.index) & set(base.index))
            diffs = [float(v.loc[s, metric]) - float(base.loc[s, metric]) for s in seeds]
            mean, low, high = t_interval(diffs)
            same = all(v.loc[s, "subset_sha256"] == base.loc[s, "subset_sha256"] for s in seeds)
            out.append(
                {
                    "fraction": fraction,
                    "variant": variant,
                    "baseline": baseline,
                    "n_pairs": len(seeds),
                    "diff_mean": mean,
                    "diff_ci_low": low,
                    "diff_ci_high": high,
                    "p_value": paired_t_pvalue(diffs),
                    "wins": int(sum(d > 0 for d in diffs)),
                    "paired_ok": same,
                    "seeds": " ".join(map(str, seeds)),
                }
            )
    return pd.DataFrame(out)


def reach_table(summary: pd.DataFrame, baseline: str) -> pd.DataFrame:
    """Fraction of the training data each variant needs to reach the baseline's accuracy at the largest
    fraction (log-linear interpolation of the mean curve, ``reach_fraction``), and the baseline's fraction
    divided by it (> 1: more sample-efficient than the baseline)."""
    if summary.empty or baseline not in set(summary["variant"]):
        return pd.DataFrame()
    top = summary["fraction"].max()
    target = float(summary[(summary["variant"] == baseline) & (summary["fraction"] == top)]["mean"].iloc[0])
    rows = []
    for variant, g in summary.groupby("variant", sort=False):
        f, how = reach_fraction(g["fraction"].tolist(), g["mean"].tolist(), target)
        rows.append(
            {
                "variant": variant,
                "target_fraction": top,
                "target_acc": target,
                "reach_fraction": f,
                "how": how,
            }
        )
    frame = pd.DataFrame(rows)
    base_f = float(frame.loc[frame["variant"] == baseline, "reach_fraction"].iloc[0])
    frame["efficiency_vs_baseline"] = base_f / frame["reach_fraction"]
    return frame


# ---------------------------------------------------------------------------------------------------------
# Markdown
# ---------------------------------------------------------------------------------------------------------


def _pct(x: float, digits: int = 1) -> str:
    return "–" if x is None or not np.isfinite(x) else f"{100 * x:.{digits}f}"


def _acc_cell(row: pd.Series) -> str:
    if not row["n"]:
        return "–"
    sd = f" ± {_pct(row['sd'])}" if np.isfinite(row["sd"]) else ""
    extra = f", {row['n_diverged']} diverged" if row["n_diverged"] else ""
    extra += f", {row['n_collapsed']} collapsed" if row.get("n_collapsed") else ""
    return f"{_pct(row['mean'])}{sd} (n={row['n']}{extra})"


def _diff_cell(row: pd.Series | None) -> str:
    if row is None or not row["n_pairs"]:
        return "–"
    if not np.isfinite(row["diff_ci_low"]):
        return f"{100 * row['diff_mean']:+.1f}"
    flag = "" if row["paired_ok"] else " (unpaired!)"
    return f"{100 * row['diff_mean']:+.1f} [{100 * row['diff_ci_low']:+.1f}, {100 * row['diff_ci_high']:+.1f}]{flag}"


def _params(x: float) -> str:
    return "–" if x is None or not np.isfinite(x) else f"{int(x):,}"


def _provenance(runs: pd.DataFrame) -> str:
    done = runs[runs["status"].isin(["completed", "diverged"])]
    if done.empty:
        return "no finished runs"
    devices = ", ".join(sorted(set(done["device"].dropna().astype(str))))
    commits = ", ".join(sorted(set(done["commit"].dropna().astype(str)) - {""})) or "unknown"
    dirty = bool(done["dirty"].fillna(False).astype(bool).any())
    seeds = sorted(set(done["seed"]))
    untuned = sorted(set(runs.loc[runs["tuned"].fillna("") == "", "method"]))
    parts = [
        f"{len(done)} runs, seeds {seeds[0]}–{seeds[-1]}" if len(seeds) > 1 else f"{len(done)} runs",
        f"device: {devices}",
        f"commit {commits}" + (" (**some runs from a dirty tree**)" if dirty else ""),
    ]
    parts.append(
        f"untuned (profile defaults): {', '.join(untuned)}" if untuned else "all methods tuned (`make tune`)"
    )
    return "; ".join(parts)


def markdown_sample_efficiency(
    runs: pd.DataFrame, summary: pd.DataFrame, paired: pd.DataFrame, reach: pd.DataFrame, baseline: str
) -> str:
    fractions = sorted(summary["fraction"].unique())
    variants = method_order(summary["variant"].unique())
    head = (
        ["method", "trainable params"]
        + [f"{f:.0%} data" for f in fractions]
        + [f"Δ vs {baseline} at {f:.0%} [95% CI]" for f in fractions]
        + [f"data to reach {baseline}@{fractions[-1]:.0%}"]
    )
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for v in variants:
        s = summary[summary["variant"] == v].set_index("fraction")
        cells = [f"`{v}`", _params(s["params_adapter"].median())]
        cells += [_acc_cell(s.loc[f]) if f in s.index else "–" for f in fractions]
        for f in fractions:
            p = paired[(paired["variant"] == v) & (paired["fraction"] == f)] if not paired.empty else paired
            cells.append("(baseline)" if v == baseline else _diff_cell(p.iloc[0] if len(p) else None))
        r = reach[reach["variant"] == v] if not reach.empty else reach
        if len(r) and np.isfinite(r["reach_fraction"].iloc[0]):
            how = r["how"].iloc[0]
            cells.append(
                f"{r['reach_fraction'].iloc[0]:.1%} ({how})"
                if how != "at or below"
                else f"≤ {r['reach_fraction'].iloc[0]:.0%} (already at the smallest fraction)"
            )
        else:
            cells.append("not reached")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown_variants(summary: pd.DataFrame, paired: pd.DataFrame, baseline: str, tau: bool) -> str:
    fraction = summary["fraction"].max()
    s = summary[summary["fraction"] == fraction]
    head = ["variant", "trainable params", f"test accuracy, {fraction:.0%} data", f"Δ vs {baseline} [95% CI]"]
    if tau:
        head.append("final τ (relative, mean)")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for _, row in s.iterrows():
        p = (
            paired[(paired["variant"] == row["variant"]) & (paired["fraction"] == fraction)]
            if not paired.empty
            else paired
        )
        cells = [
            row["variant"],
            _params(row["params_adapter"]),
            _acc_cell(row),
            "(baseline)" if row["variant"] == baseline else _diff_cell(p.iloc[0] if len(p) else None),
        ]
        if tau:
            cells.append("–" if not np.isfinite(row["tau_final_mean"]) else f"{row['tau_final_mean']:.3g}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


TITLES = {
    "sample_efficiency": "Sample efficiency (`make sample-efficiency`)",
    "ablation_tau": "Tau ablation (`make ablation-tau`)",
    "ablation_hypernet": "Auxiliary-network sharing (`make ablation-hypernet`)",
}


def results_markdown(tables: dict[str, dict[str, Any]], profile: str) -> str:
    """The results section (docs/results.md) from the collected tables of each sweep."""
    parts = [
        f"Profile `{profile}`. Test accuracy in % (mean ± standard deviation over seeds, n finished runs); "
        "Δ: paired difference with the baseline, seed by seed (same training subset, head initialisation "
        "and batch order), mean and 95% t-interval, in percentage points. Trainable parameters: adapter "
        "only (the classifier head, trained by every method, is excluded). Generated by "
        f"`make results-table PROFILE={profile}` from the result files; do not edit by hand."
    ]
    for name in [*SWEEPS, *sorted(set(tables) - set(SWEEPS))]:
        if name not in tables:
            continue
        t = tables[name]
        runs, summary, paired, baseline = t["runs"], t["summary"], t["paired"], t["baseline"]
        if summary.empty or not summary["n"].any():
            continue
        parts.append(f"#### {TITLES.get(name, name)}\n\n_{_provenance(runs)}._\n")
        if name == "sample_efficiency":
            parts.append(markdown_sample_efficiency(runs, summary, paired, t["reach"], baseline))
            parts.append(
                f"\nThe last column is the fraction of the training data at which the method's mean "
                f"accuracy first reaches `{baseline}`'s mean accuracy with all of it, interpolated "
                "log-linearly between the measured fractions (an estimate, not a measurement)."
            )
        else:
            parts.append(markdown_variants(summary, paired, baseline, tau=name == "ablation_tau"))
    return "\n\n".join(parts) + "\n"


def replace_between_markers(text: str, block: str) -> str:
    """``text`` with everything between the results-table markers replaced by ``block``."""
    if START not in text or END not in text:
        raise ValueError(f"no markers {START} ... {END} in the file; paste them where the table goes")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{block.strip()}\n{END}{tail}"


# ---------------------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------------------


def collect_sweep(folder: str | Path, include_all: bool = False) -> dict[str, Any]:
    """Write the CSV tables of one sweep folder; return them (``runs``, ``summary``, ``paired``, ...)."""
    folder = Path(folder)
    runs, tau, grad, manifest = load_sweep_folder(folder, include_all)
    baseline = manifest.get("baseline") or (runs["variant"].iloc[0] if len(runs) else None)
    if runs.empty:
        return {
            "runs": runs,
            "summary": pd.DataFrame(),
            "paired": pd.DataFrame(),
            "reach": pd.DataFrame(),
            "baseline": baseline,
            "folder": folder,
        }
    summary = summarize(runs)
    paired = paired_differences(runs, baseline) if baseline else pd.DataFrame()
    reach = reach_table(summary, baseline) if folder.name == "sample_efficiency" else pd.DataFrame()
    runs.to_csv(folder / "runs.csv", index=False)
    summary.to_csv(folder / "summary.csv", index=False)
    paired.to_csv(folder / "paired.csv", index=False)
    # the per-step traces are the bulk: 6 significant digits, gzip-compressed
    for name, frame in (("tau", tau), ("grad_norm", grad), ("reach", reach)):
        path = folder / (f"{name}.csv.gz" if name in ("tau", "grad_norm") else f"{name}.csv")
        if not frame.empty:  # gzip without a timestamp: the same results give the same bytes
            compression = {"method": "gzip", "mtime": 0} if path.suffix == ".gz" else None
            frame.to_csv(path, index=False, float_format="%.6g", compression=compression)
        elif path.exists():
            path.unlink()
        stale = folder / f"{name}.csv"  # an uncompressed tau.csv or grad_norm.csv of an earlier version
        if stale != path and stale.exists():
            stale.unlink()
    return {
        "runs": runs,
        "summary": summary,
        "paired": paired,
        "reach": reach,
        "baseline": baseline,
        "folder": folder,
    }


def collect(
    profile: str = "default",
    results_dir: str | Path = RESULTS_DIR,
    sweeps: Sequence[str] | None = None,
    include_all: bool = False,
    readme: str | Path | None = None,
) -> dict[str, dict[str, Any]]:
    """Collect every sweep folder of ``profile``; write ``results_table.md`` (and the table of the file given as ``readme``)."""
    root = Path(results_dir) / profile
    folders = (
        [root / s for s in sweeps]
        if sweeps
        else sorted(p for p in root.glob("*") if (p / SWEEP_FILE).is_file())
    )
    if not folders:
        raise FileNotFoundError(
            f"no sweep results under {root}; run a sweep first (e.g. `python -m "
            f"experiments.sweep sample_efficiency --profile {profile}`)"
        )
    tables = {}
    for folder in folders:
        if not folder.is_dir():
            raise FileNotFoundError(
                f"{folder}: no such sweep folder; run `python -m experiments.sweep "
                f"{folder.name} --profile {profile}` first"
            )
        tables[folder.name] = collect_sweep(folder, include_all)
    block = results_markdown(tables, profile)
    root.mkdir(parents=True, exist_ok=True)
    (root / "results_table.md").write_text(block)
    if readme is not None:  # the accuracy studies; the stability study has its own report (stability_report)
        path = Path(readme)
        accuracy = {name: t for name, t in tables.items() if name not in STABILITY_SWEEPS}
        path.write_text(replace_between_markers(path.read_text(), results_markdown(accuracy, profile)))
    return tables


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.collect",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    parser.add_argument("--profile", default="default")
    parser.add_argument("--results", default=str(RESULTS_DIR), help="results root: <root>/<profile>/<sweep>/")
    parser.add_argument(
        "--sweeps", nargs="+", default=None, help="sweep folders (default: all with sweep.json)"
    )
    parser.add_argument("--all", action="store_true", help="include result files outside the current grid")
    parser.add_argument(
        "--readme", default=None, help="replace the results table between the markers in this file"
    )
    args = parser.parse_args(argv)
    try:
        tables = collect(args.profile, args.results, args.sweeps, args.all, args.readme)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for name, t in tables.items():
        runs = t["runs"]
        counts = runs["status"].value_counts().to_dict() if len(runs) else {}
        print(f"[collect] {name}: {counts} -> {t['folder']}/runs.csv, summary.csv, paired.csv")
    print(
        f"[collect] table -> {Path(args.results) / args.profile / 'results_table.md'}"
        + (f" and {args.readme}" if args.readme else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
