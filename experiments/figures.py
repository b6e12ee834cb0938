"""Every table and figure of a profile from its saved results; trains nothing (what ``make figures`` runs).

    python -m experiments.figures --profile default --out figures --readme docs/results.md
    python -m experiments.figures --profile suite_cpu          # a multi-task profile: each task's folder

For the profile's own sweep folders (``<results>/<profile>/<sweep>/sweep.json``) and, for a multi-task
profile, for each task's (``<results>/<profile>/<task>/<sweep>/``), in turn:

- ``experiments.collect``: the CSV tables and ``results_table.md`` (``--readme`` only for the profile itself);
- ``experiments.plots``: the figures of the sweeps it draws (sample efficiency, the tau and hypernetwork
  ablations), where one of them ran;
- ``experiments.stability_report``: the stability study's tables, verdict and figures, where it ran.

Figures go to ``--out`` (a task's to ``<out>/<task>/``), else to each module's default folder
(``figures/`` for the default profile, ``figures/<profile>[/<task>]/`` for the others).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from experiments.constants import RESULTS_DIR, SWEEP_FILE

STABILITY = ("stability", "stability_precision", "stability_init")


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
    from experiments import collect, plots, stability_report

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
        stable = sweeps & set(STABILITY)
        if stable and (rc := stability_report.main([*common, *(["--figures", str(out)] if out is not None else [])])):
            return rc
    return 0


if __name__ == "__main__":
    sys.exit(main())
