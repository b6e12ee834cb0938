"""Index arithmetic: exact-size stratified draws with per-class floors, and the VTAB-1K-shaped split."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .tasks import MIN_POOL_PER_CLASS, MIN_VAL_PER_CLASS, POOL_SIZE, SPLIT_SEED, VAL_SIZE

# purposes of the seeded draws (independent streams per purpose and class)
_POOL, _VAL, _SUBSAMPLE = 0, 1, 9


def allocate(counts: Sequence[int], total: int, minimum: int = 0) -> list[int]:
    """How many of each class to draw so that the draw has exactly ``total`` items.

    Proportional to ``counts`` (largest remainders; ties to the lower class index), but every class gets at
    least ``min(minimum, count)``: classes below the floor are fixed at it and the rest is shared
    proportionally among the others. Raises ``ValueError`` if ``total`` exceeds the data or the floors.

    >>> allocate([1508, 295, 106, 715], 1000, minimum=50)
    [569, 111, 50, 270]
    """
    counts = [int(c) for c in counts]
    if not 0 <= total <= sum(counts):
        raise ValueError(f"cannot draw {total} items from {sum(counts)}")
    floors = [min(minimum, c) for c in counts]
    if sum(floors) > total:
        raise ValueError(f"the per-class floor {minimum} needs {sum(floors)} items, more than {total}")
    fixed: dict[int, int] = {}
    while True:
        free = [k for k in range(len(counts)) if k not in fixed]
        left = total - sum(fixed.values())
        mass = sum(counts[k] for k in free)
        quota = {k: left * counts[k] / mass if mass else 0.0 for k in free}
        below = [k for k in free if quota[k] < floors[k]]
        if not below:
            break
        for k in below:
            fixed[k] = floors[k]
    alloc = {k: min(int(np.floor(quota[k])), counts[k]) for k in free} | fixed
    order = sorted(free, key=lambda k: (-(quota[k] - np.floor(quota[k])), k))
    short = total - sum(alloc.values())
    while short > 0:  # hand out the remainder, never beyond a class's count
        progressed = False
        for k in order:
            if short and alloc[k] < counts[k]:
                alloc[k] += 1
                short -= 1
                progressed = True
        if not progressed:
            raise AssertionError("unreachable: total <= sum(counts)")
    return [alloc[k] for k in range(len(counts))]


def stratified_take(labels: Sequence[int], n: int, seed: int, purpose: int, minimum: int = 0) -> np.ndarray:
    """Exactly ``n`` indices into ``labels``, stratified by class (``allocate``), drawn with ``seed``.

    Per class, the indices are permuted by a generator seeded by ``(seed, class, purpose)`` and the first
    ``allocate(...)[class]`` kept, so the draw depends on nothing but the labels, the seed and the purpose.
    Returns sorted ``int64`` indices.
    """
    y = np.asarray(labels, dtype=np.int64)
    classes = np.unique(y)
    sizes = allocate([int((y == c).sum()) for c in classes], n, minimum)
    keep = []
    for cls, size in zip(classes, sizes):
        idx = np.flatnonzero(y == cls)
        rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(cls), int(purpose)]))
        keep.append(idx[rng.permutation(len(idx))][:size])
    return np.sort(np.concatenate(keep)) if keep else np.zeros(0, np.int64)


def vtab_split(labels: Sequence[int], seed: int = SPLIT_SEED) -> dict[str, np.ndarray]:
    """The VTAB-1K-shaped split of a whole dataset: ``train`` (800), ``val`` (200), ``test`` (the rest).

    The 1,000-image pool is a stratified draw (``MIN_POOL_PER_CLASS`` floor), val a stratified draw of 200
    from the pool (``MIN_VAL_PER_CLASS`` floor), train the other 800; test is every image outside the pool.
    """
    y = np.asarray(labels, dtype=np.int64)
    pool = stratified_take(y, POOL_SIZE, seed, _POOL, MIN_POOL_PER_CLASS)
    val = pool[stratified_take(y[pool], VAL_SIZE, seed, _VAL, MIN_VAL_PER_CLASS)]
    train = np.setdiff1d(pool, val)
    test = np.setdiff1d(np.arange(len(y)), pool)
    return {"train": train, "val": val, "test": test}
