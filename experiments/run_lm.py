"""One causal-LM run: fine-tune on commonsense data, evaluate by generation, write one result file.

    python -m experiments.run_lm --config experiments/configs/lm_smoke.yaml         # seconds, CPU
    python -m experiments.run_lm --config experiments/configs/smollm2.yaml method=dora
    python -m experiments.run_lm --config experiments/configs/llama.yaml model.name=/models/llama-7b \
        data.train_paths=[/data/commonsense_170k.json] data.test_paths=[/data/boolq/test.json] \
        train.devices=2 train.strategy=ddp

Config (``experiments.config.LMRunConfig``): the schema's defaults, then ``--config FILE``, then ``key=value``
overrides (as ``experiments.run``). Every path and every training and test record (fields, gold answers) is
checked before a model is loaded. Multi-GPU: ``train.devices`` and ``train.strategy`` (``ddp``; ``fsdp`` for
models that do not fit one GPU); the adapter is gathered into one file (``<out>/<run_id>/adapter.safetensors``)
that loads on any number of devices, and evaluation runs on global rank 0. Exit status: 0 completed, 3 failed
(NaN/inf loss, recorded), 2 bad input, 143 / 130 stopped by SIGTERM / Ctrl-C (the same command resumes).
"""

from __future__ import annotations

import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from experiments.cli import cli, interruptible
from experiments.run import compiled_as
from experiments.config import LMRunConfig, load


def load_config(config: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> LMRunConfig:
    """The schema's defaults, ``config`` (a YAML file), then ``overrides``; validated (no data, no model)."""
    return load(LMRunConfig, files=[config], overrides=list(overrides))


def _strategy(name: str, devices: int):
    """Lightning strategy object for ``train.strategy``."""
    if name != "fsdp":
        return "auto" if name == "auto" and devices == 1 else ("ddp" if name == "auto" else name)
    from lightning.pytorch.strategies import FSDPStrategy
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    # Decoder layers are the FSDP units; use_orig_params keeps frozen and trainable tensors in one unit and
    # the original parameter names (which the adapter file needs).
    return FSDPStrategy(
        auto_wrap_policy={LlamaDecoderLayer},
        use_orig_params=True,
        sharding_strategy="FULL_SHARD",
        state_dict_type="full",
    )


def run(cfg: LMRunConfig, verbose: bool = True) -> dict[str, Any]:
    """Train and evaluate ``cfg`` (see ``load_config``); write the result on global rank 0 and return it."""
    import lightning.pytorch as pl
    import torch

    import doran
    from doran import results
    from doran.training import (
        CausalLMModule,
        CommonsenseData,
        StepLossRecorder,
        default_callbacks,
        derive_seed,
        evaluate_tasks,
        resolve_precision,
        save_trained_adapter,
        seed_everything,
    )

    t_start = time.perf_counter()
    rt, m, d, t, ev = cfg.runtime, cfg.model, cfg.data, cfg.train, cfg.eval
    from doran.data import commonsense as cs

    # every training and test record is read and checked before any model loads
    record_counts = cs.validate_files(d.train_paths, d.test_paths)
    data_sha256 = data_identity(cfg)
    run_id = results.make_run_id(cfg.to_dict(), data_sha256)
    out = Path(cfg.out)
    result_path, run_dir = results.result_path(out, run_id), out / run_id
    existing = results.find_result(out, run_id)
    if existing is not None and not rt.force:
        if verbose:
            print(f"[run_lm] {existing} exists, skipping (runtime.force=true re-runs it)")
        return results.read_result(existing)
    if rt.threads:
        torch.set_num_threads(int(rt.threads))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    seed_everything(cfg.seed)
    module = CausalLMModule(
        lm={k: getattr(m, k) for k in ("name", "gguf_file", "tokenizer", "dtype", "kwargs")},
        method=cfg.method,
        adapter=cfg.adapter,
        lr=t.lr,
        weight_decay=t.weight_decay,
        warmup_steps=t.warmup_steps,
        gradient_checkpointing=t.gradient_checkpointing,
        seed=cfg.seed,
        compile=rt.compile,
    )
    data = CommonsenseData(
        module.tokenizer,
        train_paths=d.train_paths,
        val_size=d.val_size,
        cutoff=d.cutoff,
        batch_size=t.batch_size,
        eval_batch_size=ev.batch_size,
        fraction=cfg.fraction,
        seed=cfg.seed,
        synthetic=d.synthetic,
        num_workers=d.num_workers,
    )

    diag = cfg.diagnostics
    cbs = default_callbacks(run_dir, diag.every_n_steps, diag.max_grad_records, rt.ckpt_every_n_steps,
                            rt.ckpt_min_interval_s, diag.max_points)
    cbs.pop("history")  # classification curves; the LM records step losses below
    if t.strategy == "fsdp":
        from doran.training import MagnitudeRecorder, TauRecorder, fsdp_safe

        cbs["tau"] = fsdp_safe(TauRecorder)(diag.every_n_steps, diag.max_points)
        cbs["magnitude"] = fsdp_safe(MagnitudeRecorder)(diag.every_n_steps, diag.max_points)
        cbs.pop("grad_norm")  # gradients are sharded; per-group norms would need a reduction across ranks
    steps = StepLossRecorder()
    progress = sys.stderr.isatty() if rt.progress_bar == "auto" else rt.progress_bar in (True, "true", "on")
    precision = resolve_precision(t.precision)
    trainer = pl.Trainer(
        max_epochs=t.epochs,
        max_steps=t.max_steps,
        precision=precision,
        accelerator=t.accelerator,
        devices=t.devices,
        strategy=_strategy(t.strategy, t.devices),
        accumulate_grad_batches=t.accumulate,
        gradient_clip_val=t.grad_clip,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=progress,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        val_check_interval=t.val_every_n_steps,
        use_distributed_sampler=False,  # CommonsenseData shards the seeded order itself (SeededSampler)
        callbacks=[steps, *[c for k, c in cbs.items() if k != "checkpoint"], cbs["checkpoint"]],
    )
    ckpt = cbs["checkpoint"].last
    seed_everything(derive_seed(cfg.seed, "train"))
    if verbose and trainer.is_global_zero:
        print(
            f"[run_lm] {run_id}: {cfg.method} on {m.name}, {precision}, {t.devices} device(s), "
            f"strategy {t.strategy}"
        )
        doran.print_trainable_parameters(module.model)
    t_fit = time.perf_counter()
    if t.max_steps != 0:  # train.max_steps=0 evaluates the base model: every preset is the identity at step 0
        with interruptible(trainer, ckpt):
            trainer.fit(module, datamodule=data, ckpt_path=str(ckpt) if ckpt.is_file() else None)
    else:
        data.setup("fit")
    fit_s = time.perf_counter() - t_fit
    failure = cbs["guard"].failure

    artifacts: dict[str, str] = {}
    if failure is None:
        path = save_trained_adapter(trainer, module, run_dir / "adapter.safetensors")
        if path is not None:
            artifacts["adapter"] = str(path)
        if rt.save_rank_adapters:
            doran.save_adapter(module.model, run_dir / f"adapter.rank{trainer.global_rank}.safetensors")
    if not trainer.is_global_zero:
        return {}

    metrics: dict[str, Any] = {"train/loss": steps.columns["loss"][-1] if steps.columns.get("loss") else None}
    val = trainer.callback_metrics.get("val/loss")
    metrics["val/loss"] = None if val is None else float(val)
    evaluation = None
    if failure is None and d.test_paths and ev.limit != 0:
        model = module.model
        if t.strategy == "fsdp":  # evaluate a plain copy holding the gathered adapter
            from doran.training import build_causal_lm

            model, _ = build_causal_lm(
                **{k: getattr(m, k) for k in ("name", "gguf_file", "tokenizer", "dtype", "kwargs")}
            )
            doran.load_adapter(model, artifacts["adapter"])
            model.to(module.device)
        evaluation = evaluate_tasks(
            model,
            module.tokenizer,
            d.test_paths,
            batch_size=ev.batch_size,
            max_new_tokens=ev.max_new_tokens,
            num_beams=ev.num_beams,
            limit=ev.limit,
            progress=progress,
        )
        metrics["test/acc"] = evaluation["average"]
        metrics.update({f"test/acc/{task}": v["accuracy"] for task, v in evaluation["tasks"].items()})
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
        "evaluation": evaluation,
        "curves": {"steps": steps.columns},
        "tau": cbs["tau"].columns,
        "magnitude": cbs["magnitude"].columns,
        "grad_norm": cbs["grad_norm"].columns if "grad_norm" in cbs else None,
        "params": doran.trainable_parameter_counts(module.model),
        "data": {
            "train_paths": d.train_paths,
            "test_paths": d.test_paths,
            "synthetic": d.synthetic,
            "sha256": data_sha256,
            "records": record_counts,
            "sizes": {"train": len(data.train_set), "val": len(data.val_set)},
        },
        "throughput": steps.throughput(),
        "steps": int(trainer.global_step),
        "world_size": trainer.world_size,
        "wall_time_s": time.perf_counter() - t_start,
        "fit_wall_s": fit_s,
        "peak_memory": results.peak_memory(),
        "device": {
            **results.device_info(),
            "precision": precision,
            "devices": t.devices,
            "strategy": t.strategy,
            "compile": compiled_as(module, rt.compile),
        },
        "env": results.environment(),
        "artifacts": artifacts,
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    results.write_result(result, result_path, run_dir, rt.keep_checkpoints)
    if verbose:
        acc = metrics.get("test/acc")
        print(
            f"[run_lm] {result['status']}: {run_id} train/loss={metrics['train/loss']} "
            f"test/acc={acc if acc is None else round(acc, 4)} in {result['wall_time_s']:.0f}s -> {result_path}"
        )
    return result


def main(argv: list[str] | None = None) -> int:
    from doran.data.commonsense import CommonsenseDataError
    from doran.training import ModelFilesError

    return cli(argv, "python -m experiments.run_lm", __doc__, load_config, run, run_id_of,
               (CommonsenseDataError, ModelFilesError))


def data_identity(cfg: LMRunConfig) -> str:
    """sha256 of the run's data: the bytes of its training and test files (the synthetic task is config)."""
    from doran.results import files_sha256

    return files_sha256([*cfg.data.train_paths, *cfg.data.test_paths])


def run_id_of(cfg: LMRunConfig) -> str:
    """The run_id of the resolved config: its config and the content of its data files (checked first)."""
    from doran.data import commonsense as cs
    from doran.results import make_run_id

    cs.validate_files(cfg.data.train_paths, cfg.data.test_paths)
    return make_run_id(cfg.to_dict(), data_identity(cfg))


if __name__ == "__main__":
    sys.exit(main())
