"""Every table and figure of a profile from its saved results; trains nothing (what ``make figures`` runs).

    python -m experiments.figures --profile default --out figures --readme docs/results.md
    python -m experiments.figures --profile suite_cpu          # a multi-task profile: each task's folder

For the profile's own sweep folders (``<results>/<profile>/<sweep>/sweep.json``) and, for a multi-task
profile, for each task's (``<results>/<profile>/<task>/<sweep>/``), in turn:

- ``experiments.collect``: the CSV tables and ``results_table.md`` (``--readme`` only for the profile itself);
- ``experiments.plots``: the figures of the sweeps it draws (sample efficiency, the tau and hypernetwork
  ablations), where one of them ran;
- ``experiments.stability_report``: the stability study's tables, verdict and figures, where it ran;
- ``experiments.suite_report`` (a multi-task profile, once its tasks are done): the verdict across tasks and
  its forest plots, against the baselines of ``ACROSS_TASKS``.

Figures go to ``--out`` (a task's to ``<out>/<task>/``), else to each module's default folder
(``figures/`` for the default profile, ``figures/<profile>[/<task>]/`` for the others).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from experiments.constants import RESULTS_DIR, STABILITY_SWEEPS, SWEEP_FILE

#: the baselines of the across-task report (``experiments.suite_report``) per sweep, where they ran
ACROSS_TASKS = {
    "sample_efficiency": ("lora", "dora", "doran, static factors"),
    "params_matched": ("doran",),
    "ablation_tau": ("static, tau=0, detached",),
    "ablation_hypernet": ("static",),
}


def _sweeps(folder: Path) -> set[str]:
    return {d.name for d in folder.iterdir() if d.is_dir() and (d / SWEEP_FILE).is_file()} if folder.is_dir() else set()


def units(profile: str, results_dir: Path = RESULTS_DIR) -> list[str]:
    """The result folders of ``profile`` that hold sweeps: the profile itself and/or ``<profile>/<task>``."""
    root = Path(results_dir) / profile
    if not root.is_dir():
        return []
    tasks = sorted(f"{profile}/{d.name}" for d in root.iterdir() if d.is_dir() and _sweeps(d))
    return ([profile] if _sweeps(root) else []) + tasks


def main(argv: list[str] | None = None) -> int:
    from experiments import collect, plots, stability_report, suite_report

    parser = argparse.ArgumentParser(prog="python -m experiments.figures", description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="default")
    parser.add_argument("--results", default=str(RESULTS_DIR))
    parser.add_argument("--out", default=None, help="figure folder (default: each module's: figures/[<profile>/])")
    parser.add_argument("--readme", default=None, help="replace the results table between the markers in this file")
    args = parser.parse_args(argv)
    results = Path(args.results)
    found = units(args.profile, results)
    if not found:
        print(f"error: no sweep results under {results / args.profile}; run a sweep first (e.g. `python -m "
              f"experiments.sweep sample_efficiency --profile {args.profile}`)", file=sys.stderr)
        return 2
    for unit in found:
        common = ["--profile", unit, "--results", str(results)]
        out = None if args.out is None else Path(args.out) / unit[len(args.profile) + 1 :]
        readme = ["--readme", args.readme] if args.readme and unit == args.profile else []
        if rc := collect.main([*common, *readme]):
            return rc
        sweeps = _sweeps(results / unit)
        drawn = sweeps & {sweep for _, sweep, _ in plots.FIGURES.values()}
        if drawn and (rc := plots.main([*common, *(["--out", str(out)] if out is not None else [])])):
            return rc
        stable = sweeps & set(STABILITY_SWEEPS)
        if stable and (rc := stability_report.main([*common, *(["--figures", str(out)] if out is not None else [])])):
            return rc
    tasks = [unit for unit in found if unit != args.profile]
    for sweep, baselines in ACROSS_TASKS.items():  # a multi-task profile: the verdict across its tasks
        folders = [results / unit / sweep for unit in tasks if (results / unit / sweep / SWEEP_FILE).is_file()]
        if not folders:
            continue
        variants = set().union(*(set(json.loads((f / SWEEP_FILE).read_text()).get("variants", [])) for f in folders))
        present = [b for b in baselines if b in variants]
        figures = ["--figures", args.out] if args.out is not None else []
        if present and (rc := suite_report.main(["--profile", args.profile, "--results", str(results), "--sweep",
                                                 sweep, "--baseline", *present, *figures])):
            return rc
    return 0


if __name__ == "__main__":
    sys.exit(main())
