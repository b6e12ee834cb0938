"""Compare LM runs on different numbers of devices: loss curves (same global batch) and throughput.

    python -m experiments.multigpu_report experiments/results/lm-multigpu/*.json*

Prints a Markdown table, one row per run: devices, strategy, steps, final loss, the largest per-step loss
difference against the 1-device run with the same base-weight dtype, tokens/s and the speed-up over it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from doran.results import read_json


def summarise(paths: list[str]) -> str:
    runs = [read_json(p) for p in paths]

    def global_batch(r: dict) -> int:
        t = r["config"]["train"]
        return t["batch_size"] * r["device"]["devices"] * t["accumulate"]

    def group(r: dict) -> tuple:  # runs that must agree: same method, base dtype, global batch, steps
        return r["method"], r["config"]["model"]["dtype"], global_batch(r), r["steps"]

    runs.sort(key=lambda r: (*group(r), r["device"]["devices"], r["device"]["strategy"]))
    lines = ["| method | base weights | devices | strategy | device | steps | global batch | final loss "
             "| max abs loss diff vs 1 GPU | max rel diff | tokens/s | speed-up vs 1 GPU |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        base = next((b for b in runs if b["device"]["devices"] == 1 and group(b) == group(r)), None)
        loss = r["curves"]["steps"]["loss"]
        tput = r["throughput"]["tokens_per_s"]
        diff = rel = speed = None
        if base is not None:
            ref = base["curves"]["steps"]["loss"]
            pairs = list(zip(ref, loss))
            diff = max(abs(a - b) for a, b in pairs)
            rel = max(abs(a - b) / abs(a) for a, b in pairs)
            if tput and base["throughput"]["tokens_per_s"]:
                speed = tput / base["throughput"]["tokens_per_s"]
        name = r["device"].get("cuda_device", r["device"]["type"])
        lines.append(f"| {r['method']} | {r['config']['model']['dtype']} | {r['device']['devices']} | "
                     f"{r['device']['strategy']} | {name} | {r['steps']} | {global_batch(r)} | {loss[-1]:.4f} | "
                     f"{_fmt(diff)} | {_fmt(rel)} | {_fmt(tput, '.0f')} | {_fmt(speed, '.2f')} |")
    return "\n".join(lines)


def _fmt(value, spec: str = ".2e") -> str:
    return "-" if value is None else format(value, spec)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="+", help="result JSON files of experiments.run_lm")
    parser.add_argument("--plot", default=None, help="also write the loss-curve figure here (.png and .pdf)")
    args = parser.parse_args(argv)
    print(summarise(args.results))
    if args.plot:
        print(f"wrote {plot(args.results, args.plot)}")
    return 0



def plot(paths: list[str], out: str | Path) -> Path:
    """Loss per step of every run (one line per devices/strategy), and the difference to the 1-GPU run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [read_json(p) for p in paths]
    fig, (ax, ax_diff) = plt.subplots(1, 2, figsize=(11, 4))
    styles = {("auto", 1): ("1 GPU", "-", 2.5), ("ddp", 2): ("2 GPUs, DDP", "--", 1.5),
              ("fsdp", 2): ("2 GPUs, FSDP", ":", 1.5)}
    for r in sorted(runs, key=lambda r: r["device"]["devices"]):
        c = r["curves"]["steps"]
        label, ls, lw = styles.get((r["device"]["strategy"], r["device"]["devices"]),
                                   (f"{r['device']['devices']} x {r['device']['strategy']}", "-.", 1))
        label = f"{label} ({r['config']['model']['dtype']} base)"
        ax.plot(c["step"], c["loss"], ls, lw=lw, label=label)
        base = next((b for b in runs if b["device"]["devices"] == 1
                     and b["config"]["model"]["dtype"] == r["config"]["model"]["dtype"]), None)
        if base is not None and base is not r:
            diff = [a - b for a, b in zip(c["loss"], base["curves"]["steps"]["loss"])]
            ax_diff.plot(c["step"], diff, ls, lw=1.5, label=f"{label} minus 1 GPU")
    ax.set(xlabel="optimizer step", ylabel="training loss (nats / token)",
           title="Same global batch (16 x 256 tokens) on 1 and 2 GPUs")
    ax_diff.axhline(0, color="grey", lw=0.8)
    ax_diff.set(xlabel="optimizer step", ylabel="loss difference (nats / token)",
                title="Difference to the 1-GPU run")
    ax.legend(fontsize=8)
    ax_diff.legend(fontsize=8)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out.with_suffix(".png"), dpi=130)
    fig.savefig(out.with_suffix(".pdf"), metadata={"CreationDate": None})  # same data, same bytes
    plt.close(fig)
    return out.with_suffix(".png")


if __name__ == "__main__":
    sys.exit(main())
