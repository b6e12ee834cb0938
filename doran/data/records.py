"""What the readers return: ``Split`` (inputs, labels, provenance) and ``Splits`` (train/val/test of a dataset).

``Splits.fingerprint`` is the data's identity in a run's id.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np


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
