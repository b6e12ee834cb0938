"""Index arithmetic: the fixed stratified split (the benchmark) and the nested stratified training subsets
(the data-fraction axis), with a hash of the indices for the run's result; and the checks of fractions.

Every function here works on label lists only: no file, no model.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import numpy as np

from .errors import DataError


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


def _check_min_per_class(min_per_class: int) -> int:
    if isinstance(min_per_class, bool) or not isinstance(min_per_class, (int, np.integer)) or min_per_class < 1:
        raise ValueError(f"min_per_class must be an integer >= 1, got {min_per_class!r}")
    return int(min_per_class)


def _class_quota(n_c: int, fraction: float, min_per_class: int) -> int:
    """How many of a class's ``n_c`` examples a subset keeps: the one place the subset-size rule lives.

    ``max(min_per_class, ceil(fraction * n_c))``, capped at ``n_c``; the 1e-9 makes 0.3 * 10 give 3, not 4.
    """
    return min(n_c, max(min_per_class, math.ceil(fraction * n_c - 1e-9)))


def subset_size(labels: Sequence[int], fraction: float, min_per_class: int = 1) -> int:
    """Number of examples in ``stratified_subset(labels, fraction, seed, min_per_class)``, for every seed.

    >>> subset_size([0] * 10 + [1] * 3, fraction=0.3)
    4
    >>> subset_size([0] * 10 + [1] * 3, fraction=0.3, min_per_class=2)
    5
    """
    fraction, min_per_class = check_fraction(fraction), _check_min_per_class(min_per_class)
    counts = np.unique(np.asarray(labels, dtype=np.int64), return_counts=True)[1]
    return sum(_class_quota(int(n), fraction, min_per_class) for n in counts)


def stratified_subset(
    labels: Sequence[int], fraction: float, seed: int, min_per_class: int = 1
) -> np.ndarray:
    """Indices of a deterministic, stratified, nested subset holding ``fraction`` of the examples.

    Per class ``c`` with ``n_c`` examples: permute its indices with a generator seeded by ``(seed, c)`` and
    keep the first ``max(min_per_class, ceil(fraction * n_c))``, at most ``n_c`` (``subset_size`` gives the
    total). Hence, for one seed, the subset for a smaller fraction is a prefix of the one for a larger
    fraction (nested), every class keeps at least ``min_per_class`` examples (all of them if it has fewer),
    and the same seed gives every method the same subset. Returns sorted ``int64`` indices into ``labels``.

    >>> stratified_subset([0, 0, 0, 0, 1], fraction=0.5, seed=0).tolist()  # doctest: +SKIP
    [1, 3, 4]
    """
    fraction, min_per_class = check_fraction(fraction), _check_min_per_class(min_per_class)
    y = np.asarray(labels, dtype=np.int64)
    keep = []
    for cls in np.unique(y):
        idx = np.flatnonzero(y == cls)
        perm = idx[_class_rng(seed, cls, _SUBSET).permutation(len(idx))]
        keep.append(perm[: _class_quota(len(idx), fraction, min_per_class)])
    return np.sort(np.concatenate(keep)) if keep else np.zeros(0, np.int64)


def subset_hash(indices: Sequence[int]) -> str:
    """sha256 (hex) of the sorted indices as little-endian int64: identifies a subset in the run's result."""
    arr = np.sort(np.asarray(indices, dtype="<i8"))
    return hashlib.sha256(arr.tobytes()).hexdigest()


def class_counts(labels: Sequence[int], num_classes: int) -> list[int]:
    """Number of examples per class, ``num_classes`` long."""
    return np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes).tolist()


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
