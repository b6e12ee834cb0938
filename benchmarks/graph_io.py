"""What a compiled step hands across its graphs: inputs and outputs of the forward and backward graphs.

    python -m benchmarks.graph_io [--out benchmarks/results/cpu-graph-io.json]

Compiled with CUDA graphs, every output of the forward graph (the loss and each tensor saved for the
backward) is rebuilt on the host after each replay, and every input of the backward graph is checked
before it: host work per tensor that the GPU does not see. This traces ViT-B/16's structure at toy width
(the ``host`` workload of benchmarks/step_time.py) as ``doran.compile_model`` does, with the partitioner
Inductor uses (min-cut rematerialisation), on the CPU, and counts those tensors per variant; it also lists
the kinds of saved tensors (shape, dtype, producing op) that DoRAN saves and LoRA does not. A diagnostic:
nothing is timed, nothing asserted.
"""

from __future__ import annotations

import argparse
import copy
import json
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

import doran
from benchmarks.step_time import execution_for, host_workload, split_variant
from doran.fast.compiling import CompiledModel

VARIANTS = ("lora@compile-ro", "dora@compile-ro", "doran@compile-ro", "doran@compile-ro-unpacked")


def _backend(store: dict[str, Any]):
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.partitioners import min_cut_rematerialization_partition

    def outputs(gm) -> list:
        return [o for o in next(n for n in gm.graph.nodes if n.op == "output").args[0] if o is not None]

    def fw(gm, example_inputs):
        outs = outputs(gm)
        store["forward_inputs"] = sum(n.op == "placeholder" for n in gm.graph.nodes)
        store["forward_outputs"] = len(outs)
        kinds: Counter = Counter()
        for o in outs:
            val = o.meta.get("val") if hasattr(o, "meta") else None
            if isinstance(val, torch.Tensor):
                op = o.target.__name__ if callable(o.target) else o.op
                kinds[f"{tuple(val.shape)} {str(val.dtype).removeprefix('torch.')} {op}"] += 1
        store["saved_kinds"] = kinds
        return make_boxed_func(gm.forward)

    def bw(gm, example_inputs):
        store["backward_inputs"] = sum(n.op == "placeholder" for n in gm.graph.nodes)
        store["backward_outputs"] = len(outputs(gm))
        return make_boxed_func(gm.forward)

    return aot_autograd(fw_compiler=fw, bw_compiler=bw, partition_fn=min_cut_rematerialization_partition)


def count(variant: str) -> dict[str, Any]:
    work = host_workload("cpu")
    name, mode = split_variant(variant)
    model = copy.deepcopy(work["model"])
    cfg = doran.AdapterConfig.preset(name, r=work["r"], alpha=2 * work["r"], targets=work["targets"])
    doran.inject(model, cfg, trainable=work["head"])
    if not mode.endswith("unpacked"):
        doran.pack(model)
    store: dict[str, Any] = {}
    torch._dynamo.reset()
    with execution_for(variant):
        work["step"](CompiledModel(model, backend=_backend(store))).backward()
    torch._dynamo.reset()
    store["trainable_tensors"] = sum(p.requires_grad for p in model.parameters())
    return store


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS))
    parser.add_argument("--out", default=None, help="write the counts (JSON) here")
    args = parser.parse_args(argv)
    rows = {v: count(v) for v in args.variants}
    base = rows.get("lora@compile-ro")
    for v, r in rows.items():
        print(f"{v:28s} forward in {r['forward_inputs']:4d} out {r['forward_outputs']:4d} | backward in "
              f"{r['backward_inputs']:4d} out {r['backward_outputs']:4d} | trainable tensors {r['trainable_tensors']}")
    if base is not None:
        for v, r in rows.items():
            extra = {k: n - base["saved_kinds"].get(k, 0) for k, n in r["saved_kinds"].items()
                     if n != base["saved_kinds"].get(k, 0)}
            r["saved_beyond_lora"] = dict(sorted(extra.items()))
            if v != "lora@compile-ro":
                print(f"  {v}: saved beyond LoRA's (shape dtype op: count) {r['saved_beyond_lora']}")
    if args.out:
        from doran.results import environment

        for r in rows.values():
            r["saved_kinds"] = dict(sorted(r["saved_kinds"].items()))
        payload = {"started": datetime.now(timezone.utc).isoformat(timespec="seconds"), "env": environment(),
                   "workload": "host (ViT-B/16 structure, width 48, batch 1, qkv q/v, r 8)", "variants": rows}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(payload, indent=1))
        print(f"[graph_io] {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
