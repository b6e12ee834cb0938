"""The export: every task's processed splits written to a folder (with a manifest of sha256 sums) for a
machine without the archives, and read back from there.
"""

from __future__ import annotations

import gzip
import io
import json
import lzma
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from doran.assets.archives import sha256_file

from ..errors import DataError
from ..records import Split, Splits
from .protocol import _build, _check_embedded_default
from .readers import _READERS
from .tasks import ENV_SUITE_DIR, MANIFEST_NAME, SUITE_VERSION, TASKS, Task, _task


#: compression of export files: suffix and opener; xz, the default, gives the smaller files
_COMPRESSION: dict[str, tuple[str, Callable[..., Any]]] = {
    "xz": (".jsonl.xz", lzma.open),
    "gz": (".jsonl.gz", gzip.open),
}
_XZ_FILTERS = [{"id": lzma.FILTER_LZMA2, "preset": 9, "lc": 4, "lp": 0, "pb": 0}]  # tuned for text


def _atomic_write(path: Path, write: Callable[[io.BufferedWriter], None]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the export is meant to be copied and shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_examples(path: Path, splits: Splits, pair: bool, compression: str) -> None:
    def compressed(f: io.BufferedWriter) -> Any:
        if compression == "xz":
            return lzma.LZMAFile(f, "wb", format=lzma.FORMAT_XZ, filters=_XZ_FILTERS)
        # mtime 0 and no name: the same examples give the same bytes
        return gzip.GzipFile(filename="", mode="wb", fileobj=f, compresslevel=9, mtime=0)

    def write(f: io.BufferedWriter) -> None:
        with compressed(f) as stream:
            for name in ("train", "val", "test"):
                part: Split = getattr(splits, name)
                for x, y, line in zip(part.inputs, part.labels, part.lines):
                    row = (
                        {"split": name, "text": x[0], "text_pair": x[1]}
                        if pair
                        else {"split": name, "text": x}
                    )
                    row.update(label=y, line=line)
                    stream.write(json.dumps(row, ensure_ascii=False).encode("utf-8") + b"\n")

    _atomic_write(path, write)


def _read_manifest(suite_dir: Path) -> dict[str, Any]:
    path = suite_dir / MANIFEST_NAME
    if not path.is_file():
        raise DataError(
            f"{path}: no such file; ${ENV_SUITE_DIR} must name a folder written by "
            "`python -m doran.data.textsuite export DIR` (or unset it to read the archives)"
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg}); export the suite again") from None
    if manifest.get("suite_version") != SUITE_VERSION:
        raise DataError(
            f"{path}: written by suite protocol v{manifest.get('suite_version')}, this code is "
            f"v{SUITE_VERSION}; export the suite again with `python -m doran.data.textsuite export DIR`"
        )
    return manifest


def export_tasks(out_dir: str | Path, names: Sequence[str] | None = None, *, compression: str = "xz") -> Path:
    """Write the processed splits of ``names`` (default: every task) for a machine without the archives.

    One file per task, ``<out_dir>/<task>.jsonl.xz`` (``compression="gz"``: ``.jsonl.gz``, faster to write,
    larger), one JSON object per example: ``split``, ``text`` (and ``text_pair`` for boolq),
    ``label``, ``line``; and ``<out_dir>/manifest.json`` with each file's sha256, size, label names,
    description and statistics. Tasks already in the manifest and not named are kept. Files are written
    atomically. Returns the manifest's path.

    >>> export_tasks("suite", ["trec6"])  # doctest: +SKIP
    PosixPath('suite/manifest.json')
    """
    if compression not in _COMPRESSION:
        raise ValueError(f"compression must be one of {sorted(_COMPRESSION)}, got {compression!r}")
    tasks = [_task(n) for n in (names if names is not None else list(TASKS))]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    manifest: dict[str, Any] = {"suite_version": SUITE_VERSION, "tasks": {}}
    if (out / MANIFEST_NAME).is_file():
        try:
            manifest = _read_manifest(out)
        except DataError:
            pass  # an older or damaged manifest: start a new one
    for task in tasks:
        splits, stats = _build(task, _READERS[task.name](task))
        if task.name == "rotten_tomatoes":
            _check_embedded_default(splits)
        suffix, _ = _COMPRESSION[compression]
        path = out / f"{task.name}{suffix}"
        _write_examples(path, splits, task.pair, compression)
        for other_suffix, _ in _COMPRESSION.values():  # a stale file of the other compression would mislead
            if other_suffix != suffix:
                (out / f"{task.name}{other_suffix}").unlink(missing_ok=True)
        manifest["tasks"][task.name] = {
            "file": path.name,
            "sha256": sha256_file(path),
            "bytes": path.stat().st_size,
            "source": task.package,
            "label_names": list(task.label_names),
            "pair": task.pair,
            "description": splits.description,
            "sources": {k: getattr(splits, k).source for k in ("train", "val", "test")},
            "stats": stats,
        }
    manifest["tasks"] = {n: manifest["tasks"][n] for n in TASKS if n in manifest["tasks"]}
    manifest["total_bytes"] = sum(entry["bytes"] for entry in manifest["tasks"].values())
    text = json.dumps(manifest, indent=1, ensure_ascii=False) + "\n"
    _atomic_write(out / MANIFEST_NAME, lambda f: f.write(text.encode("utf-8")))
    return out / MANIFEST_NAME


def _load_export(task: Task, suite_dir: Path) -> tuple[Splits, dict[str, Any]]:
    manifest = _read_manifest(suite_dir)
    entry = manifest["tasks"].get(task.name)
    if entry is None:
        raise DataError(
            f"{suite_dir / MANIFEST_NAME}: task {task.name!r} was not exported (it has "
            f"{sorted(manifest['tasks'])}); run `python -m doran.data.textsuite export DIR {task.name}` where the "
            "archives are"
        )
    path = suite_dir / entry["file"]
    if not path.is_file():
        raise DataError(
            f"{path}: no such file, though {MANIFEST_NAME} lists it; copy the whole export folder"
        )
    digest = sha256_file(path)
    if digest != entry["sha256"]:
        raise DataError(
            f"{path}: sha256 {digest} is not the manifest's {entry['sha256']}; the file is damaged or from "
            "another export: copy the export folder again"
        )
    if entry["label_names"] != list(task.label_names):
        raise DataError(f"{path}: label names {entry['label_names']} are not {list(task.label_names)}")
    opener = next((op for suffix, op in _COMPRESSION.values() if path.name.endswith(suffix)), None)
    if opener is None:
        raise DataError(f"{path}: unknown file type; expected one of {[s for s, _ in _COMPRESSION.values()]}")
    parts: dict[str, tuple[list[Any], list[int], list[int]]] = {
        k: ([], [], []) for k in ("train", "val", "test")
    }
    with opener(path, "rt", encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            try:
                row = json.loads(line)
                x = (row["text"], row["text_pair"]) if task.pair else row["text"]
                inputs, labels, lines = parts[row["split"]]
                inputs.append(x)
                labels.append(int(row["label"]))
                lines.append(int(row["line"]))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                raise DataError(f"{path}:{line_no}: not an example of the export ({e!r})") from None
    splits = Splits(
        "text",
        *(Split(*parts[k][:2], entry["sources"][k], parts[k][2]) for k in ("train", "val", "test")),
        len(task.label_names), list(task.label_names), entry["description"],
    )  # fmt: skip
    if splits.sizes() != entry["stats"]["sizes"]:
        raise DataError(
            f"{path}: split sizes {splits.sizes()} are not the manifest's {entry['stats']['sizes']}"
        )
    return splits, entry["stats"]
