"""Figures of the step-time benchmarks, from their result files (trains and times nothing).

    python -m benchmarks.plot            # figures/bench_step_time.{png,pdf}, figures/bench_layer_sweep.{png,pdf}

``bench_step_time``: per workload (ViT-B/16, LLaMA-shaped), wall step time and GPU-busy time of every
variant, eager and compiled (``doran.compile_model`` with CUDA graphs, the Lightning modules' default on a
GPU), as ratios to our LoRA in the same run and the same execution mode, from
``gpu-h200-{vit,llama}-bb2b553.json`` (one run per workload; ``--models`` takes other files, and where a workload
comes from several, a later file's compiled rows replace earlier ones). Where a run has interleaved rounds
(``step_time.py --rounds``), those are drawn: every variant timed in turn, the GPU's clock drift shared. ``bench_layer_sweep``: the
single-layer sweep, DoRAN's GPU-busy time over LoRA's against tokens per step, with g applied to the weight
and to the output.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

ROOT = Path(__file__).resolve().parent.parent
LABELS = {
    "lora@compile-ro": "our LoRA, compiled", "dora@compile-ro": "our DoRA, compiled",
    "doran@compile-ro": "our DoRAN, compiled", "doran@compile-ro-unpacked": "DoRAN, compiled, unpacked",
    "doran@compile-ro-nobank": "DoRAN, compiled, no bank",
    "doran@compile-ro-ref": "DoRAN, compiled reference path",
    "lora": "our LoRA, eager", "dora": "our DoRA, eager", "doran": "our DoRAN, eager",
    "doran@unpacked": "DoRAN, eager, unpacked",
    "doran@nobank": "DoRAN, eager, no bank", "doran@reference": "DoRAN, eager reference path",
    "peft-lora": "PEFT LoRA, eager", "peft-dora": "PEFT DoRA, eager",
}
WORKLOAD_TITLES = {"vit": "ViT-B/16, batch 64, qkv q/v, r 8", "llama": "LLaMA-shaped 4 layers, 4 x 512, q/v, r 16"}


def _save(fig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    for ext in ("png", "pdf"):
        fig.savefig(path.with_suffix(f".{ext}"), dpi=150, bbox_inches="tight",
                    metadata={"CreationDate": None} if ext == "pdf" else None)  # same data, same bytes
    plt.close(fig)


def plot_step_time(results: dict, out: Path) -> None:
    """``results``: {"workloads": {name: rows}, "device": ...} (the workloads may come from several files)."""
    workloads = [w for w in ("vit", "llama") if w in results["workloads"]]
    fig, axes = plt.subplots(1, len(workloads), figsize=(6.2 * len(workloads), 4.2), squeeze=False)
    rounds = False
    for ax, w in zip(axes[0], workloads):
        # the interleaved rounds where the run has them (step_time.py --rounds: every variant timed in turn)
        rows = {v: r.get("interleaved") or r for v, r in results["workloads"][w].items()}
        rounds = rounds or any("rounds" in r for r in rows.values())
        names = [v for v in LABELS if v in rows]
        y = range(len(names))
        wall = [rows[v]["step_ms_median_vs_lora"] for v in names]
        busy = [rows[v]["gpu_busy_ms_vs_lora"] for v in names]
        hatch = ["//" if "@compile" in v else "" for v in names]
        scale = [rows[v]["step_ms_median"] / wall[i] for i, v in enumerate(names)]  # LoRA's median (ms)
        spread = [[(rows[v]["step_ms_median"] - rows[v]["step_ms_min"]) / scale[i] for i, v in enumerate(names)],
                  [(rows[v]["step_ms_max"] - rows[v]["step_ms_median"]) / scale[i] for i, v in enumerate(names)]]
        ax.barh([i + 0.2 for i in y], wall, height=0.38, color="#4c72b0", hatch=hatch, label="wall step time",
                xerr=spread, error_kw={"elinewidth": 0.8, "capsize": 2, "ecolor": "#333333"})
        ax.barh([i - 0.2 for i in y], busy, height=0.38, color="#dd8452", hatch=hatch, label="GPU-busy time")
        for i, v in enumerate(names):
            ax.text(wall[i] + spread[1][i] + 0.03, i + 0.2, f"{rows[v]['step_ms_median']:.1f} ms", va="center",
                    fontsize=8)
            ax.text(busy[i] + 0.03, i - 0.2, f"{rows[v]['gpu_busy_ms']:.1f} ms", va="center", fontsize=8)
        ax.axvline(1.0, color="black", lw=0.8)
        ax.axvline(1.10, color="grey", lw=0.6, ls="--")  # the wall-time target
        ax.set_yticks(list(y), [LABELS[v] for v in names])
        ax.invert_yaxis()
        ax.set_xlabel("x our LoRA in the same mode (same run); dashed: 1.10")
        ax.set_title(WORKLOAD_TITLES.get(w, w), fontsize=10)
        ax.set_xlim(0, max([w + e for w, e in zip(wall, spread[1])] + busy) * 1.2)
    from matplotlib.patches import Patch

    timed = "of all rounds' timed steps" if rounds else "of the timed steps"
    fig.legend(handles=[Patch(color="#4c72b0", label=f"wall step time (median; whiskers: min-max {timed})"),
                        Patch(color="#dd8452", label="GPU-busy time")], loc="lower center", ncol=2, fontsize=8,
               bbox_to_anchor=(0.5, -0.1))
    fig.subplots_adjust(wspace=0.75)
    how = "variants timed in interleaved rounds, " if rounds else ""
    fig.suptitle("Adapter-only training step, bf16 autocast; hatched: compiled + CUDA graphs (ratios to "
                 f"LoRA of the same run and mode; {how}{results['device'].get('cuda_device', '')})", fontsize=11)
    _save(fig, out)


def plot_layer_sweep(results: dict, out: Path) -> None:
    rows = results["layer_sweep"]
    widths = sorted({r["width"] for r in rows})
    fig, axes = plt.subplots(1, len(widths), figsize=(3.4 * len(widths), 3.6), sharey=True, squeeze=False)
    for ax, d in zip(axes[0], widths):
        for variant, style in (("doran@weight", "-o"), ("doran@output", "--s"), ("doran@reference", ":^"),
                               ("peft-dora", "-.x")):
            for rank, color in zip(sorted({r["rank"] for r in rows}), ("#4c72b0", "#55a868", "#c44e52")):
                pts = sorted((r["tokens"], r[variant] / r["lora"]) for r in rows
                             if r["width"] == d and r["rank"] == rank)
                if variant.startswith("doran@") and variant != "doran@reference":
                    ax.plot(*zip(*pts), style, color=color, ms=4,
                            label=f"{variant.split('@')[1]}, r {rank}")
                elif rank == 8:
                    ax.plot(*zip(*pts), style, color="grey", ms=4, label=f"{LABELS.get(variant, variant)}, r 8")
        ax.axvline(d, color="black", lw=0.6, ls=":")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log", base=2)
        ax.set_yticks([1, 1.5, 2, 3, 4], ["1", "1.5", "2", "3", "4"])
        ax.set_xticks([1024, 4096, 16384], ["1k", "4k", "16k"])
        ax.set_title(f"width {d} (dotted: tokens = width)", fontsize=9)
        ax.set_xlabel("tokens per step")
    axes[0][0].set_ylabel("GPU-busy time / LoRA's")
    axes[0][-1].legend(fontsize=7, loc="upper right")
    fig.suptitle("One bf16 Linear, forward + backward + AdamW: DoRAN with g on the weight or on the output", fontsize=11)
    _save(fig, out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=[str(ROOT / f"benchmarks/results/gpu-h200-{f}-bb2b553.json")
                                                         for f in ("vit", "llama")])
    parser.add_argument("--layers", default=str(ROOT / "benchmarks/results/gpu-h100-layer-sweep.json"))
    parser.add_argument("--out", default=str(ROOT / "figures"))
    args = parser.parse_args(argv)
    out = Path(args.out)
    files = [json.loads(Path(f).read_text()) for f in args.models if Path(f).exists()]
    if files:  # a workload's rows from its files in order; a later file's compiled rows replace earlier ones
        merged: dict = {"device": files[0]["device"], "workloads": {}}
        for f in files:
            for w, rows in f["workloads"].items():
                old = merged["workloads"].get(w, {})
                if any("@compile" in v for v in rows):
                    old = {v: r for v, r in old.items() if "@compile" not in v}
                merged["workloads"][w] = {**old, **{v: r for v, r in rows.items() if v in LABELS and
                                                    ("@compile" in v or v not in old)}}
        plot_step_time(merged, out / "bench_step_time")
        print(f"[plot] {out / 'bench_step_time'}.png")
    if Path(args.layers).exists():
        plot_layer_sweep(json.loads(Path(args.layers).read_text()), out / "bench_layer_sweep")
        print(f"[plot] {out / 'bench_layer_sweep'}.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
