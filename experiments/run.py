"""One run: train, evaluate and write one result file.

    python -m experiments.run                                       # the embedded default (DoRAN)
    python -m experiments.run method=lora --config experiments/configs/smoke.yaml seed=1
    python -m experiments.run method=dora fraction=0.1 train.lr=5e-4 out=experiments/results/dev
    python -m experiments.run --print-config data.kind=vtab data.path=/data/vtab-1k data.task=dtd \
        model.kind=image model.name=vit_base_patch16_224.orig_in21k

Config (``experiments.config.RunConfig``): the schema's defaults, then ``--config FILE``, then ``key=value``
overrides (dotted keys, or a leaf name that is unique, e.g. ``lr=5e-4``; values are YAML). Unknown keys are an
error that says "did you mean". Everything (method, fraction, paths, every data record) is validated before a
model is loaded.

Output: ``<out>/<run_id>.json.gz`` (gzip JSON, written atomically) and ``<out>/<run_id>/`` (adapter.safetensors, and
checkpoints/last.ckpt while the run is unfinished). ``run_id = <method>-s<seed>-f<fraction>-<hash>``, the hash
covering the config and the data's content. A run whose result file exists is skipped (``runtime.force=true``
re-runs it); an interrupted run resumes from its last checkpoint. Exit status: 0 completed, 3 failed (NaN/inf
loss, recorded), 2 bad input, 143 / 130 stopped by SIGTERM / Ctrl-C (the same command resumes).
"""

from __future__ import annotations

import math
import os
import sys
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from experiments.cli import cli, interruptible
from experiments.config import RunConfig, load


def load_config(config: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """The schema's defaults, ``config`` (a YAML file), then ``overrides``; validated (no data, no model)."""
    return load(RunConfig, files=[config], overrides=list(overrides))


def read_data(cfg: RunConfig):
    """``(splits, warnings)``: the run's data read and validated (no model), and the ``DataWarning``
    messages it raised (printed, and recorded in the result)."""
    from doran.data import DataWarning, load_splits

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", DataWarning)
        splits = load_splits(cfg.data.kind, **cfg.data.loader_args())
    messages = []
    for w in caught:
        if issubclass(w.category, DataWarning):
            messages.append(str(w.message))
            print(f"warning: {w.message}", file=sys.stderr)
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return splits, messages


#: transformers 5.x renamed DINOv2's attention Linears (``attention.attention.query`` -> ``attention.q_proj``);
#: a run's identity uses the older names, so that one run has one id under either naming
DINOV2_TARGET_NAMES = {"q_proj": "query", "k_proj": "key", "v_proj": "value"}


def identity_config(config: dict[str, Any]) -> dict[str, Any]:
    """The config a run id is computed from: ``config`` with the DINOv2 target names the installed
    transformers gives (``q_proj``, ``v_proj``) written in their older form (``query``, ``value``).

    The default targets of the DINOv2 backbone are resolved to the names of the installed transformers,
    and they name the same Linears either way; without this, a sweep resumed under the other naming would
    find none of its finished runs. Bare names only (the defaults); other models are left as they are.

    >>> identity_config({"model": {"name": "dinov2-vits14"}, "adapter": {"targets": ["q_proj", "v_proj"]}})
    {'model': {'name': 'dinov2-vits14'}, 'adapter': {'targets': ['query', 'value']}}
    """
    from doran.training.backbones import DINOV2

    adapter = config.get("adapter") or {}
    targets = adapter.get("targets")
    if (config.get("model") or {}).get("name") != DINOV2 or not isinstance(targets, (list, tuple)):
        return config
    return {**config, "adapter": {**adapter, "targets": [DINOV2_TARGET_NAMES.get(t, t) for t in targets]}}


def run_id_of(cfg: RunConfig, fingerprint: str | None = None) -> str:
    """The run_id of ``cfg``: its config (:func:`identity_config`) and its data's fingerprint (read from the
    data if not given)."""
    from doran.results import make_run_id

    return make_run_id(identity_config(cfg.to_dict()), fingerprint or read_data(cfg)[0].fingerprint())


def protocol_epochs(epochs: int, min_steps: int, n_train: int, batch_size: int) -> int:
    """Epochs a run trains: at least ``epochs`` and at least ``min_steps`` optimizer steps.

    >>> protocol_epochs(3, 150, n_train=103, batch_size=32)   # 4 steps per epoch -> 38 epochs
    38
    >>> protocol_epochs(3, 150, n_train=10202, batch_size=32)
    3
    """
    steps_per_epoch = max(1, math.ceil(n_train / batch_size))
    return max(int(epochs), math.ceil(min_steps / steps_per_epoch)) if min_steps > 0 else int(epochs)


def train_subset(cfg: RunConfig, splits):
    """Indices of the run's training subset: ``cfg.fraction`` of the training split, stratified, nested
    across fractions, drawn by the seed, at least ``data.min_per_class`` per class (``doran.data``'s rule)."""
    from doran.data import stratified_subset

    return stratified_subset(splits.train.labels, cfg.fraction, cfg.seed, min_per_class=cfg.data.min_per_class)


def _eval_subset(split, limit: int | None, split_seed: int):
    from doran.data import stratified_subset

    if not limit or len(split) <= limit:
        return split
    return split.take(stratified_subset(split.labels, limit / len(split), split_seed))


def zero_rows(model, cfg: RunConfig, fraction: float, seed: int = 0) -> int:
    """Set ``fraction`` of the rows of every weight the run adapts to zero (each adapted slice alike, the rows
    drawn by a fixed generator, the same for every method): a hard initial condition for the stability study
    (a row of zero norm is where DoRA divides 0 by 0). Returns the number of rows zeroed."""
    import torch

    import doran
    from doran.targets import find_targets

    g = torch.Generator().manual_seed(seed)
    count = 0
    for target in find_targets(model, doran.AdapterConfig.preset(cfg.method, **cfg.adapter)):
        with torch.no_grad():
            for a, b in target.slices.values():
                k = max(1, round(fraction * (b - a)))
                rows = a + torch.randperm(b - a, generator=g)[:k]
                target.module.weight[rows] = 0
                count += k
    return count


def compiled_as(module, requested: str) -> str:
    """How the run's model ran: the compile mode, or ``none (compile failed: ...)`` where the compiler gave up
    on a call (the first, or a later one that needed a new graph) and the model ran eager from there on (``doran.fast.compiling.CompiledModel``)."""
    if not module._runner:
        return requested
    runner = module._runner[0]
    fallback = getattr(runner.model, "fallback", None)
    return f"none (compile failed: {fallback})" if fallback else runner.mode


def compile_mode(cfg: RunConfig, steps: int) -> str:
    """The run's compile mode: ``runtime.compile``, except that ``auto`` runs a run of fewer than
    ``runtime.compile_min_steps`` optimizer steps eager (its compilation would cost more than it saves)."""
    rt = cfg.runtime
    return "none" if rt.compile == "auto" and steps < rt.compile_min_steps else rt.compile


def build(cfg: RunConfig, num_classes: int, splits: tuple, compile: str | None = None
          ) -> tuple[Any, Any, dict[str, Any]]:
    """``(module, datamodule, model_info)``: the backbone with its adapters injected (an
    ``AdapterClassifier``) and the data module over the ``(train, val, test)`` splits."""
    from doran.data import ClassificationDataModule, ImageDataset, TextCollate, TextDataset, timm_transforms
    from doran.training import AdapterClassifier, build_backbone

    m, t = cfg.model, cfg.train
    backbone = {"kind": m.kind, "name": m.name, "pretrained": m.pretrained, "checkpoint": m.checkpoint,
                "allow_download": m.allow_download, "tokenizer": m.tokenizer, "kwargs": m.kwargs}
    model, tokenizer, model_info = build_backbone(num_classes=num_classes, **backbone)
    if m.zero_rows:
        model_info["zeroed_rows"] = zero_rows(model, cfg, m.zero_rows)
    if m.kind == "text":
        datasets = [TextDataset(s, tokenizer, m.max_length) for s in splits]
        collate = TextCollate(tokenizer.pad_token_id)
    elif splits[0].inputs and not isinstance(splits[0].inputs[0], str):  # images as arrays (the image suite)
        from doran.assets.dinov2 import IMAGE_MEAN, IMAGE_STD
        from doran.data.imagesuite import ArrayImageDataset

        size = model_info.get("image_size") or model.config.image_size
        datasets = [ArrayImageDataset(s, size, IMAGE_MEAN, IMAGE_STD, augment=m.augment and i == 0)
                    for i, s in enumerate(splits)]
        collate = None
    else:
        train_tf, eval_tf = timm_transforms(model, m.augment)
        datasets = [ImageDataset(splits[0], train_tf), ImageDataset(splits[1], eval_tf),
                    ImageDataset(splits[2], eval_tf)]
        collate = None
    datamodule = ClassificationDataModule(*datasets, batch_size=t.batch_size, eval_batch_size=t.eval_batch_size,
                                          seed=cfg.seed, num_workers=cfg.runtime.num_workers, collate_fn=collate)
    module = AdapterClassifier(
        backbone=backbone, method=cfg.method, adapter=cfg.adapter, num_classes=num_classes, head=m.head,
        trainable=m.trainable, lr=t.lr, weight_decay=t.weight_decay, warmup_ratio=t.warmup_ratio,
        warmup_steps=t.warmup_steps, min_lr_ratio=t.min_lr_ratio, label_smoothing=t.label_smoothing,
        seed=cfg.seed, compile=cfg.runtime.compile if compile is None else compile, model=model,
    )
    return module, datamodule, model_info


def run(
    cfg: RunConfig,
    callbacks: list | tuple = (),
    trainer_kwargs: dict[str, Any] | None = None,
    verbose: bool = True,
) -> dict[str, Any]:
    """Train and evaluate ``cfg`` (see ``load_config``); write and return the result.

    ``callbacks`` and ``trainer_kwargs`` are extra Lightning callbacks / Trainer arguments (tests).
    """
    import lightning.pytorch as pl
    import torch

    import doran
    from doran import results
    from doran.data import class_counts, subset_hash
    from doran.training import (
        ValidationSchedule,
        default_callbacks,
        derive_seed,
        resolve_precision,
        seed_everything,
    )

    t_start, c_start = time.perf_counter(), time.process_time()
    rt, d, t = cfg.runtime, cfg.data, cfg.train

    # 1. data: read and validate everything before any model is loaded; the run's identity includes it
    splits, data_warnings = read_data(cfg)
    data_sha256 = splits.fingerprint()
    run_id = run_id_of(cfg, data_sha256)
    out = Path(cfg.out)
    result_path, run_dir = results.result_path(out, run_id), out / run_id
    existing = results.find_result(out, run_id)
    if existing is not None and not rt.force:
        if verbose:
            print(f"[run] {existing} exists, skipping (runtime.force=true re-runs it)")
        return results.read_result(existing)
    if rt.threads:
        torch.set_num_threads(int(rt.threads))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    subset = train_subset(cfg, splits)
    train_split = splits.train.take(subset)
    val_split = _eval_subset(splits.val, d.eval_limit, d.split_seed)
    test_split = _eval_subset(splits.test, d.eval_limit, d.split_seed)
    epochs = protocol_epochs(t.epochs, t.min_steps, len(train_split), t.batch_size)
    steps = math.ceil(len(train_split) / t.batch_size) * epochs
    steps = steps if t.max_steps < 0 else min(steps, t.max_steps)

    # 2. model (pretrained weights, or a clear error)
    seed_everything(cfg.seed)
    mode = compile_mode(cfg, steps)
    if mode != "none":
        # a worker runs many models: their compiled graphs would accumulate until torch falls back to eager
        # (its recompile limit); each compiled run starts from a clean cache (the on-disk caches stay warm)
        torch._dynamo.reset()
    module, datamodule, model_info = build(cfg, splits.num_classes, (train_split, val_split, test_split),
                                           compile=mode)

    # 3. train (resuming from the run's last checkpoint if an earlier attempt was interrupted)
    diag = cfg.diagnostics
    cbs = default_callbacks(run_dir, diag.every_n_steps, diag.max_grad_records, rt.ckpt_every_n_steps,
                            rt.ckpt_min_interval_s, diag.max_points)
    cbs["validation"] = ValidationSchedule(epochs, t.max_validations)
    progress = sys.stderr.isatty() if rt.progress_bar == "auto" else rt.progress_bar in (True, "true", "on")
    precision = resolve_precision(t.precision)
    trainer = pl.Trainer(
        **{
            "max_epochs": epochs,
            "max_steps": t.max_steps,
            "precision": precision,
            "accelerator": "auto",
            "devices": 1,
            "gradient_clip_val": t.grad_clip,
            "logger": False,
            "enable_checkpointing": False,
            "enable_progress_bar": progress,
            "enable_model_summary": progress,
            "num_sanity_val_steps": 0,
            "deterministic": rt.deterministic or None,  # Lightning's default (None) leaves torch's settings
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
    seed_everything(derive_seed(cfg.seed, "train"))  # the dropout stream (a resume restores its own)
    if verbose:
        print(
            f"[run] {run_id}: {cfg.method} on {len(train_split)} training examples "
            f"({cfg.fraction:g} of {len(splits.train)}), {epochs} epochs, {precision}, device "
            f"{'cuda' if torch.cuda.is_available() else 'cpu'}"
        )
        doran.print_trainable_parameters(module.model)
    t_fit = time.perf_counter()
    with interruptible(trainer, ckpt):
        trainer.fit(module, datamodule=datamodule, ckpt_path=str(ckpt) if ckpt.is_file() else None)
    fit_s = time.perf_counter() - t_fit
    failure = cbs["guard"].failure

    # 4. test the last weights (no checkpoint selection), save the adapter, write the result
    metrics: dict[str, Any] = {}
    history = cbs["history"]
    if history.epochs["val_acc"]:
        metrics["val/acc"], metrics["val/loss"] = history.epochs["val_acc"][-1], history.epochs["val_loss"][-1]
        metrics["train/loss"] = history.epochs["train_loss"][-1]
    artifacts = {}
    if failure is None:
        tested = trainer.test(module, datamodule=datamodule, verbose=False)[0]
        metrics["test/acc"], metrics["test/loss"] = float(tested["test/acc"]), float(tested["test/loss"])
        artifacts["adapter"] = str(doran.save_adapter(module.model, run_dir / "adapter.safetensors"))
    test_counts = class_counts(test_split.labels, splits.num_classes)
    metrics["test/majority_acc"] = max(test_counts) / max(1, len(test_split))
    result = {
        "schema_version": results.SCHEMA_VERSION,
        "run_id": run_id,
        "status": "failed" if failure else "completed",
        "failure": failure,
        "method": cfg.method,
        "seed": cfg.seed,
        "fraction": cfg.fraction,
        "config": cfg.to_dict(),
        "adapter_config": module.adapter_config.to_dict(),
        "metrics": metrics,
        "curves": {"epochs": history.epochs, "steps": history.steps},
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
                "fraction": cfg.fraction,
                "size": len(subset),
                "sha256": subset_hash(subset),
                "per_class": class_counts(train_split.labels, splits.num_classes),
            },
        },
        "epochs": epochs,
        "steps": int(trainer.global_step),
        "resumed_from_step": resumed_from,
        "wall_time_s": time.perf_counter() - t_start,
        "cpu_time_s": time.process_time() - c_start,
        "fit_wall_s": fit_s,
        "epoch_train_wall_s": history.epochs["train_wall_s"],
        "epoch_train_cpu_s": history.epochs["train_cpu_s"],
        "peak_memory": results.peak_memory(),
        "device": {**results.device_info(), "precision": precision,
                   "compile": compiled_as(module, rt.compile), "deterministic": rt.deterministic},
        "env": results.environment(),
        "artifacts": artifacts,
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    results.write_result(result, result_path, run_dir, rt.keep_checkpoints)
    if verbose:
        acc = metrics.get("test/acc")
        print(
            f"[run] {result['status']}: {run_id} test/acc={acc if acc is None else round(acc, 4)} "
            f"(majority {metrics['test/majority_acc']:.4f}) in {result['wall_time_s']:.0f}s -> {result_path}"
        )
        if failure:
            print(f"[run] failure at step {failure['step']}: {failure['cause']}")
    return result


def main(argv: list[str] | None = None) -> int:
    from doran.assets import AssetError
    from doran.data import DataError
    from doran.training import WeightsError

    return cli(argv, "python -m experiments.run", __doc__, load_config, run, run_id_of,
               (DataError, WeightsError, AssetError))


if __name__ == "__main__":
    sys.exit(main())
