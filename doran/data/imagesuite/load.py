"""``load_task``: one image task as ``Splits`` of uint8 arrays, from the archives or from an export."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from doran.assets.archives import ARCHIVES, ArchiveError

from ..errors import DataError
from ..records import Split, Splits
from .draws import vtab_split
from .export import _read_export, _task_record
from .sources import _read_dataset, resize_uint8
from .tasks import DATASETS, ENV_DIR, POOL_SIZE, SPLIT_SEED, get_task, task_labels

_MEMO: dict[tuple[str, str], tuple[np.ndarray, dict[str, np.ndarray], dict[str, Any] | None]] = {}


def _dataset(dataset: str) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, Any] | None, str]:
    folder = os.environ.get(ENV_DIR)
    key = (dataset, folder or "")
    if key not in _MEMO:
        if folder:
            _MEMO[key] = _read_export(Path(folder), dataset)
        else:
            try:
                images, annotations = _read_dataset(dataset)
            except ArchiveError as err:
                raise DataError(
                    f"image dataset {dataset!r}: {err}; or set ${ENV_DIR} to a folder written by "
                    "`python -m doran.data.imagesuite export DIR`"
                ) from None
            _MEMO[key] = (images, annotations, None)
    images, annotations, manifest = _MEMO[key]
    return images, annotations, manifest, ("export" if folder else "archive")  # no machine path in results


def load_task(name: str, image_size: int | None = None) -> tuple[Splits, dict[str, Any]]:
    """One image task as ``Splits`` of uint8 ``(H, W)`` grayscale arrays, and a record of what it is.

    ``image_size`` (default: the stored resolution, 28 px for MNIST, ``ELPV_STORED_SIZE`` for ELPV) resizes
    the stored images (antialiased bicubic). ``Split.lines`` holds each image's line in the source file
    (MNIST's CSV row, ELPV's labels.csv line). The record names the source, licence, sizes and per-class
    counts of every split. Raises ``DataError`` for an unknown task (with a "did you mean") or damaged data.
    """
    task = get_task(name)
    images, annotations, manifest, source = _dataset(task.dataset)
    labels = task_labels(task, annotations)
    parts = vtab_split(labels)
    record = _task_record(task, labels, parts)
    if manifest is not None:
        expected = manifest["tasks"].get(name)
        if expected is None:
            raise DataError(
                f"${ENV_DIR}: the export has no task {name!r} (tasks: {sorted(manifest['tasks'])})"
            )
        if expected["index_sha256"] != record["index_sha256"]:
            raise DataError(
                f"task {name!r}: the splits computed here differ from those recorded in the export's manifest; "
                "the split code or numpy's generator changed: re-export, and do not compare results across"
            )
    ds = DATASETS[task.dataset]
    size = ds.stored_size if image_size is None else int(image_size)
    if size < 1:
        raise ValueError(f"image_size must be positive, got {image_size!r}")
    if size != ds.stored_size:
        images = resize_uint8(images, size)
    rows = list(range(1, len(labels) + 1))  # both source files have one image per line, no header

    def split(part: str) -> Split:
        idx = parts[part]
        return Split([images[i] for i in idx], labels[idx].tolist(), f"{name}/{part} ({source})",
                     [rows[i] for i in idx])  # fmt: skip

    archive = ARCHIVES[ds.archive]
    splits = Splits(
        "image",
        split("train"),
        split("val"),
        split("test"),
        len(task.classes),
        list(task.classes),
        f"{task.title}: VTAB-1K shape, stratified pool of {POOL_SIZE} (800 train / 200 val), the other "
        f"{len(parts['test'])} images as test, split_seed={SPLIT_SEED}; {archive.spec}, {size} px",
    )
    info = {
        "task": name,
        "title": task.title,
        "dataset": task.dataset,
        "package": archive.spec,
        "archive_sha256": archive.sha256,
        "source": source,
        "licence": task.licence,
        "research_only": task.research_only,
        "label_rule": task.label_rule,
        "stored_size": ds.stored_size,
        "image_size": size,
        "split_seed": SPLIT_SEED,
        **record,
    }
    return splits, info
