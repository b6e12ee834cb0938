"""One run: train, evaluate and write one result file.

    python -m experiments.run                                       # the embedded default (DoRAN)
    python -m experiments.run --config experiments/configs/smoke.yaml method=lora seed=1
    python -m experiments.run method=dora fraction=0.1 train.lr=5e-4 out=experiments/results/dev
    python -m experiments.run --print-config data.kind=vtab data.path=/data/vtab-1k data.task=dtd \
        model.kind=image model.name=vit_base_patch16_224.orig_in21k

Config: ``experiments/configs/default.yaml``, then ``--config FILE`` (merged over it), then ``key=value``
overrides (dotted keys, or a leaf name that is unique, e.g. ``lr=5e-4``; values are YAML, ``1e-3`` is a
float). Unknown keys are an error naming the valid ones. Everything (method, fraction, paths, data files,
images) is validated before a model is loaded.

Output: ``<out>/<run_id>.json`` (written atomically) and ``<out>/<run_id>/`` (adapter.safetensors, and
checkpoints/last.ckpt while the run is unfinished). ``run_id = <method>-s<seed>-f<fraction>-<config hash>``.
A run whose result file exists is skipped (``runtime.force=true`` re-runs it); an interrupted run resumes
from its last checkpoint. Exit status: 0 completed, 3 failed (NaN/inf loss, recorded), 2 bad input.
"""

from __future__ import annotations

import argparse
import copy
import os
import signal
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
DEFAULT_CONFIG = CONFIG_DIR / "default.yaml"
#: sections whose keys are free (checked elsewhere): AdapterConfig fields, constructor kwargs.
FREE_SECTIONS = ("adapter", "model.kwargs")
#: the data-config keys that ``doran.data.load_splits`` takes
DATA_ARGS = ("path", "train_path", "val_path", "test_path", "text_column", "text_pair_column", "label_column",
             "label_names", "split", "split_seed", "dedup", "task", "name", "protocol", "image_dir")
#: data-file suffixes that make a given ``data.path`` a text table (``data.kind=table``)
TABLE_SUFFIXES = (".csv", ".tsv", ".txt", ".jsonl", ".ndjson")
TEXT_DATA, IMAGE_DATA = ("embedded", "table", "csv", "jsonl"), ("vtab", "fgvc", "imagefolder")


class ConfigError(ValueError):
    """A bad config value or override; the message names the key and the valid choices."""


class RunInterrupted(KeyboardInterrupt):
    """A run stopped by SIGTERM or Ctrl-C: nothing was written but the checkpoint; the message says how to
    resume. A ``KeyboardInterrupt``, so that the sweep runner stops as it does on Ctrl-C."""

    def __init__(self, message: str, signal_name: str = "SIGTERM"):
        super().__init__(message)
        self.signal_name = signal_name

    @property
    def exit_status(self) -> int:
        return 143 if self.signal_name == "SIGTERM" else 130


#: key names of other tools -> ours, for "did you mean"
SYNONYMS = {"learning_rate": "lr", "num_epochs": "epochs", "n_epochs": "epochs", "max_epochs": "epochs",
            "rank": "r", "lora_r": "r", "lora_alpha": "alpha", "lora_dropout": "dropout", "bs": "batch_size",
            "wd": "weight_decay", "model_name": "name", "dataset": "kind", "max_len": "max_length",
            "max_seq_length": "max_length", "warmup": "warmup_ratio", "fp16": "precision", "bf16": "precision"}


def did_you_mean(key: str, valid: list[str] | tuple[str, ...]) -> str:
    """`` (did you mean 'x'?)`` for the closest valid keys (full dotted names or their last part), or ``""``.

    >>> did_you_mean("train.lrr", ["train.lr", "train.epochs"])
    " (did you mean 'train.lr'?)"
    """
    import difflib

    valid = list(valid)
    leaf = key.rsplit(".", 1)[-1]
    if leaf in SYNONYMS:  # names other tools use for the same setting
        hits = [v for v in valid if v.rsplit(".", 1)[-1] == SYNONYMS[leaf]]
        if hits:
            return f" (did you mean {' or '.join(repr(h) for h in hits)}?)"
    close = difflib.get_close_matches(key, valid, n=3, cutoff=0.6)
    if not close:  # compare the last part: "lrate" -> "train.lr"
        by_leaf: dict[str, list[str]] = {}
        for v in valid:
            by_leaf.setdefault(v.rsplit(".", 1)[-1], []).append(v)
        close = [v for name in difflib.get_close_matches(leaf, list(by_leaf), n=3, cutoff=0.5) for v in by_leaf[name]]
    return f" (did you mean {' or '.join(repr(c) for c in close[:3])}?)" if close else ""


# ---------------------------------------------------------------------------------------------------------
# Config: load, merge, override, validate
# ---------------------------------------------------------------------------------------------------------


def _read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; configs live in {CONFIG_DIR}")
    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file must be a YAML mapping")
    return data


def _is_free(path: str) -> bool:
    return any(path == s or path.startswith(s + ".") for s in FREE_SECTIONS)


def _merge(
    base: dict[str, Any], update: dict[str, Any], prefix: str = "", source: str = ""
) -> dict[str, Any]:
    """``update`` merged into a copy of ``base``; keys absent from ``base`` are errors outside free sections."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        path = f"{prefix}{key}"
        if key not in out and not _is_free(prefix.rstrip(".")) and not _is_free(path):
            raise ConfigError(
                f"{source}unknown key {path!r}{did_you_mean(key, sorted(out))}; valid keys here: {sorted(out)}"
            )
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value, f"{path}.", source)
        else:
            out[key] = value
    return out


def _leaves(cfg: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in cfg.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and not _is_free(path):
            out.update(_leaves(value, f"{path}."))
        else:
            out[path] = value
    return out


def _parse_value(text: str) -> Any:
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str):
        try:  # YAML 1.1 reads "1e-3" as a string
            return float(value) if any(c in value.lower() for c in "e.") else value
        except ValueError:
            return value
    return value


def _coerce(key: str, value: Any, default: Any) -> Any:
    """``value`` converted to the type of ``default`` where that is unambiguous, else ``ConfigError``."""
    if default is None or (value is None and not isinstance(default, (bool, int, float))):
        return value
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if isinstance(default, int) and not isinstance(default, bool):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key} must be an integer, got {value!r}")
    if isinstance(default, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{key} must be a number, got {value!r}")
    if isinstance(default, list):
        if isinstance(value, str):
            return [v.strip() for v in value.split(",") if v.strip()]
        if isinstance(value, (list, tuple)):
            return list(value)
        raise ConfigError(f"{key} must be a list such as [a, b], got {value!r}")
    if default == "auto":  # "auto" keys take "auto" or a value of their own (a list, a bool, a name)
        return value
    if isinstance(default, str):
        if isinstance(value, (list, dict)):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return value if isinstance(value, str) else str(value)
    if isinstance(default, dict) and not isinstance(value, dict):
        raise ConfigError(f"{key} must be a mapping such as {{a: 1}}, got {value!r}")
    return value


def _sections(cfg: dict[str, Any], prefix: str = "") -> set[str]:
    out = set()
    for key, value in cfg.items():
        if isinstance(value, dict) and not _is_free(f"{prefix}{key}"):
            out.add(f"{prefix}{key}")
            out |= _sections(value, f"{prefix}{key}.")
    return out


def apply_overrides(
    cfg: dict[str, Any], overrides: list[str], schema: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Apply ``key=value`` overrides (dotted keys or unique leaf names) with type coercion.

    Each value is coerced to the type of the key's value in ``schema`` (the defaults file; a null there
    takes any type) when given, else to the type of its current value in ``cfg``. A key that names a whole
    section takes a mapping, or null where the defaults have null (``data.synthetic=null``).
    """
    cfg = copy.deepcopy(cfg)
    types = _leaves(schema) if schema is not None else {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value (e.g. method=dora, train.lr=5e-4)")
        key, text = item.split("=", 1)
        key = key.strip()
        leaves = _leaves(cfg)
        known = {**types, **leaves}
        sections = _sections(cfg) | (_sections(schema) if schema is not None else set())
        if key not in known and key not in sections and not _is_free(key.rsplit(".", 1)[0]):
            candidates = sorted({p for p in known if p.rsplit(".", 1)[-1] == key})
            if len(candidates) == 1:
                key = candidates[0]
            elif len(candidates) > 1:
                raise ConfigError(f"override {key!r} is ambiguous: {candidates}; use the dotted name")
            else:
                raise ConfigError(
                    f"unknown key {key!r}{did_you_mean(key, sorted(known))}; `--print-config` shows every key"
                )
        *parents, leaf = key.split(".")
        node = cfg
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {key!r}: {p!r} is not a section")
        value = _parse_value(text)
        if key in sections and key not in types and key not in leaves:
            if value is not None and not isinstance(value, dict):
                raise ConfigError(f"{key} is a section: give a mapping such as {key}={{a: 1}}, or a single key")
            if value is None and not (schema is not None and _get(schema, key, "missing") is None):
                raise ConfigError(f"{key} is a section that cannot be null; set its keys ({key}.<name>=...)")
            node[leaf] = value
            continue
        default = types.get(key) if key in types else leaves.get(key)
        node[leaf] = _coerce(key, value, default)
    return cfg


def _get(cfg: dict[str, Any], dotted: str, missing: Any = None) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return missing
        node = node[part]
    return node


def load_config(
    config: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> dict[str, Any]:
    """default.yaml, merged with ``config`` (a file), then ``overrides``; validated (no model is loaded)."""
    defaults = cfg = _read_yaml(DEFAULT_CONFIG)
    if config is not None and Path(config).resolve() != DEFAULT_CONFIG:
        cfg = _merge(cfg, _read_yaml(config), source=f"{config}: ")
    cfg = apply_overrides(cfg, list(overrides), schema=defaults)
    return resolve_config(cfg)


def resolve_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """Fill ``auto`` values and check every value that can be checked without data or models."""
    import doran
    from doran.data import check_fraction

    cfg = copy.deepcopy(cfg)
    m, d, t = cfg["model"], cfg["data"], cfg["train"]
    method = str(cfg["method"]).lower()
    if method not in doran.PRESETS:
        raise ConfigError(f"unknown method {cfg['method']!r}; valid: {sorted(doran.PRESETS)}")
    cfg["method"] = method
    if not isinstance(cfg["seed"], int) or cfg["seed"] < 0:
        raise ConfigError(f"seed must be an integer >= 0, got {cfg['seed']!r}")
    try:
        cfg["fraction"] = check_fraction(cfg["fraction"])
    except ValueError as err:
        raise ConfigError(str(err)) from None
    try:
        from doran.fast.compiling import check_compile

        check_compile(cfg["runtime"]["compile"])
    except ValueError as err:
        raise ConfigError(f"runtime.compile: {err}") from None
    if m["kind"] not in ("text", "image"):
        raise ConfigError(f"model.kind must be 'text' or 'image', got {m['kind']!r}")
    given = [k for k in ("path", "train_path", "val_path", "test_path") if d[k] is not None]
    for key in given:
        if not Path(d[key]).exists():
            raise ConfigError(f"data.{key}={d[key]!r} does not exist")
    if d["kind"] == "embedded" and given:  # a given path is never ignored
        d["kind"] = _infer_data_kind(d, given)
    if d["kind"] not in TEXT_DATA + IMAGE_DATA:
        raise ConfigError(f"unknown data.kind {d['kind']!r}; valid: {sorted(TEXT_DATA + IMAGE_DATA)}")
    if (d["kind"] in TEXT_DATA) != (m["kind"] == "text"):
        raise ConfigError(
            f"data.kind={d['kind']!r} does not fit model.kind={m['kind']!r}: text data "
            f"{TEXT_DATA} needs model.kind=text, image data {IMAGE_DATA} model.kind=image"
        )
    from doran.training import default_head, default_targets

    targets = cfg["adapter"].get("targets", "auto")
    if targets == "auto":
        targets = default_targets(m["kind"])
    elif isinstance(targets, str):  # "qkv" or "query,value"; a bare string must not become its characters
        targets = [x.strip() for x in targets.split(",") if x.strip()]
    cfg["adapter"]["targets"] = list(targets)
    if m["head"] == "auto":
        m["head"] = default_head(m["kind"])
    if m["trainable"] == "auto":
        m["trainable"] = [default_head(m["kind"])]
    if isinstance(m["trainable"], str):
        m["trainable"] = [m["trainable"]]
    try:
        doran.AdapterConfig.preset(method, **cfg["adapter"])
    except (TypeError, ValueError) as err:
        raise ConfigError(f"adapter: {err}") from None
    for key, low in (("epochs", 1), ("batch_size", 1), ("eval_batch_size", 1)):
        if not isinstance(t[key], int) or t[key] < low:
            raise ConfigError(f"train.{key} must be an integer >= {low}, got {t[key]!r}")
    if not t["lr"] > 0:
        raise ConfigError(f"train.lr must be > 0, got {t['lr']!r}")
    if not 0 <= t["warmup_ratio"] < 1:
        raise ConfigError(f"train.warmup_ratio must lie in [0, 1), got {t['warmup_ratio']!r}")
    if d["kind"] in ("table", "csv", "jsonl"):
        if d["path"] is not None and (d["train_path"] or d["val_path"] or d["test_path"]):
            raise ConfigError(
                "data.path (one file, split by data.split) and data.train_path/val_path/test_path (files "
                "already split) exclude each other: give one or the other"
            )
        if d["path"] is None and not (d["train_path"] and d["test_path"]):
            raise ConfigError(
                f"data.kind={d['kind']} needs a file: data.path=my.csv (split by data.split), or "
                "data.train_path=... and data.test_path=... (data.val_path optional)"
            )
    if d["kind"] in ("embedded", "table", "csv", "jsonl") and (d["kind"] == "embedded" or d["path"] is not None):
        from doran.data import check_split_fractions

        try:
            d["split"] = list(check_split_fractions(d["split"]))
        except ValueError as err:
            raise ConfigError(str(err)) from None
    if not isinstance(d["dedup"], bool):
        raise ConfigError(f"data.dedup must be true or false, got {d['dedup']!r}")
    if m["kind"] == "text" and (not isinstance(m["max_length"], int) or m["max_length"] < 2):
        raise ConfigError(
            f"model.max_length must be an integer >= 2 (tokens per example, [CLS] and [SEP] included), "
            f"got {m['max_length']!r}"
        )
    if m["checkpoint"] is not None and not Path(m["checkpoint"]).is_file():
        raise ConfigError(f"model.checkpoint={m['checkpoint']!r} is not a file")
    if (
        m["kind"] == "text"
        and m["name"] not in ("embedded-minilm", "random-bert")
        and not Path(m["name"]).is_dir()
    ):
        raise ConfigError(
            f"model.name={m['name']!r} is not a local folder; text models load offline from a "
            "from_pretrained folder, or use embedded-minilm / random-bert"
        )
    return cfg


def _infer_data_kind(d: dict[str, Any], given: list[str]) -> str:
    """The data kind a path given with ``data.kind=embedded`` (the default) must mean, or ``ConfigError``."""
    path = Path(d[given[0]])
    suffix = "".join(path.suffixes[-2:]).lower() if path.suffix.lower() == ".gz" else path.suffix.lower()
    if path.is_file() and any(suffix.endswith(t) for t in TABLE_SUFFIXES):
        return "table"
    raise ConfigError(
        f"data.{given[0]}={d[given[0]]!r} is given but data.kind is 'embedded' (the built-in data, which "
        "reads no path): set data.kind=table for a CSV/TSV/JSONL file, or vtab / fgvc / imagefolder for an "
        "image dataset folder"
    )


# ---------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------


def _eval_subset(split, limit: int | None, split_seed: int):
    from doran.data import stratified_subset

    if not limit or len(split) <= limit:
        return split
    return split.take(stratified_subset(split.labels, limit / len(split), split_seed))


def read_data(cfg: dict[str, Any]):
    """``(splits, warnings)``: the run's data read and validated (no model), and the ``DataWarning``
    messages it raised (printed, and recorded in the result)."""
    import warnings

    from doran.data import DataWarning, load_splits

    d = cfg["data"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", DataWarning)
        splits = load_splits(d["kind"], **{k: d[k] for k in DATA_ARGS})
    messages = []
    for w in caught:
        if issubclass(w.category, DataWarning):
            messages.append(str(w.message))
            print(f"warning: {w.message}", file=sys.stderr)
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return splits, messages


class interruptible:
    """Turn SIGTERM / Ctrl-C during ``trainer.fit`` into ``RunInterrupted`` with how to resume.

    Lightning answers SIGTERM by raising ``SIGTERMException`` (a ``SystemExit`` whose status is 0) at the next
    batch and Ctrl-C by ``sys.exit(1)``: left alone, a killed run would exit 0 and print nothing. The run's
    last checkpoint (written at every epoch end and every ``runtime.ckpt_every_n_steps``) is kept.
    """

    def __init__(self, trainer, ckpt: Path, command: str):
        self.trainer, self.ckpt, self.command = trainer, ckpt, command

    def __enter__(self):
        return self

    def __exit__(self, kind, err, tb) -> bool:
        if err is None or not isinstance(err, (SystemExit, KeyboardInterrupt)):
            return False
        signal.signal(signal.SIGINT, signal.default_int_handler)  # Lightning ignores Ctrl-C after the first
        from lightning.pytorch.utilities.exceptions import SIGTERMException

        # Lightning turns any KeyboardInterrupt (ours included) into sys.exit(1): ask what was received
        sigterm = isinstance(err, SIGTERMException) or _SIGTERM_SEEN or getattr(err, "signal_name", "") == "SIGTERM"
        name = "SIGTERM" if sigterm else "SIGINT"
        if self.ckpt.is_file():
            import torch

            step = int(torch.load(self.ckpt, map_location="cpu", weights_only=True)["global_step"])
            resume = f"its checkpoint {self.ckpt} (step {step}) is kept: run the same command again to resume from it"
        else:
            resume = "no checkpoint had been written yet: the same command starts the run again"
        raise RunInterrupted(
            f"{name} at step {self.trainer.global_step}: the run stopped before it finished and wrote no "
            f"result; {resume}",
            name,
        ) from None


def build(cfg: dict[str, Any], num_classes: int, splits: tuple) -> tuple[Any, Any, dict[str, Any]]:
    """``(module, datamodule, model_info)`` of a resolved config: the backbone with its adapters injected
    (an ``AdapterClassifier``) and the data module over the ``(train, val, test)`` splits."""
    from doran.data import ClassificationDataModule, ImageDataset, TextCollate, TextDataset, timm_transforms
    from doran.training import AdapterClassifier, build_backbone

    rt, m, t = cfg["runtime"], cfg["model"], cfg["train"]
    backbone = {
        k: m[k] for k in ("kind", "name", "pretrained", "checkpoint", "allow_download", "tokenizer", "kwargs")
    }
    model, tokenizer, model_info = build_backbone(num_classes=num_classes, **backbone)
    if m["kind"] == "text":
        datasets = [TextDataset(s, tokenizer, m["max_length"]) for s in splits]
        collate = TextCollate(tokenizer.pad_token_id)
    else:
        train_tf, eval_tf = timm_transforms(model, m["augment"])
        datasets = [ImageDataset(splits[0], train_tf), ImageDataset(splits[1], eval_tf),
                    ImageDataset(splits[2], eval_tf)]
        collate = None
    datamodule = ClassificationDataModule(
        *datasets,
        batch_size=t["batch_size"],
        eval_batch_size=t["eval_batch_size"],
        seed=cfg["seed"],
        num_workers=rt["num_workers"],
        collate_fn=collate,
    )
    module = AdapterClassifier(
        backbone=backbone,
        method=cfg["method"],
        adapter=cfg["adapter"],
        num_classes=num_classes,
        head=m["head"],
        trainable=m["trainable"],
        lr=t["lr"],
        weight_decay=t["weight_decay"],
        warmup_ratio=t["warmup_ratio"],
        warmup_steps=t["warmup_steps"],
        min_lr_ratio=t["min_lr_ratio"],
        label_smoothing=t["label_smoothing"],
        seed=cfg["seed"],
        compile=rt["compile"],
        model=model,
    )
    return module, datamodule, model_info


def run(
    cfg: dict[str, Any],
    callbacks: list | tuple = (),
    trainer_kwargs: dict[str, Any] | None = None,
    verbose: bool = True,
) -> dict[str, Any]:
    """Train and evaluate the resolved config ``cfg`` (see ``load_config``); write and return the result.

    ``callbacks`` and ``trainer_kwargs`` are extra Lightning callbacks / Trainer arguments (tests).
    """
    import lightning.pytorch as pl
    import torch

    import doran
    from doran import results
    from doran.data import class_counts, stratified_subset, subset_hash
    from doran.training import (
        default_callbacks,
        derive_seed,
        resolve_precision,
        seed_everything,
    )

    t_start, c_start = time.perf_counter(), time.process_time()
    rt, d, t = cfg["runtime"], cfg["data"], cfg["train"]

    # 1. data: read and validate everything before any model is loaded; the run's identity includes it
    splits, data_warnings = read_data(cfg)
    data_sha256 = splits.fingerprint()
    run_id = results.make_run_id(cfg, data_sha256)
    out = Path(cfg["out"])
    result_path, run_dir = out / f"{run_id}.json", out / run_id
    if result_path.exists() and not rt["force"]:
        if verbose:
            print(f"[run] {result_path} exists, skipping (runtime.force=true re-runs it)")
        return results.read_result(result_path)
    if rt["threads"]:
        torch.set_num_threads(int(rt["threads"]))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    subset = stratified_subset(splits.train.labels, cfg["fraction"], cfg["seed"])
    train_split = splits.train.take(subset)
    val_split = _eval_subset(splits.val, d["eval_limit"], d["split_seed"])
    test_split = _eval_subset(splits.test, d["eval_limit"], d["split_seed"])

    # 2. model (pretrained weights, or a clear error)
    seed_everything(cfg["seed"])
    module, datamodule, model_info = build(cfg, splits.num_classes, (train_split, val_split, test_split))

    # 3. train (resuming from the run's last checkpoint if an earlier attempt was interrupted)
    diag = cfg["diagnostics"]
    cbs = default_callbacks(
        run_dir, diag["every_n_steps"], diag["max_grad_records"], rt["ckpt_every_n_steps"]
    )
    progress = rt["progress_bar"]
    progress = sys.stderr.isatty() if progress == "auto" else progress in (True, "true", "on", 1)
    precision = resolve_precision(t["precision"])
    trainer = pl.Trainer(
        **{
            "max_epochs": t["epochs"],
            "max_steps": t["max_steps"],
            "precision": precision,
            "accelerator": "auto",
            "devices": 1,
            "gradient_clip_val": t["grad_clip"],
            "logger": False,
            "enable_checkpointing": False,
            "enable_progress_bar": progress,
            "enable_model_summary": progress,
            "num_sanity_val_steps": 0,
            # the checkpoint callback last: it saves the other callbacks' state of the same epoch
            "callbacks": [*callbacks, *[c for k, c in cbs.items() if k != "checkpoint"], cbs["checkpoint"]],
            **(trainer_kwargs or {}),
        }
    )
    ckpt = cbs["checkpoint"].last
    resumed_from = None
    if ckpt.is_file():
        resumed_from = int(torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"])
        if verbose:
            print(f"[run] resuming {run_id} from {ckpt} (step {resumed_from})")
    seed_everything(derive_seed(cfg["seed"], "train"))  # the dropout stream (a resume restores its own)
    if verbose:
        print(
            f"[run] {run_id}: {cfg['method']} on {len(train_split)} training examples "
            f"({cfg['fraction']:g} of {len(splits.train)}), {precision}, device "
            f"{'cuda' if torch.cuda.is_available() else 'cpu'}"
        )
        doran.print_trainable_parameters(module.model)
    t_fit = time.perf_counter()
    with interruptible(trainer, ckpt, "python -m experiments.run"):
        trainer.fit(module, datamodule=datamodule, ckpt_path=str(ckpt) if ckpt.is_file() else None)
    fit_s = time.perf_counter() - t_fit
    failure = cbs["guard"].failure

    # 4. test the last weights (no checkpoint selection), save the adapter, write the result
    metrics: dict[str, Any] = {}
    history = cbs["history"]
    if history.epochs["val_acc"]:
        metrics["val/acc"], metrics["val/loss"] = (
            history.epochs["val_acc"][-1],
            history.epochs["val_loss"][-1],
        )
        metrics["train/loss"] = history.epochs["train_loss"][-1]
    artifacts = {}
    if failure is None:
        tested = trainer.test(module, datamodule=datamodule, verbose=False)[0]
        metrics["test/acc"], metrics["test/loss"] = float(tested["test/acc"]), float(tested["test/loss"])
        artifacts["adapter"] = str(doran.save_adapter(module.model, run_dir / "adapter.safetensors"))
    test_counts = class_counts(test_split.labels, splits.num_classes)
    metrics["test/majority_acc"] = max(test_counts) / max(1, len(test_split))
    epochs = history.epochs
    result = {
        "schema_version": results.SCHEMA_VERSION,
        "run_id": run_id,
        "status": "failed" if failure else "completed",
        "failure": failure,
        "method": cfg["method"],
        "seed": cfg["seed"],
        "fraction": cfg["fraction"],
        "config": cfg,
        "adapter_config": module.adapter_config.to_dict(),
        "metrics": metrics,
        "curves": {"epochs": epochs, "steps": history.steps},
        "tau": cbs["tau"].columns,
        "magnitude": cbs["magnitude"].columns,
        "grad_norm": cbs["grad_norm"].columns,
        "params": doran.trainable_parameter_counts(module.model),
        "adapted_modules": module.adapted,
        "model": model_info,
        "data": {
            "description": splits.description,
            "sha256": data_sha256,
            "cleaning": splits.cleaning,
            "warnings": data_warnings,
            "sizes": splits.sizes(),
            "eval_sizes": {"val": len(val_split), "test": len(test_split)},
            "num_classes": splits.num_classes,
            "label_names": splits.label_names[:1000],
            "subset": {
                "fraction": cfg["fraction"],
                "size": len(subset),
                "sha256": subset_hash(subset),
                "per_class": class_counts(train_split.labels, splits.num_classes),
            },
        },
        "steps": int(trainer.global_step),
        "resumed_from_step": resumed_from,
        "wall_time_s": time.perf_counter() - t_start,
        "cpu_time_s": time.process_time() - c_start,
        "fit_wall_s": fit_s,
        "epoch_train_wall_s": epochs["train_wall_s"],
        "epoch_train_cpu_s": epochs["train_cpu_s"],
        "peak_memory": results.peak_memory(),
        "device": {**results.device_info(), "precision": precision,
                   "compile": module.runner.mode if module._runner else rt["compile"]},
        "env": results.environment(),
        "artifacts": artifacts,
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    results.write_result(result, result_path, run_dir, rt["keep_checkpoints"])
    if verbose:
        acc = metrics.get("test/acc")
        print(
            f"[run] {result['status']}: {run_id} test/acc={acc if acc is None else round(acc, 4)} "
            f"(majority {metrics['test/majority_acc']:.4f}) in {result['wall_time_s']:.0f}s -> {result_path}"
        )
        if failure:
            print(f"[run] failure at step {failure['step']}: {failure['cause']}")
    return result


def cli(argv: list[str] | None, prog: str, doc: str, default_config: Path, load, run_fn,
        errors: tuple[type[BaseException], ...], identify=None) -> int:
    """The command line shared by the run scripts: ``--config``, ``--print-config``, ``key=value`` overrides.

    Exit status: 0 completed, 3 failed (recorded), 2 bad input (one of ``errors``, printed without a trace),
    143 / 130 stopped by SIGTERM / Ctrl-C (the checkpoint is kept; the same command resumes).
    """
    parser = argparse.ArgumentParser(prog=prog, description=doc.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help=f"YAML merged over {default_config.name}")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("overrides", nargs="*", help="key=value overrides (e.g. method=dora train.lr=5e-4)")
    args = parser.parse_intermixed_args(argv)  # overrides before and after --config
    previous = signal.signal(signal.SIGTERM, _raise_sigterm)
    try:
        cfg = load(args.config, args.overrides)
        if args.print_config:  # the run_id reads (and so checks) the data, never a model
            print(yaml.safe_dump({"run_id": identify(cfg), **cfg} if identify else cfg, sort_keys=False))
            return 0
        result = run_fn(cfg)
    except (ConfigError, *errors) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except RunInterrupted as err:
        print(f"\ninterrupted: {err}", file=sys.stderr)
        return err.exit_status
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0 if not result or result["status"] == "completed" else 3  # {}: a non-zero rank of a multi-GPU run


_SIGTERM_SEEN: list[bool] = []


def _raise_sigterm(signum, frame) -> None:
    """SIGTERM handler: stop like Ctrl-C (Lightning, during ``fit``, calls it after its own handler)."""
    _SIGTERM_SEEN.append(True)
    raise RunInterrupted(
        "SIGTERM: the run stopped before it finished and wrote no result; run the same command again (it "
        "resumes from the last checkpoint, if one was written)",
        "SIGTERM",
    )


def main(argv: list[str] | None = None) -> int:
    from doran.assets import AssetError
    from doran.data import DataError
    from doran.training import WeightsError

    return cli(argv, "python -m experiments.run", __doc__, DEFAULT_CONFIG, load_config, run,
               (DataError, WeightsError, AssetError), identify=run_id_of)


def run_id_of(cfg: dict[str, Any]) -> str:
    """The run_id of the resolved config ``cfg``: its config and its data's fingerprint (reads the data)."""
    from doran.results import make_run_id

    return make_run_id(cfg, read_data(cfg)[0].fingerprint())


if __name__ == "__main__":
    sys.exit(main())
