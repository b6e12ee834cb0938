"""The export: a compact, checked copy of the datasets (lossless) with a manifest, for a machine without
the archives; and reading it back.
"""

from __future__ import annotations

import io
import itertools
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from doran.assets.archives import ARCHIVES, sha256_file

from ..errors import DataError
from ..splits import class_counts, subset_hash
from .draws import vtab_split
from .sources import _read_dataset, _save_npz_atomic
from .tasks import DATASETS, ENV_DIR, FORMAT_VERSION, MANIFEST, SPLIT_SEED, TASKS, ImageTask, get_task, task_labels


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


def export_tasks(out_dir: str | Path, tasks: Sequence[str] | None = None) -> dict[str, Any]:
    """Write the datasets of ``tasks`` (default: all) to ``out_dir`` for ``$DORAN_IMAGE_SUITE_DIR``.

    One compressed ``<dataset>.npz`` per dataset: the images at the stored resolution, losslessly, in the
    smaller of two encodings for that dataset (``SourceDataset.encoding``: ELPV as one PNG per image, MNIST
    as the deflated uint8 array), plus the annotations; and ``manifest.json`` with each file's sha256 and
    size, image statistics, licences, and each task's split sizes, per-class counts and index hashes.
    Returns the manifest.
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
