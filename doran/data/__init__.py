"""Datasets, data modules, deterministic subsets and data validation.

Subsets and splits of label lists: ``splits``. Readers that validate files: ``tables`` (text), ``images``
(VTAB-1K, FGVC, ImageFolder), giving ``records`` or raising ``errors.DataError``; entry point: ``load``.
Torch datasets and data module: ``datasets``. Suites: ``textsuite``, ``imagesuite``, ``commonsense`` (LM).

Example::

    from doran.data import load_splits, stratified_subset
    splits = load_splits(kind="embedded")               # Rotten Tomatoes, fixed 80/10/10 split
    idx = stratified_subset(splits.train.labels, fraction=0.1, seed=1)
"""

from .datasets import (
    ClassificationDataModule,
    EpochSeededSampler,
    ImageDataset,
    TextCollate,
    TextDataset,
    timm_transforms,
)
from .errors import DataError
from .images import (
    FGVC_DATASETS,
    IMAGE_SUFFIXES,
    VTAB_PROTOCOLS,
    VTAB_TASKS,
    read_fgvc,
    read_imagefolder,
    read_list_file,
    read_vtab,
)
from .load import load_splits
from .records import Split, Splits
from .splits import (
    check_fraction,
    check_split_fractions,
    class_counts,
    stratified_split,
    stratified_subset,
    subset_hash,
    subset_size,
)
from .tables import (
    MAX_FIELD_CHARS,
    MISSING_LABELS,
    DataWarning,
    check_labels,
    deduplicate,
    drop_overlap,
    read_text_table,
)

__all__ = [
    "FGVC_DATASETS",
    "IMAGE_SUFFIXES",
    "MAX_FIELD_CHARS",
    "MISSING_LABELS",
    "VTAB_PROTOCOLS",
    "VTAB_TASKS",
    "ClassificationDataModule",
    "DataError",
    "DataWarning",
    "EpochSeededSampler",
    "ImageDataset",
    "Split",
    "Splits",
    "TextCollate",
    "TextDataset",
    "check_fraction",
    "check_labels",
    "check_split_fractions",
    "class_counts",
    "deduplicate",
    "drop_overlap",
    "load_splits",
    "read_fgvc",
    "read_imagefolder",
    "read_list_file",
    "read_text_table",
    "read_vtab",
    "stratified_split",
    "stratified_subset",
    "subset_hash",
    "subset_size",
    "timm_transforms",
]
