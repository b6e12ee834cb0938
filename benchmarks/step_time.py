"""Adapter-only training step: wall time, GPU-busy time and peak memory per variant, as ratios to our LoRA.

    python -m benchmarks.step_time --workload vit llama --out benchmarks/results/gpu.json     # on a GPU
    python -m benchmarks.step_time --workload minilm --threads 2 --out benchmarks/results/cpu.json

Workloads (base frozen; forward, backward and AdamW step on the adapter; bf16 autocast on GPU):
  vit     timm ViT-B/16, random init, batch 64, 224 px, q/v slices of the fused qkv, r=8
  llama   a LLaMA-shaped model (hidden 4096, intermediate 11008, 32 heads, 4 layers, random init),
          batch 4 x 512 tokens, q_proj/v_proj, r=16
  minilm  the embedded all-MiniLM-L6-v2 (CPU default), batch 32 x 64 tokens, query/value, r=8
  host    ViT-B/16's structure at toy width, batch 1: per-op host cost only (CPU proxy of the eager GPU step)
  (c)     --layer-sweep: one square bf16 Linear, widths 768..8192, ranks 8..256, tokens per step; GPU-busy
          time of LoRA, DoRAN with g applied to the weight / to the output, DoRAN's reference path, PEFT DoRA

Variants run in one process: no adapter, our presets (lora, dora, doran, ...), PEFT's LoRA and PEFT's DoRA.
A suffix picks our execution mode: ``doran`` is the default fused path (doran/fused.py), ``doran@reference``
plain autograd, ``doran@nobank`` the fused path without the adapter bank (doran/bank.py), ``doran@weight``
/ ``doran@output`` force how g is applied, ``doran@compile`` wraps the model in torch.compile and
``doran@compile-ro`` with mode="reduce-overhead" (CUDA graphs; both through ``doran.compile_model``, as the
Lightning modules compile); ratios are to our LoRA in the same mode. Like the Lightning modules, the bank's
modes (no suffix, ``weight``, ``output``, ``compile``, ``compile-ro``) run with the adapter tensors packed
(``doran.pack``); ``doran@unpacked`` / ``doran@compile-ro-unpacked`` run the same without packing. With ``--inference`` the base model and
every merged variant are also timed forward-only (merged inference should cost what the base costs). Before timing, every variant's output at step 0 is checked against the
un-adapted model (all presets start as the identity) and our DoRA-family layer against a materialised
float64 reference. Reported: median wall step time over ``--steps`` steps after ``--warmup`` (with min and
max), GPU-busy time per step (sum of CUDA kernel time from torch.profiler), peak allocated memory, and each
as a ratio to our LoRA. With ``--rounds R`` every variant's model stays alive and, after the run, all of them
are timed again in R interleaved rounds (``interleaved_rounds``): a GPU's clock drifts over a long run, and
those ratios compare variants measured under the same conditions. Benchmarks, not tests: nothing here
asserts a time.
"""

from __future__ import annotations

import argparse
import copy
import gc
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from collections.abc import Callable

import torch
from torch import nn

import doran

OURS = ("lora", "dora", "doran", "lora@reference", "dora@reference", "doran@reference")
PEFT = ("peft-lora", "peft-dora")


# ------------------------------------------------------------------------------------------------ workloads
def vit_workload(device: str) -> dict[str, Any]:
    import timm

    torch.manual_seed(0)
    model = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=100)
    x = torch.randn(64, 3, 224, 224, device=device)
    y = torch.randint(0, 100, (64,), device=device)
    return {"model": model, "targets": ("qkv",), "r": 8, "head": ("head",), "peft_targets": None,
            "step": lambda m: nn.functional.cross_entropy(m(x), y), "out": lambda m: m(x)}


def llama_workload(device: str, layers: int = 4) -> dict[str, Any]:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers,
                      num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=1024)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16 if device == "cuda" else torch.float32)
    ids = torch.randint(0, 32000, (4, 512), device=device)
    return {"model": model, "targets": ("q_proj", "v_proj"), "r": 16, "head": (), "peft_targets": ["q_proj", "v_proj"],
            "step": lambda m: m(input_ids=ids, labels=ids).loss, "out": lambda m: m(input_ids=ids).logits}


def minilm_workload(device: str) -> dict[str, Any]:
    from transformers import AutoModelForSequenceClassification
    from transformers import logging as hf_logging

    from doran.assets import minilm_path

    hf_logging.set_verbosity_error()
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2)
    ids = torch.randint(1000, 30000, (32, 64), device=device)
    y = torch.randint(0, 2, (32,), device=device)
    return {"model": model, "targets": ("query", "value"), "r": 8, "head": ("classifier",),
            "peft_targets": ["query", "value"],
            "step": lambda m: nn.functional.cross_entropy(m(input_ids=ids).logits, y),
            "out": lambda m: m(input_ids=ids).logits}


def host_workload(device: str) -> dict[str, Any]:
    """ViT-B/16's 12 blocks and qkv slices at toy width (48, 3 heads, 4 patches, batch 1): the step is all
    per-op host cost, a CPU proxy for the host-bound eager GPU step (run with --threads 1)."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=10, depth=12, embed_dim=48,
                              num_heads=3, img_size=32)
    x = torch.randn(1, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (1,), device=device)
    return {"model": model, "targets": ("qkv",), "r": 8, "head": ("head",), "peft_targets": None,
            "step": lambda m: nn.functional.cross_entropy(m(x), y), "out": lambda m: m(x), "foreach": True}


WORKLOADS: dict[str, Callable[[str], dict[str, Any]]] = {"vit": vit_workload, "llama": llama_workload,
                                                        "minilm": minilm_workload, "host": host_workload}


# ------------------------------------------------------------------------------------------------ variants
EXEC_MODES = ("fused", "nobank", "reference", "weight", "output", "compile", "compile-ro", "compile-ref",
              "compile-ro-ref", "compile-nobank", "compile-ro-nobank", "unpacked", "compile-unpacked",
              "compile-ro-unpacked")
# modes in which the adapter tensors are packed (doran.pack), as the Lightning modules run: the bank's modes
PACKED_MODES = ("fused", "weight", "output", "compile", "compile-ro")


def split_variant(variant: str) -> tuple[str, str]:
    """``"doran@reference"`` -> ("doran", "reference"); no suffix is our default, the fused path."""
    name, _, mode = variant.partition("@")
    mode = mode or "fused"
    if mode not in EXEC_MODES:
        raise SystemExit(f"unknown execution mode {mode!r} in {variant!r}; choose one of {EXEC_MODES}")
    return name, mode


def execution_for(variant: str):
    """The doran execution settings a variant runs under (a context manager)."""
    from doran.settings import execution

    _, mode = split_variant(variant)
    if mode == "reference":
        return execution(path="reference")
    if mode == "nobank":
        return execution(path="fused", scale="auto", bank=False)
    if mode in ("weight", "output"):
        return execution(path="fused", scale=mode)
    if mode.endswith("-ref"):  # compiled, tracing the plain-autograd path
        return execution(path="fused", scale="auto", bank=True, compiled="reference")
    if mode.endswith("-nobank"):  # compiled, each slice its own factors and norm
        return execution(path="fused", scale="auto", bank=True, compiled="fused", compiled_bank=False)
    return execution(path="fused", scale="auto", bank=True, compiled="fused", compiled_bank=True)


def build_variant(work: dict[str, Any], variant: str, device: str) -> nn.Module:
    variant, mode = split_variant(variant)
    model = copy.deepcopy(work["model"])
    if variant == "base":
        for p in model.parameters():
            p.requires_grad_(False)
        for name in work["head"]:
            for p in model.get_submodule(name).parameters():
                p.requires_grad_(True)
    elif variant in PEFT:
        from peft import LoraConfig, get_peft_model

        targets = work["peft_targets"]
        if targets is None:  # PEFT cannot slice a fused qkv: it adapts the whole qkv (q, k and v rows)
            targets = ["qkv"]
        cfg = LoraConfig(r=work["r"], lora_alpha=2 * work["r"], lora_dropout=0.0, target_modules=targets,
                         use_dora=variant == "peft-dora", modules_to_save=list(work["head"]) or None)
        model = get_peft_model(model, cfg)
    else:
        cfg = doran.AdapterConfig.preset(variant, r=work["r"], alpha=2 * work["r"], targets=work["targets"])
        doran.inject(model, cfg, trainable=work["head"])
        if mode in PACKED_MODES:
            doran.pack(model)
    model = model.to(device)
    if mode.startswith("compile"):  # as the Lightning modules compile: hooks and forward in one graph
        model = doran.compile_model(model, "reduce-overhead" if mode.startswith("compile-ro") else "default")
    return model


def check_identity(work: dict[str, Any], model: nn.Module, reference: torch.Tensor, device: str) -> float:
    """Relative difference of the step-0 output to the un-adapted model's (every variant starts there)."""
    with torch.no_grad(), autocast(device):
        out = work["out"](model).float()
    return ((out - reference).norm() / reference.norm()).item()


def check_layer_against_reference(model: nn.Module) -> float | None:
    """Perturb one adapted layer of a copy and compare it with a materialised float64 W'."""
    layers = list(doran.adapted_modules(model))
    if not layers:
        return None
    _, layer = layers[0]
    layer = copy.deepcopy(layer).float()
    with torch.no_grad():
        for ad in layer.doran.values():  # packed tensors (doran.pack) as their views
            for p in doran.packing.adapter_tensors(ad):
                p.add_(0.05 * torch.randn_like(p) * (p.abs().mean() + 0.01))
    x = torch.randn(8, layer.in_features, device=layer.weight.device)
    with torch.no_grad():
        got = layer(x).double()
        W = layer.weight.double().clone()
        for ad in layer.doran.values():
            A, B = (t.double() for t in ad.factors())
            V = W[ad.rows] + ad.s * B @ A
            if ad.cfg.magnitude:
                _, scale = ad._weight_stats(layer.weight)
                tau = ad.tau_absolute(scale).double()
                V = (ad.magnitude.double() / (torch.linalg.vector_norm(V, dim=1) + tau))[:, None] * V
            W[ad.rows] = V
        ref = x.double() @ W.t() + (0 if layer.bias is None else layer.bias.double())
    return ((got - ref).norm() / ref.norm()).item()


def autocast(device: str):
    if device == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def time_variant(work: dict[str, Any], model: nn.Module, device: str, steps: int, warmup: int,
                 profile_steps: int = 5, keep: dict[str, Any] | None = None) -> dict[str, Any]:
    params = [p for p in model.parameters() if p.requires_grad]
    # auto: as the Lightning modules step (doran.fast.optim.adamw: doran.fast.optim.FusedAdamW on a GPU); else
    # PyTorch's AdamW, fused or foreach (the multi-tensor one CUDA uses by default; the host proxy's default)
    adam = work.get("adam", "auto")
    if not params:
        opt = None
    elif adam == "auto" and device == "cuda":
        from doran.fast.optim import adamw

        opt = adamw([{"params": params}], lr=1e-4, weight_decay=1e-2)
    else:
        kind = {"fused": True} if adam == "fused" else {"foreach": True if adam == "foreach" else work.get("foreach")}
        opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-2, **kind)

    def step() -> None:
        if opt is None:  # nothing trainable (the base LLaMA): forward only
            with torch.no_grad(), autocast(device):
                work["step"](model)
            return
        with autocast(device):
            loss = work["step"](model)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    model.train()
    grad_norm = None
    gc.collect()  # what earlier variants left (reference cycles) must not count in this one's peak
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()  # from the first step: compiling and graph recording count too
    mem_before = torch.cuda.memory_allocated() / 2**20 if device == "cuda" else None
    if opt is not None:  # the adapter gradient of the first step: equal across execution modes of one method
        with autocast(device):
            loss = work["step"](model)
        loss.backward()
        grads = [p.grad.float().norm() for p in params if p.grad is not None]
        grad_norm = torch.stack(grads).norm().item() if grads else 0.0
        opt.zero_grad(set_to_none=True)
    for _ in range(warmup):
        step()
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    phases = time_phases(work, model, opt, device, steps) if work.get("phases") and opt is not None else None
    hosts = host_profile(work, model, opt, device) if work.get("cprofile") and opt is not None else None
    syncs = sync_points(step) if device == "cuda" else None
    op_counts = count_ops(work, model) if work.get("ops") and opt is not None else None
    result = {"step_ms_median": 1e3 * statistics.median(times), "step_ms_min": 1e3 * min(times),
              "step_ms_max": 1e3 * max(times), "steps": steps,
              "peak_mem_mib": torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None,
              "mem_before_first_step_mib": mem_before,
              "trainable": sum(p.numel() for p in params), "trainable_tensors": len(params),
              "first_grad_norm": grad_norm}
    if phases:
        result["phase_ms_median"] = phases
    if hosts:
        result["host_profile"] = hosts
    if syncs is not None:
        result["sync_points"] = syncs
    if op_counts is not None:
        result["ops_per_step"] = op_counts
    if device == "cuda":
        result.update(profile_kernels(step, profile_steps, work.get("all_kernels")))
    if keep is not None:  # for the interleaved rounds (``interleaved_rounds``)
        keep["step"] = step
    return result


def profile_kernels(step: Callable[[], None], steps: int, all_kernels: bool = False) -> dict[str, Any]:
    """GPU-busy time per step (CUDA kernel time, copies left out), kernels per step and the top kernels, from
    torch.profiler over ``steps`` calls of ``step``."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
    kernel_us = sum(e.device_time_total for e in events if e.device_time_total > 0 and not e.key.startswith("Memcpy"))
    top = sorted((e for e in events if e.device_time_total > 0),
                 key=lambda e: -e.device_time_total)[: None if all_kernels else 12]
    return {"top_kernels": [{"name": e.key[:160], "ms_per_step": e.device_time_total / 1e3 / steps,
                             "calls_per_step": e.count / steps} for e in top],
            "gpu_busy_ms": kernel_us / 1e3 / steps,
            "kernels_per_step": sum(e.count for e in events) / steps}


def interleaved_rounds(kept: dict[str, Callable[[], None]], device: str, rounds: int,
                       steps: int = 5) -> dict[str, dict[str, Any]]:
    """Every variant's step again, in ``rounds`` rounds that visit the variants in turn (the order reversed
    every other round): per round and variant, ``steps`` wall-timed steps and one profiled step. A GPU's
    clock drifts with its temperature and power over minutes, so variants measured one after another in a
    long run are not timed under the same conditions (on one H200, the same bf16 GEMMs of the LLaMA-shaped
    model took 2-4 % longer in the variants timed after LoRA); interleaved, each variant sees every phase.
    Reported per variant: the median wall step over all rounds, the mean GPU-busy time and its spread."""
    names = list(kept)
    walls: dict[str, list[float]] = {n: [] for n in names}
    busy: dict[str, list[float]] = {n: [] for n in names}
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            step = kept[name]
            with execution_for(name):
                step()  # the first call after another variant's: not timed
                sync()
                for _ in range(steps):
                    t0 = time.perf_counter()
                    step()
                    sync()
                    walls[name].append(1e3 * (time.perf_counter() - t0))
                if device == "cuda":
                    busy[name].append(profile_kernels(step, 1)["gpu_busy_ms"])
    out = {}
    for name in names:
        row: dict[str, Any] = {"rounds": rounds, "steps_per_round": steps,
                               "step_ms_median": statistics.median(walls[name]),
                               "step_ms_min": min(walls[name]), "step_ms_max": max(walls[name])}
        if busy[name]:
            row.update(gpu_busy_ms=statistics.fmean(busy[name]), gpu_busy_ms_min=min(busy[name]),
                       gpu_busy_ms_max=max(busy[name]))
        out[name] = row
    return out


def time_phases(work: dict[str, Any], model: nn.Module, opt, device: str, steps: int) -> dict[str, float]:
    """Median wall ms of each part of a step, synchronised between parts (so they add up to more than a step):
    forward, backward, optimizer step, zero_grad. Says where a step's time outside the GPU's goes."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    parts: dict[str, list[float]] = {"forward": [], "backward": [], "optimizer": [], "zero_grad": []}
    for _ in range(steps):
        sync()
        t0 = time.perf_counter()
        with autocast(device):
            loss = work["step"](model)
        sync()
        t1 = time.perf_counter()
        loss.backward()
        sync()
        t2 = time.perf_counter()
        opt.step()
        sync()
        t3 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        sync()
        t4 = time.perf_counter()
        for key, dt in zip(parts, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            parts[key].append(dt)
    result = {key: 1e3 * statistics.median(v) for key, v in parts.items()}
    if device == "cuda" and not getattr(opt, "defaults", {}).get("fused"):  # the same step with fused AdamW
        fused_opt = type(opt)(opt.param_groups[0]["params"], lr=opt.defaults["lr"], fused=True)
        times = []
        for _ in range(steps):
            with autocast(device):
                loss = work["step"](model)
            loss.backward()
            sync()
            t0 = time.perf_counter()
            fused_opt.step()
            sync()
            times.append(time.perf_counter() - t0)
            fused_opt.zero_grad(set_to_none=True)
        result["optimizer_fused"] = 1e3 * statistics.median(times)
    return result


# ops that only make a view or alias: no kernel, a little host time
_VIEW_OPS = {"view", "_unsafe_view", "_reshape_alias", "reshape", "t", "transpose", "permute", "slice", "select",
             "unbind", "split", "split_with_sizes", "expand", "as_strided", "unsqueeze", "squeeze", "alias",
             "detach", "unfold"}


def count_ops(work: dict[str, Any], model: nn.Module) -> dict[str, Any]:
    """The aten ops one step's forward and backward dispatch below autograd (a TorchDispatchMode), split into
    compute ops (each a kernel on a GPU) and view ops: on a host-bound eager GPU step the count of compute
    ops is what the host pays for, whatever device the count was taken on."""
    from collections import Counter

    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.counts: Counter = Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.counts[func.overloadpacket.__name__] += 1
            return func(*args, **(kwargs or {}))

    device = next(model.parameters()).device.type
    forward, backward = Count(), Count()
    with forward, autocast(device):
        loss = work["step"](model)
    with backward:
        loss.backward()
    for p in model.parameters():
        p.grad = None
    result: dict[str, Any] = {}
    for phase, mode in (("forward", forward), ("backward", backward)):
        compute = {k: v for k, v in mode.counts.items() if k not in _VIEW_OPS}
        result[phase] = {"compute": sum(compute.values()), "views": sum(mode.counts.values()) - sum(compute.values()),
                         "compute_by_op": dict(sorted(compute.items(), key=lambda kv: -kv[1]))}
    return result


def sync_points(step: Callable[[], None]) -> list[dict[str, Any]]:
    """Where one step waits for the GPU (CUDA's sync debug mode): a synchronising op in the step makes an
    eager step's time the sum of its host and GPU times instead of the larger of the two."""
    import warnings

    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    counts: dict[str, int] = {}
    for w in caught:
        if "synchroniz" in str(w.message):
            where = f"{Path(w.filename).name}:{w.lineno}"
            counts[where] = counts.get(where, 0) + 1
    return [{"where": k, "count": v} for k, v in sorted(counts.items(), key=lambda kv: -kv[1])]


def host_profile(work: dict[str, Any], model: nn.Module, opt, device: str, steps: int = 10) -> list[dict[str, Any]]:
    """The Python functions that take the host's time in a step (cProfile over ``steps`` steps, top 40 by
    own time): where a step's time beyond its kernels goes."""
    import cProfile
    import pstats

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(steps):
        with autocast(device):
            loss = work["step"](model)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    sync()
    prof.disable()
    stats = pstats.Stats(prof).stats
    rows = sorted(stats.items(), key=lambda kv: -kv[1][2])[:40]
    return [{"function": f"{Path(f).name}:{line}({name})", "calls_per_step": nc / steps,
             "own_ms_per_step": 1e3 * tt / steps, "cum_ms_per_step": 1e3 * ct / steps}
            for (f, line, name), (_, nc, tt, ct, _) in rows]


def time_inference(work: dict[str, Any], model: nn.Module, device: str, steps: int, warmup: int) -> float:
    """Median forward-only (no grad) time in ms."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    model.eval()
    times = []
    with torch.no_grad(), autocast(device):
        for i in range(warmup + steps):
            sync()
            t0 = time.perf_counter()
            work["out"](model)
            sync()
            if i >= warmup:
                times.append(time.perf_counter() - t0)
    model.train()
    return 1e3 * statistics.median(times)


INFER_STEPS = 50


def run_workload(name: str, variants: list[str], device: str, steps: int, warmup: int,
                 inference: bool = False, on_row: Callable[[dict[str, Any]], None] | None = None,
                 adam: str = "auto", phases: bool = False, all_kernels: bool = False,
                 cprofile: bool = False, ops: bool = False, rounds: int = 0) -> dict[str, Any]:
    work = WORKLOADS[name](device)
    work.update(adam=adam, phases=phases, all_kernels=all_kernels, cprofile=cprofile, ops=ops)
    work["model"] = work["model"].to(device)
    with torch.no_grad(), autocast(device):
        reference = work["out"](work["model"]).float()
    rows = {}
    kept: dict[str, Callable[[], None]] = {}
    floor = torch.cuda.memory_allocated() if device == "cuda" else 0
    for variant in variants:
        held = (torch.cuda.memory_allocated() - floor) / 2**20 if device == "cuda" else 0.0  # kept variants'
        model = build_variant(work, variant, device)
        with execution_for(variant):
            row: dict[str, Any] = {"identity_rel_err": check_identity(work, model, reference, device)}
            if split_variant(variant)[0] in doran.PRESETS:
                row["layer_vs_float64_rel_err"] = check_layer_against_reference(model)
            keep: dict[str, Any] = {}
            row.update(time_variant(work, model, device, steps, warmup, keep=keep))
            if held and row.get("peak_mem_mib") is not None:  # the models kept for the rounds do not count
                row["peak_mem_mib"] -= held
                row["mem_before_first_step_mib"] -= held
                row["mem_kept_by_earlier_variants_mib"] = held
            if inference and variant == "base":
                row["infer_ms"] = time_inference(work, model, device, INFER_STEPS, warmup)
            elif inference and split_variant(variant) == (split_variant(variant)[0], "fused") and \
                    split_variant(variant)[0] in doran.PRESETS:
                doran.merge(model)
                row["merged_infer_ms"] = time_inference(work, model, device, INFER_STEPS, warmup)
                doran.unmerge(model)  # W0 restored bit for bit: the model the rounds time again
            if rounds and "step" in keep:  # the model stays alive for the interleaved rounds
                kept[variant] = keep["step"]
        rows[variant] = row
        if on_row is not None:  # a killed run keeps the variants it measured
            on_row(rows)
        print(f"  {name:6s} {variant:10s} {row['step_ms_median']:8.2f} ms  busy "
              f"{row.get('gpu_busy_ms', float('nan')):8.2f} ms  mem {row['peak_mem_mib'] or 0:8.0f} MiB  "
              f"identity {row['identity_rel_err']:.1e}  grad {row.get('first_grad_norm') or 0:.4e}", flush=True)
        del model
        if not rounds:
            torch._dynamo.reset()  # compiled graphs (and CUDA-graph pools) hold the model: free them
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    if kept:
        print(f"  {name:6s} {rounds} interleaved rounds of {len(kept)} variants", flush=True)
        for variant, inter in interleaved_rounds(kept, device, rounds).items():
            rows[variant]["interleaved"] = inter
        kept.clear()
        torch._dynamo.reset()
        gc.collect()
    for variant, row in rows.items():  # ratios to our LoRA in the same execution mode
        _, mode = split_variant(variant)
        same = mode.removesuffix("-ref").removesuffix("-nobank").removesuffix("-unpacked")
        lora = rows.get("lora" if mode in ("fused", "unpacked") else f"lora@{mode}") or \
            rows.get(f"lora@{same}") or rows.get("lora")
        if lora:
            for key in ("step_ms_median", "gpu_busy_ms", "peak_mem_mib"):
                if row.get(key) is not None and lora.get(key):
                    row[f"{key}_vs_lora"] = row[key] / lora[key]
            inter, inter_lora = row.get("interleaved"), lora.get("interleaved")
            if inter and inter_lora:
                for key in ("step_ms_median", "gpu_busy_ms"):
                    if inter.get(key) is not None and inter_lora.get(key):
                        inter[f"{key}_vs_lora"] = inter[key] / inter_lora[key]
        peft_dora = rows.get("peft-dora")
        if peft_dora:
            for key in ("step_ms_median", "gpu_busy_ms", "peak_mem_mib"):
                if row.get(key) is not None and peft_dora.get(key):
                    row[f"{key}_vs_peft_dora"] = row[key] / peft_dora[key]
            inter, inter_peft = row.get("interleaved"), peft_dora.get("interleaved")
            if inter and inter_peft:
                for key in ("step_ms_median", "gpu_busy_ms"):
                    if inter.get(key) is not None and inter_peft.get(key):
                        inter[f"{key}_vs_peft_dora"] = inter[key] / inter_peft[key]
        base = rows.get("base")
        if base and base.get("infer_ms") and row.get("merged_infer_ms"):
            row["merged_infer_vs_base"] = row["merged_infer_ms"] / base["infer_ms"]
    return rows


def gpu_busy_ms(fn: Callable[[], None], steps: int = 3) -> float:
    """Sum of CUDA kernel time per call of ``fn`` (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    us = sum(e.device_time_total for e in prof.key_averages() if e.device_type.name == "CUDA"
             and e.device_time_total > 0 and not e.key.startswith("Memcpy"))
    return us / 1e3 / steps


LAYER_VARIANTS = ("lora", "doran@weight", "doran@output", "doran@reference", "peft-dora")


def layer_sweep(device: str, widths: list[int], ranks: list[int], tokens: list[int]) -> list[dict[str, Any]]:
    """Workload (c): one square bf16 Linear, forward + backward (input gradient too) + AdamW, GPU-busy time."""
    from collections import OrderedDict

    rows = []
    for d in widths:
        for r in ranks:
            for n in tokens:
                torch.manual_seed(0)
                base = nn.Sequential(OrderedDict(proj=nn.Linear(d, d, bias=False))).to(device, torch.bfloat16)
                x = torch.randn(n, d, device=device, dtype=torch.bfloat16, requires_grad=True)
                gy = torch.randn(n, d, device=device, dtype=torch.bfloat16)
                row: dict[str, Any] = {"width": d, "rank": r, "tokens": n}
                for variant in LAYER_VARIANTS:
                    work = {"model": base, "targets": ("proj",), "r": r, "head": (), "peft_targets": ["proj"]}
                    model = build_variant(work, variant, device)
                    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

                    def step(model=model, opt=opt, x=x, gy=gy) -> None:
                        with autocast(device):
                            out = model(x)
                        out.backward(gy)
                        opt.step()
                        opt.zero_grad(set_to_none=True)

                    with execution_for(variant):
                        for _ in range(3):
                            step()
                        row[variant] = gpu_busy_ms(step)
                    del model, opt
                rows.append(row)
                print("  layer " + " ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}"
                                            for k, v in row.items()), flush=True)
    return rows


def _cell(r: dict[str, Any], key: str, spec: str = ".2f") -> str:
    return "-" if r.get(key) is None else format(r[key], spec)


def table(results: dict[str, Any]) -> str:
    lines = ["| workload | variant | step ms (median) | min-max | x LoRA | x PEFT DoRA | GPU-busy ms | x LoRA | "
             "kernels/step | peak MiB | x LoRA | merged inference x base |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for workload, rows in results["workloads"].items():
        for variant, r in rows.items():
            f = lambda key, spec=".2f", r=r: _cell(r, key, spec)
            lines.append(f"| {workload} | {variant} | {f('step_ms_median')} | {f('step_ms_min')}-{f('step_ms_max')} | "
                         f"{f('step_ms_median_vs_lora')} | {f('step_ms_median_vs_peft_dora')} | {f('gpu_busy_ms')} | "
                         f"{f('gpu_busy_ms_vs_lora')} | {f('kernels_per_step', '.0f')} | {f('peak_mem_mib', '.0f')} | "
                         f"{f('peak_mem_mib_vs_lora', '.3f')} | {f('merged_infer_vs_base', '.3f')} |")
    inter = [(w, v, r["interleaved"]) for w, rows in results["workloads"].items() for v, r in rows.items()
             if r.get("interleaved")]
    if inter:
        lines += ["", "Interleaved rounds (every variant timed in turn; benchmarks/step_time.py interleaved_rounds):", "",
                  "| workload | variant | step ms (median) | min-max | x LoRA | x PEFT DoRA | GPU-busy ms (mean) | min-max | "
                  "x LoRA |", "|---|---|---|---|---|---|---|---|---|"]
        for w, v, r in inter:
            busy_range = f"{_cell(r, 'gpu_busy_ms_min')}-{_cell(r, 'gpu_busy_ms_max')}" if "gpu_busy_ms_min" in r else "-"
            lines.append(f"| {w} | {v} | {_cell(r, 'step_ms_median')} | {_cell(r, 'step_ms_min')}-{_cell(r, 'step_ms_max')} | "
                         f"{_cell(r, 'step_ms_median_vs_lora', '.3f')} | {_cell(r, 'step_ms_median_vs_peft_dora', '.3f')} | "
                         f"{_cell(r, 'gpu_busy_ms')} | {busy_range} | {_cell(r, 'gpu_busy_ms_vs_lora', '.3f')} |")
    if results.get("layer_sweep"):
        lines += ["", "| width | rank | tokens | " + " | ".join(f"{v} GPU ms" for v in LAYER_VARIANTS) + " |",
                  "|---|---|---|" + "---|" * len(LAYER_VARIANTS)]
        for row in results["layer_sweep"]:
            lines.append(f"| {row['width']} | {row['rank']} | {row['tokens']} | "
                         + " | ".join(f"{row[v]:.3f}" for v in LAYER_VARIANTS) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", nargs="*", default=None, choices=sorted(WORKLOADS),
                        help="default: minilm (none with --layer-sweep alone)")
    parser.add_argument("--variants", nargs="+", default=["base", *OURS, *PEFT])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--inference", action="store_true",
                        help="also time forward-only inference of the base and of each merged variant")
    parser.add_argument("--layer-sweep", action="store_true", help="run workload (c), the single-layer sweep")
    parser.add_argument("--widths", nargs="+", type=int, default=[768, 2048, 4096, 8192])
    parser.add_argument("--ranks", nargs="+", type=int, default=[8, 64, 256])
    parser.add_argument("--tokens", nargs="+", type=int, default=[1024, 4096, 16384])
    parser.add_argument("--adam", choices=("auto", "foreach", "fused"), default="auto",
                        help="AdamW implementation for every variant (auto: as the Lightning modules step, "
                             "doran.fast.optim.FusedAdamW on a GPU; fused: torch's fused AdamW; foreach: the "
                             "multi-tensor one, PyTorch's default on a GPU)")
    parser.add_argument("--phases", action="store_true",
                        help="also time forward, backward, optimizer step and zero_grad apart (synchronised)")
    parser.add_argument("--all-kernels", action="store_true", help="list every CUDA kernel, not the top 12")
    parser.add_argument("--cprofile", action="store_true", help="also record the host's top Python functions")
    parser.add_argument("--ops", action="store_true",
                        help="also count the aten ops a step dispatches (forward, backward; compute and views)")
    parser.add_argument("--rounds", type=int, default=0,
                        help="then time every variant again in this many interleaved rounds (models kept alive; "
                             "see interleaved_rounds) and report those ratios too")
    parser.add_argument("--out", default=None, help="write the results JSON here")
    args = parser.parse_args(argv)
    if args.rounds < 0:
        parser.error(f"--rounds must be 0 (no interleaved rounds) or more, got {args.rounds}")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.workload is None:
        args.workload = [] if args.layer_sweep else ["minilm"]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    from doran.results import device_info, environment

    recorded = dict(vars(args))
    if args.out:  # no path of a particular machine in the file: the name, or the path inside the repository
        out = Path(args.out).resolve()
        root = Path(__file__).resolve().parent.parent
        recorded["out"] = str(out.relative_to(root)) if out.is_relative_to(root) else out.name
    results = {"started": datetime.now(timezone.utc).isoformat(timespec="seconds"), "device": device_info(),
               "env": environment(), "args": recorded, "workloads": {}}
    for name in args.workload:
        print(f"[bench] {name} on {device}", flush=True)
        from doran.results import atomic_write_json

        def partial(rows, name=name):
            if args.out:
                atomic_write_json(args.out, {**results, "workloads": {**results["workloads"], name: rows}})

        results["workloads"][name] = run_workload(name, args.variants, device, args.steps, args.warmup,
                                                  args.inference, on_row=partial, adam=args.adam,
                                                  phases=args.phases, all_kernels=args.all_kernels,
                                                  cprofile=args.cprofile, ops=args.ops, rounds=args.rounds)
        if args.out:
            atomic_write_json(args.out, {**results, "table": table(results)})
    if args.layer_sweep:
        if device != "cuda":
            raise SystemExit("--layer-sweep measures GPU-busy time and needs a CUDA device")
        print("[bench] single-layer sweep", flush=True)
        results["layer_sweep"] = layer_sweep(device, args.widths, args.ranks, args.tokens)
    md = table(results)
    print(md)
    if args.out:
        from doran.results import atomic_write_json

        atomic_write_json(args.out, {**results, "table": md})
    return 0


if __name__ == "__main__":
    sys.exit(main())
