"""The run-to-run spread of the same runs: every result file of the given folders grouped by run id and by
``runtime.deterministic``, with the spread of each metric within a group (0: the repeats are identical).

    python -m experiments.determinism_report experiments/results/determinism-h100/*

Each folder holds one repetition (for example a sweep run again with ``--results`` elsewhere and
``--no-reuse``); the run id names the configuration, so the same id in several folders is the same run.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from doran.results import read_json, result_files

METRICS = ("test/acc", "val/acc", "train/loss")


def collect(folders: Sequence[str | Path]) -> dict[tuple[str, bool], list[dict]]:
    """``{(run_id, deterministic): [result, ...]}`` over the result files of ``folders``; a file that a sweep
    copied from another sweep (the same run, the same ``finished_at`` and ``wall_time_s``) counts once."""
    groups: dict[tuple[str, bool], list[dict]] = defaultdict(list)
    seen: set[tuple[str, str]] = set()
    for folder in folders:
        for path in result_files(folder):
            result = read_json(path)
            key = (result["run_id"], f"{result.get('finished_at')} {result.get('wall_time_s')!r}")
            if key in seen:
                continue
            seen.add(key)
            deterministic = bool(result["config"].get("runtime", {}).get("deterministic", False))
            groups[(result["run_id"], deterministic)].append({**result, "_folder": str(folder)})
    return dict(groups)


def repeated(groups: dict[tuple[str, bool], list[dict]]) -> dict[tuple[str, bool], list[dict]]:
    """The groups of the run ids that have results in more than one folder (in either mode)."""
    folders: dict[str, set[str]] = defaultdict(set)
    for (run_id, _), results in groups.items():
        folders[run_id].update(r["_folder"] for r in results)
    return {key: results for key, results in groups.items() if len(folders[key[0]]) > 1}


def spread(results: Sequence[dict], metric: str) -> float:
    """Largest minus smallest value of ``metric`` over ``results``."""
    values = [float(r["metrics"][metric]) for r in results]
    return max(values) - min(values)


def report(groups: dict[tuple[str, bool], list[dict]]) -> str:
    """A markdown table: one row per run id and mode, the repeats' test accuracies and the spreads."""
    lines = [
        "| run | deterministic | repeats | test accuracy (each repeat) | spread: " + " / ".join(METRICS) + " |",
        "|---|---|---|---|---|",
    ]
    for (run_id, deterministic), results in sorted(groups.items()):
        accs = ", ".join(f"{float(r['metrics']['test/acc']):.4f}" for r in results)
        spreads = " / ".join(f"{spread(results, m):.2g}" for m in METRICS)
        lines.append(f"| `{run_id}` | {deterministic} | {len(results)} | {accs} | {spreads} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.determinism_report", description=__doc__.split("\n")[0])
    parser.add_argument("folders", nargs="+", help="folders of result files, one repetition each")
    args = parser.parse_args(argv)
    missing = [f for f in args.folders if not Path(f).is_dir()]
    if missing:
        print(f"error: no such folder: {', '.join(missing)}", file=sys.stderr)
        return 2
    groups = repeated(collect(args.folders))
    if not groups:
        print("error: no run has a result in more than one of these folders", file=sys.stderr)
        return 2
    print(report(groups))
    return 0


if __name__ == "__main__":
    sys.exit(main())
