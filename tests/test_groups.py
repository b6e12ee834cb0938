"""Every adapter tensor of every preset has its parameter group; "other" holds non-adapter tensors only."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import doran
from doran.inject import GROUPS
from doran.layers import ADAPTER_GROUPS, group_of

VARIANTS = [(name, {}) for name in sorted(doran.PRESETS)] + [
    ("doran", {"tau_mode": "fixed"}),
    ("doran", {"tau_granularity": "row"}),
    ("doran", {"sharing": "global"}),
    ("doran", {"sharing": "qv_full"}),
    ("dora", {"factors": "generated", "sharing": "none"}),
    ("sora", {"rotate_bias": True}),
    ("hora", {"heads": 2}),
]


class _Attention(nn.Module):
    def __init__(self, d: int = 16, heads: int = 4) -> None:
        super().__init__()
        self.num_heads, self.head_dim = heads, d // heads
        self.q_proj, self.v_proj = nn.Linear(d, d), nn.Linear(d, d)
        self.qkv = nn.Linear(d, 3 * d)  # a fused q|k|v, adapted on its q and v thirds

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.q_proj(x) + self.v_proj(x) + self.qkv(x)[..., : x.shape[-1]]


class _Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(_Attention() for _ in range(2))
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return self.head(x)


def _injected(preset: str, overrides: dict) -> nn.Module:
    torch.manual_seed(0)
    model = _Model()
    cfg = doran.AdapterConfig.preset(preset, r=2, targets=("q_proj", "v_proj", "qkv"), **overrides)
    doran.inject(model, cfg, trainable=("head",))
    return model


def _check(model: nn.Module) -> None:
    """Adapter tensors (``<layer>.doran.<slice>.<name>``) have their group, "other" is the head alone."""
    head_ids = {id(p) for p in model.head.parameters()}
    seen = {}
    for name, p, group in doran.named_adapter_parameters(model):
        assert group in GROUPS, name
        if group == "other":
            assert id(p) in head_ids and ".doran." not in name, name
        else:
            assert ".doran." in name, name
        seen[name] = group
    assert sorted(n for n, g in seen.items() if g == "other") == ["head.bias", "head.weight"]
    assert any(".doran." in n for n in seen)


@pytest.mark.parametrize("preset, overrides", VARIANTS, ids=[f"{p}-{o}" for p, o in VARIANTS])
def test_every_adapter_tensor_has_a_group_other_than_other(preset, overrides):
    model = _injected(preset, overrides)
    for _, ad, _ in doran.slice_adapters(model):
        for local, _ in [*ad.named_parameters(), *ad.named_buffers()]:
            assert group_of(local) in GROUPS[:-1], local
    _check(model)
    doran.pack(model)  # packed rows get their group from their role
    _check(model)


def test_an_unknown_adapter_tensor_is_an_error_not_other():
    with pytest.raises(KeyError, match="ADAPTER_GROUPS"):
        group_of("new_tensor")
    assert group_of("generator.second_B.weight") == "generator" and group_of("tau_rho") == "tau"


def test_the_groups_and_their_order_are_those_of_the_stored_results():
    assert GROUPS == ("factors", "generator", "magnitude", "tau", "diag", "rotation", "other")
    assert set(ADAPTER_GROUPS.values()) == set(GROUPS[:-1])
