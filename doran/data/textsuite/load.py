"""``load_task``: a task's splits, read from its archive or, when ``$DORAN_SUITE_DIR`` is set, from the export."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..records import Splits
from .export import _load_export
from .protocol import _build, _check_embedded_default
from .readers import _READERS
from .tasks import ENV_SUITE_DIR, _task


def load_task(name: str) -> tuple[Splits, dict[str, Any]]:
    """The task's fixed train/val/test ``Splits`` and the statistics of its cleaning.

    Read from the task's archive, or, when ``$DORAN_SUITE_DIR`` is set, only from the export there (see
    ``export_tasks``). An unknown name raises ``DataError`` listing the valid names.

    >>> splits, stats = load_task("sms_spam")  # doctest: +SKIP
    >>> splits.sizes(), stats["repaired_rows"]  # doctest: +SKIP
    ({'train': 4128, 'val': 516, 'test': 516}, 8)
    """
    task = _task(name)
    suite_dir = os.environ.get(ENV_SUITE_DIR)
    if suite_dir:
        return _load_export(task, Path(suite_dir))
    splits, stats = _build(task, _READERS[task.name](task))
    if task.name == "rotten_tomatoes":
        _check_embedded_default(splits)
    return splits, stats
