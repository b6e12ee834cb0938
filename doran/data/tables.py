"""Text tables (CSV/TSV/JSONL) read and validated before any model is loaded; label checks; cleaning.

Errors name the file and line. ``deduplicate`` and ``drop_overlap`` clean a table's examples before it is
split.
"""

from __future__ import annotations

import csv
import json
import math
import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .errors import DataError, _need_file
from .records import Split

_INT = re.compile(r"^[+-]?\d+$")


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
