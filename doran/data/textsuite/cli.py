"""The command line: ``summary`` (a markdown table of every task) and ``export`` (write the export)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from ..errors import DataError
from .export import _COMPRESSION, export_tasks
from .load import load_task
from .tasks import TASKS


def summary_table(stats: Sequence[dict[str, Any]]) -> str:
    """A markdown table of tasks' statistics (as ``load_task`` returns them)."""
    head = (
        "| task | classes | train | val | test | examples | duplicates | conflicting texts (rows) "
        "| train-test overlap | majority acc. (test) |"
    )
    rows = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for s in stats:
        sizes = s["sizes"]
        rows.append(
            f"| {s['task']} | {len(s['raw_class_counts'])} | {sizes['train']:,} | {sizes['val']:,} "
            f"| {sizes['test']:,} | {s['examples']:,} | {s['duplicates_removed']:,} "
            f"| {s['conflicting_texts']:,} ({s['conflicting_rows_removed']:,}) "
            f"| {s['train_test_overlap_removed']:,} | {s['majority_test_accuracy']:.3f} |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    """``python -m doran.data.textsuite summary [TASK ...]`` or ``export DIR [TASK ...] [--compression gz]``."""
    parser = argparse.ArgumentParser(prog="python -m doran.data.textsuite", description=main.__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    summary = sub.add_parser("summary", help="print a markdown table of every task's sizes and removals")
    summary.add_argument("tasks", nargs="*", help=f"tasks (default: all): {', '.join(TASKS)}")
    export = sub.add_parser("export", help="write the processed tasks to DIR for a machine without archives")
    export.add_argument("dir")
    export.add_argument("tasks", nargs="*", help="tasks (default: all)")
    export.add_argument("--compression", choices=sorted(_COMPRESSION), default="xz")
    args = parser.parse_args(argv)
    try:
        if args.command == "summary":
            print(summary_table([load_task(n)[1] for n in args.tasks or TASKS]))
            return 0
        manifest = export_tasks(args.dir, args.tasks or None, compression=args.compression)
    except (DataError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    entries = json.loads(manifest.read_text(encoding="utf-8"))["tasks"]
    for entry in entries.values():
        print(f"{entry['file']:28s} {entry['bytes'] / 1e6:7.2f} MB  sha256 {entry['sha256'][:16]}")
    print(f"{manifest} (total {sum(e['bytes'] for e in entries.values()) / 1e6:.2f} MB)")
    return 0

