"""Does torch.compile train the same adapter as eager, through the fused path's hand-written backward?

    python -m benchmarks.compile_probe [--device cuda]

For each preset, precision and compile mode, a compiled model runs the fused path (doran/fused.py; with
``--reference`` the plain-autograd path) and the adapter gradients after three compiled
steps are compared with the eager reference path's. Prints one line per case: the largest relative
gradient error, how many adapter tensors got an all-zero or missing gradient, and what the hand-written
backward saw while traced (``torch.compiler.is_compiling()``, any ``needs_input_grad`` flag set). A
diagnostic, not a test (tests/test_fused.py has the GPU test).
"""

from __future__ import annotations

import argparse
import sys

import torch
from torch import nn

import doran
from doran.fast import fused


class _Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.q_proj, self.v_proj = nn.Linear(d, d), nn.Linear(d, d)


class Blocks(nn.Module):
    def __init__(self, d: int = 64, n: int = 2) -> None:
        super().__init__()
        self.layers = nn.ModuleList(_Block(d) for _ in range(n))

    def forward(self, x):
        for b in self.layers:
            x = torch.tanh(b.q_proj(x) + b.v_proj(x))
        return x


_SEEN: set[tuple[bool, bool]] = set()  # (is_compiling, any needs_input_grad flag) seen by the backward


def _spy(needs):
    def wrapped(ctx, k):
        _SEEN.add((torch.compiler.is_compiling(), any(ctx.needs_input_grad)))
        return needs(ctx, k)
    return wrapped


def _case(preset: str, dtype: str, mode: str, device: str, force: bool) -> str:
    torch._dynamo.reset()
    _SEEN.clear()
    torch.manual_seed(0)
    model = Blocks().to(device)
    doran.inject(model, doran.AdapterConfig.preset(preset, r=4, targets=("q_proj", "v_proj")))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, p, _ in doran.named_adapter_parameters(model):
            p.add_(0.3 * torch.randn(p.shape, generator=g).to(p.device) * (p.abs().mean() + 0.1))
    x = torch.randn(256, 64, device=device)
    ac = torch.autocast(device, dtype=torch.bfloat16, enabled=dtype == "bf16")

    def loss(m):
        with ac:
            return m(x).float().pow(2).mean()

    with fused.execution(path="reference"):
        loss(model).backward()
    path = "reference" if not force else "fused"
    expect = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    backend = "aot_eager" if mode == "aot_eager" else "inductor"
    compiled = torch.compile(model, backend=backend, mode=None if mode in ("default", "aot_eager") else mode)
    needs = fused._needs
    fused._needs = _spy(needs)
    try:
        with fused.execution(path="fused", compiled=path):
            for _ in range(3):
                model.zero_grad(set_to_none=True)
                loss(compiled).backward()
    except Exception as exc:
        return f"ERROR {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
    finally:
        fused._needs = needs
    worst, zero, names = 0.0, 0, []
    for n, e in expect.items():
        p = dict(model.named_parameters())[n]
        if p.grad is None or p.grad.abs().sum() == 0:
            zero += 1
            names.append(n.split(".")[-1] if p.grad is None else n.split(".")[-1] + "=0")
            continue
        worst = max(worst, ((p.grad - e).abs().max() / e.abs().max().clamp_min(1e-12)).item())
    seen = " ".join(f"(compiling={c}, any flag={a})" for c, a in sorted(_SEEN)) or "-"
    return f"max rel err {worst:.2e}  zero/missing {zero}/{len(expect)} {sorted(set(names))[:6]}  backward saw {seen}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--modes", nargs="+", default=["aot_eager", "default", "reduce-overhead"])
    ap.add_argument("--presets", nargs="+", default=["lora", "dora", "doran"])
    ap.add_argument("--reference", action="store_true", help="let the compiled model take the reference path")
    args = ap.parse_args(argv)
    print(f"torch {torch.__version__}, device {args.device}, path {'reference' if args.reference else 'fused'}")
    for preset in args.presets:
        for dtype in ("fp32", "bf16"):
            for mode in args.modes:
                if mode == "reduce-overhead" and args.device != "cuda":
                    continue
                print(f"{preset:6s} {dtype} {mode:16s} {_case(preset, dtype, mode, args.device, not args.reference)}",
                      flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
