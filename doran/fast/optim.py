"""AdamW with the host's per-tensor work done once: the optimizer the Lightning modules step on a GPU.

``torch.optim.AdamW(fused=True)`` updates every tensor in one fused kernel, but before each step it walks
the parameters in Python to collect their gradients and state (``_init_group``: list and dict operations
for every tensor). DoRAN has about 8 tensors per adapted projection (embeddings, generator layers,
magnitude, tau) against LoRA's 2, so that walk is a real share of a compiled step whose GPU work is
replayed from a CUDA graph.

``FusedAdamW`` takes torch's first step as it is (which creates the state exactly as torch does), keeps
the lists of parameters and state tensors of each group, and from then on only gathers the gradients and
calls the same fused kernel with the same arguments (and clears the gradients from the same lists): the
update is torch's, bit for bit (tests/test_compiling.py). Tensors that never had a gradient (no state yet)
are kept apart and must still have none. Whatever the lean step does not cover (a tensor with state but without gradient in this step, a
first gradient, amsgrad, maximize, a gradient scaler's ``grad_scale``/``found_inf``, tensor
hyper-parameters, new groups, a loaded state) is handed to torch's own step, and the lists are rebuilt
after it.

``adamw`` is where the Lightning modules choose between this optimizer and torch's default. It is not a
setting (doran/settings.py): the choice follows from where the tensors are (all on a GPU, not sharded), so
it is made per optimizer, from its parameters.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn


class FusedAdamW(torch.optim.AdamW):
    """``torch.optim.AdamW(..., fused=True)`` whose steps after the first skip the per-tensor Python walk."""

    def __init__(self, params: Any, **kwargs: Any) -> None:
        kwargs["fused"] = True
        super().__init__(params, **kwargs)
        self._lists: list[tuple[list[torch.Tensor], ...]] | None = None
        #: a device flag (float32, 0-dim) set before ``step``: where it is nonzero the fused kernel leaves
        #: every tensor and its state as they were (the guard's way to drop a non-finite step without making
        #: the host wait for the GPU); it applies to the next step only
        self.skip_if: torch.Tensor | None = None

    def _lean(self, group: dict[str, Any]) -> bool:
        return not (group["amsgrad"] or group["maximize"] or group["differentiable"] or group["capturable"]
                    or any(torch.is_tensor(group[k]) for k in ("lr", "weight_decay", "eps"))
                    or any(torch.is_tensor(b) for b in group["betas"]))

    def _build_lists(self) -> None:
        """Per group: the parameters with state, their state tensors, and the parameters without state (never
        given a gradient so far: the lean step requires that they still have none)."""
        lists = []
        for group in self.param_groups:
            params = [p for p in group["params"] if self.state.get(p)]
            idle = [p for p in group["params"] if not self.state.get(p)]
            states = [self.state[p] for p in params]
            if not self._lean(group) or any("exp_avg" not in s for s in states) or \
                    len({(p.device, p.dtype) for p in params}) > 1:
                self._lists = None
                return
            lists.append((params, [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
                          [s["step"] for s in states], idle))
        self._lists = lists

    @torch.no_grad()
    def _lean_step(self, skip: torch.Tensor | None = None) -> bool:
        """The fused update of every group, or False (nothing done) where torch's own step is needed."""
        if self._lists is None or len(self._lists) != len(self.param_groups) or \
                getattr(self, "grad_scale", None) is not None or getattr(self, "found_inf", None) is not None:
            return False
        grads_of = []
        for group, (params, *_, idle) in zip(self.param_groups, self._lists):
            if len(group["params"]) != len(params) + len(idle) or not self._lean(group):
                return False
            grads = [p.grad for p in params]
            if any(g is None or g.is_sparse for g in grads) or any(p.grad is not None for p in idle):
                return False
            grads_of.append(grads)
        for group, (params, exp_avgs, exp_avg_sqs, steps, _), grads in zip(self.param_groups, self._lists,
                                                                         grads_of):
            if not params:
                continue
            beta1, beta2 = group["betas"]
            torch._foreach_add_(steps, 1)
            torch._fused_adamw_(params, grads, exp_avgs, exp_avg_sqs, [], steps, amsgrad=False, lr=group["lr"],
                                beta1=beta1, beta2=beta2, weight_decay=group["weight_decay"], eps=group["eps"],
                                maximize=False, grad_scale=None, found_inf=skip)
            if skip is not None:  # as torch does with found_inf: a skipped step does not count
                torch._foreach_sub_(steps, [skip] * len(steps))
        return True

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        skip, self.skip_if = self.skip_if, None
        if not self._lean_step(skip):
            # torch's own fused step reads found_inf: a gradient scaler sets (and later deletes) its own; the
            # guard's flag is set here only where no scaler's is, and removed again after the step
            ours = skip is not None and getattr(self, "found_inf", None) is None
            if ours:
                self.found_inf = skip
            try:
                super().step()
            finally:
                if ours:
                    del self.found_inf
            self._build_lists()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        if not set_to_none or self._lists is None:
            return super().zero_grad(set_to_none)
        for params, *_, idle in self._lists:  # the kept lists: no walk through the groups
            for p in params:
                p.grad = None
            for p in idle:
                p.grad = None
        return None

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._lists = None  # the state tensors were replaced: torch's step, then new lists

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        self._lists = None


def adamw(groups: list[dict[str, Any]], lr: float, weight_decay: float, sharded: bool = False) -> torch.optim.AdamW:
    """AdamW as the Lightning modules step it: fused (:class:`FusedAdamW`) when every tensor is on a GPU and
    not sharded, PyTorch's default elsewhere (the same update, up to rounding). On a GPU the default
    (foreach) AdamW costs the host work per tensor each step (per-tensor step counters read back with
    ``.item()``), which the compiled step cannot hide.

    Example::

        opt = adamw(doran.param_groups(model, lr=1e-3, weight_decay=1e-4), lr=1e-3, weight_decay=1e-4)
    """
    params = [p for group in groups for p in group["params"]]
    if params and not sharded and all(p.is_cuda and type(p) is nn.Parameter for p in params):
        return FusedAdamW(groups, lr=lr, weight_decay=weight_decay)
    return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)
