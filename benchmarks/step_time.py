"""Adapter-only training step: wall time, GPU-busy time and peak memory per variant, as ratios to our LoRA.

    python -m benchmarks.step_time --workload vit llama --out benchmarks/results/gpu.json     # on a GPU
    python -m benchmarks.step_time --workload minilm --threads 2 --out benchmarks/results/cpu.json

Workloads (base frozen; forward, backward and AdamW step on the adapter; bf16 autocast on GPU):
  vit     timm ViT-B/16, random init, batch 64, 224 px, q/v slices of the fused qkv, r=8
  llama   a LLaMA-shaped model (hidden 4096, intermediate 11008, 32 heads, 4 layers, random init),
          batch 4 x 512 tokens, q_proj/v_proj, r=16
  minilm  the embedded all-MiniLM-L6-v2 (CPU default), batch 32 x 64 tokens, query/value, r=8
  layer   one Linear layer: widths 768..8192, ranks 8..256, tokens per step (--sweep)

Variants run in one process, in the same execution mode: no adapter, our presets (lora, dora, doran, ...),
PEFT's LoRA and PEFT's DoRA. Before timing, every variant's output at step 0 is checked against the
un-adapted model (all presets start as the identity) and our DoRA-family layer against a materialised
float64 reference. Reported: median wall step time over ``--steps`` steps after ``--warmup`` (with min and
max), GPU-busy time per step (sum of CUDA kernel time from torch.profiler), peak allocated memory, and each
as a ratio to our LoRA. Benchmarks, not tests: nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from datetime import datetime, timezone
from typing import Any
from collections.abc import Callable

import torch
from torch import nn

import doran

OURS = ("lora", "dora", "doran")
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


WORKLOADS: dict[str, Callable[[str], dict[str, Any]]] = {"vit": vit_workload, "llama": llama_workload,
                                                        "minilm": minilm_workload}


# ------------------------------------------------------------------------------------------------ variants
def build_variant(work: dict[str, Any], variant: str, device: str) -> nn.Module:
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
    return model.to(device)


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
        for _, p in layer.doran.named_parameters():
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
                 profile_steps: int = 5) -> dict[str, Any]:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step() -> None:
        with autocast(device):
            loss = work["step"](model)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    model.train()
    for _ in range(warmup):
        step()
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    result = {"step_ms_median": 1e3 * statistics.median(times), "step_ms_min": 1e3 * min(times),
              "step_ms_max": 1e3 * max(times), "steps": steps,
              "peak_mem_mib": torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None,
              "trainable": sum(p.numel() for p in params)}
    if device == "cuda":
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(profile_steps):
                step()
            sync()
        kernel_us = sum(e.device_time_total for e in prof.key_averages() if e.device_type.name == "CUDA"
                        and e.device_time_total > 0 and not e.key.startswith("Memcpy"))
        n_kernels = sum(e.count for e in prof.key_averages() if e.device_type.name == "CUDA")
        result["gpu_busy_ms"] = kernel_us / 1e3 / profile_steps
        result["kernels_per_step"] = n_kernels / profile_steps
    return result


def run_workload(name: str, variants: list[str], device: str, steps: int, warmup: int) -> dict[str, Any]:
    work = WORKLOADS[name](device)
    work["model"] = work["model"].to(device)
    with torch.no_grad(), autocast(device):
        reference = work["out"](work["model"]).float()
    rows = {}
    for variant in variants:
        model = build_variant(work, variant, device)
        row: dict[str, Any] = {"identity_rel_err": check_identity(work, model, reference, device)}
        if variant in doran.PRESETS:
            row["layer_vs_float64_rel_err"] = check_layer_against_reference(model)
        row.update(time_variant(work, model, device, steps, warmup))
        rows[variant] = row
        print(f"  {name:6s} {variant:10s} {row['step_ms_median']:8.2f} ms  busy "
              f"{row.get('gpu_busy_ms', float('nan')):8.2f} ms  mem {row['peak_mem_mib'] or 0:8.0f} MiB  "
              f"identity {row['identity_rel_err']:.1e}", flush=True)
        del model
        if device == "cuda":
            torch.cuda.empty_cache()
    lora = rows.get("lora")
    if lora:
        for row in rows.values():
            for key in ("step_ms_median", "gpu_busy_ms", "peak_mem_mib"):
                if row.get(key) is not None and lora.get(key):
                    row[f"{key}_vs_lora"] = row[key] / lora[key]
    return rows


def table(results: dict[str, Any]) -> str:
    lines = ["| workload | variant | step ms (median) | min-max | x LoRA | GPU-busy ms | x LoRA | peak MiB | x LoRA |",
             "|---|---|---|---|---|---|---|---|---|"]
    for workload, rows in results["workloads"].items():
        for variant, r in rows.items():
            def f(key, spec=".2f", r=r):
                return "-" if r.get(key) is None else format(r[key], spec)
            lines.append(f"| {workload} | {variant} | {f('step_ms_median')} | {f('step_ms_min')}-{f('step_ms_max')} | "
                         f"{f('step_ms_median_vs_lora')} | {f('gpu_busy_ms')} | {f('gpu_busy_ms_vs_lora')} | "
                         f"{f('peak_mem_mib', '.0f')} | {f('peak_mem_mib_vs_lora', '.3f')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", nargs="+", default=["minilm"], choices=sorted(WORKLOADS))
    parser.add_argument("--variants", nargs="+", default=["base", *OURS, *PEFT])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=None, help="write the results JSON here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    from doran.results import device_info, environment

    results = {"started": datetime.now(timezone.utc).isoformat(timespec="seconds"), "device": device_info(),
               "env": environment(), "args": vars(args), "workloads": {}}
    for name in args.workload:
        print(f"[bench] {name} on {device}", flush=True)
        results["workloads"][name] = run_workload(name, args.variants, device, args.steps, args.warmup)
    md = table(results)
    print(md)
    if args.out:
        from doran.results import atomic_write_json

        atomic_write_json(args.out, {**results, "table": md})
    return 0


if __name__ == "__main__":
    sys.exit(main())
