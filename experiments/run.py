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
DATA_ARGS = ("path", "train_path", "val_path", "test_path", "text_column", "label_column", "label_names", "split",
             "split_seed", "task", "name", "protocol", "image_dir")
TEXT_DATA, IMAGE_DATA = ("embedded", "table", "csv", "jsonl"), ("vtab", "fgvc", "imagefolder")


class ConfigError(ValueError):
    """A bad config value or override; the message names the key and the valid choices."""


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
            raise ConfigError(f"{source}unknown key {path!r}; valid keys here: {sorted(out)}")
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


def apply_overrides(
    cfg: dict[str, Any], overrides: list[str], schema: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Apply ``key=value`` overrides (dotted keys or unique leaf names) with type coercion.

    Each value is coerced to the type of the key's value in ``schema`` (the defaults file; a null there
    takes any type) when given, else to the type of its current value in ``cfg``.
    """
    cfg = copy.deepcopy(cfg)
    types = _leaves(schema) if schema is not None else None
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value (e.g. method=dora, train.lr=5e-4)")
        key, text = item.split("=", 1)
        key = key.strip()
        leaves = _leaves(cfg)
        if key not in leaves and not _is_free(key.rsplit(".", 1)[0]):
            candidates = [p for p in leaves if p.rsplit(".", 1)[-1] == key]
            if len(candidates) == 1:
                key = candidates[0]
            elif len(candidates) > 1:
                raise ConfigError(f"override {key!r} is ambiguous: {candidates}; use the dotted name")
            else:
                raise ConfigError(f"unknown key {key!r}; valid keys: {sorted(leaves)}")
        *parents, leaf = key.split(".")
        node = cfg
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {key!r}: {p!r} is not a section")
        default = types.get(key) if types is not None and key in types else leaves.get(key)
        node[leaf] = _coerce(key, _parse_value(text), default)
    return cfg


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
        from doran.compiling import check_compile

        check_compile(cfg["runtime"]["compile"])
    except ValueError as err:
        raise ConfigError(f"runtime.compile: {err}") from None
    if m["kind"] not in ("text", "image"):
        raise ConfigError(f"model.kind must be 'text' or 'image', got {m['kind']!r}")
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
    for key in ("path", "train_path", "val_path", "test_path"):
        if d[key] is not None and not Path(d[key]).exists():
            raise ConfigError(f"data.{key}={d[key]!r} does not exist")
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


# ---------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------


def _eval_subset(split, limit: int | None, split_seed: int):
    from doran.data import stratified_subset

    if not limit or len(split) <= limit:
        return split
    return split.take(stratified_subset(split.labels, limit / len(split), split_seed))


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
    from doran.data import (
        ClassificationDataModule,
        ImageDataset,
        TextCollate,
        TextDataset,
        class_counts,
        load_splits,
        stratified_subset,
        subset_hash,
        timm_transforms,
    )
    from doran.training import (
        AdapterClassifier,
        build_backbone,
        default_callbacks,
        derive_seed,
        resolve_precision,
        seed_everything,
    )

    t_start, c_start = time.perf_counter(), time.process_time()
    rt, m, d, t = cfg["runtime"], cfg["model"], cfg["data"], cfg["train"]
    run_id = results.make_run_id(cfg)
    out = Path(cfg["out"])
    result_path, run_dir = out / f"{run_id}.json", out / run_id
    if result_path.exists() and not rt["force"]:
        if verbose:
            print(f"[run] {result_path} exists, skipping (runtime.force=true re-runs it)")
        return results.read_result(result_path)
    if rt["threads"]:
        torch.set_num_threads(int(rt["threads"]))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    # 1. data: read and validate everything before any model is loaded
    data_args = {k: d[k] for k in DATA_ARGS}
    splits = load_splits(d["kind"], **data_args)
    subset = stratified_subset(splits.train.labels, cfg["fraction"], cfg["seed"])
    train_split = splits.train.take(subset)
    val_split = _eval_subset(splits.val, d["eval_limit"], d["split_seed"])
    test_split = _eval_subset(splits.test, d["eval_limit"], d["split_seed"])

    # 2. model (pretrained weights, or a clear error)
    seed_everything(cfg["seed"])
    backbone = {
        k: m[k] for k in ("kind", "name", "pretrained", "checkpoint", "allow_download", "tokenizer", "kwargs")
    }
    model, tokenizer, model_info = build_backbone(num_classes=splits.num_classes, **backbone)
    if m["kind"] == "text":
        datasets = [TextDataset(s, tokenizer, m["max_length"]) for s in (train_split, val_split, test_split)]
        collate = TextCollate(tokenizer.pad_token_id)
    else:
        train_tf, eval_tf = timm_transforms(model, m["augment"])
        datasets = [
            ImageDataset(train_split, train_tf),
            ImageDataset(val_split, eval_tf),
            ImageDataset(test_split, eval_tf),
        ]
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
        num_classes=splits.num_classes,
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
        errors: tuple[type[BaseException], ...]) -> int:
    """The command line shared by the run scripts: ``--config``, ``--print-config``, ``key=value`` overrides.

    Exit status: 0 completed, 3 failed (recorded), 2 bad input (one of ``errors``, printed without a trace).
    """
    parser = argparse.ArgumentParser(prog=prog, description=doc.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help=f"YAML merged over {default_config.name}")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("overrides", nargs="*", help="key=value overrides (e.g. method=dora train.lr=5e-4)")
    args = parser.parse_args(argv)
    try:
        cfg = load(args.config, args.overrides)
        if args.print_config:
            from doran.results import make_run_id

            print(yaml.safe_dump({"run_id": make_run_id(cfg), **cfg}, sort_keys=False))
            return 0
        result = run_fn(cfg)
    except (ConfigError, *errors) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0 if not result or result["status"] == "completed" else 3  # {}: a non-zero rank of a multi-GPU run


def main(argv: list[str] | None = None) -> int:
    from doran.assets import AssetError
    from doran.data import DataError
    from doran.training import WeightsError

    return cli(argv, "python -m experiments.run", __doc__, DEFAULT_CONFIG, load_config, run,
               (DataError, WeightsError, AssetError))


if __name__ == "__main__":
    sys.exit(main())
