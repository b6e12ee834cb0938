"""``DataError`` and the file and folder checks that raise it before anything is read.

Every reader of the package raises ``DataError`` with the file (and line) and the fix in the message.
"""

from __future__ import annotations

from pathlib import Path

from doran.errors import DataError


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
