"""The command line: ``table`` (split sizes and per-class counts) and ``export DIR``."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from doran.assets.archives import ArchiveError

from ..errors import DataError
from .export import export_tasks
from .load import load_task
from .tasks import ENV_DIR, TASKS


def task_table(tasks: Sequence[str] | None = None) -> str:
    """A Markdown table of the tasks: classes, split sizes and per-class counts (reads the data)."""
    lines = [
        "| task | classes | train | val | test | per-class train / val / test |",
        "|---|---|---|---|---|---|",
    ]
    for name in tasks or TASKS:
        _, info = load_task(name)
        cc = info["class_counts"]
        per = "; ".join(f"{c}: {a}/{b}/{t}" for c, a, b, t in
                        zip(info["classes"], cc["train"], cc["val"], cc["test"]))  # fmt: skip
        s = info["sizes"]
        lines.append(f"| {name} | {len(info['classes'])} | {s['train']} | {s['val']} | {s['test']} | {per} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``python -m doran.data.imagesuite table`` | ``export DIR [--tasks ...]``."""
    import argparse

    summary = sys.modules[__package__].__doc__.split("\n")[0]  # the package's one-line summary
    parser = argparse.ArgumentParser(prog="python -m doran.data.imagesuite", description=summary)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("table", help="print the tasks' split sizes and per-class counts")
    p_export = sub.add_parser("export", help=f"write a compact checked copy for ${ENV_DIR}")
    p_export.add_argument("out_dir")
    p_export.add_argument("--tasks", nargs="+", default=None)
    args = parser.parse_args(argv)
    try:
        if args.command == "table":
            print(task_table())
        else:
            manifest = export_tasks(args.out_dir, args.tasks)
            for name, entry in manifest["datasets"].items():
                print(f"{name}: {entry['file']} {entry['bytes'] / 1e6:.2f} MB ({entry['count']} images, "
                      f"{entry['stored_size']} px, {entry['encoding']})")  # fmt: skip
            total = sum(e["bytes"] for e in manifest["datasets"].values())
            print(f"{args.out_dir}: {total / 1e6:.2f} MB in all; set {ENV_DIR}={args.out_dir} to use it")
    except (DataError, ArchiveError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0

