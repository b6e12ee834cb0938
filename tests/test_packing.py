"""Packed adapter storage (doran/packing.py): the same training, names, files and layers as unpacked."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import doran
from doran.fast import fused, packing


class QKV(nn.Module):
    """A block with a fused qkv (q and v adapted as slices) and, optionally, a narrower v_proj."""

    def __init__(self, d: int, narrow: bool) -> None:
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d)
        self.v_proj = nn.Linear(d, d // 2) if narrow else None
        self.out = nn.Linear(d, d)

    def forward(self, x):
        q, _, v = self.qkv(x).chunk(3, dim=-1)
        y = q * torch.sigmoid(v)
        if self.v_proj is not None:
            y = y + self.v_proj(x).repeat(1, 2)
        return torch.tanh(self.out(y))


class Net(nn.Module):
    def __init__(self, d: int = 8, n: int = 3, narrow: bool = False) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(QKV(d, narrow) for _ in range(n))
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def _pair(method: str = "doran", narrow: bool = False, **kw):
    """Two equal injected models (the second packed) and a batch."""
    torch.manual_seed(0)
    targets = ("qkv", "v_proj") if narrow else ("qkv",)
    model = Net(narrow=narrow)
    doran.inject(model, doran.AdapterConfig.preset(method, r=2, alpha=4, targets=targets, **kw), trainable=("head",))
    with torch.no_grad():  # off the identity init: B != 0, m != ||W0||
        for _, p, _ in doran.named_adapter_parameters(model):
            p.add_(0.2 * torch.randn_like(p) * (p.abs().mean() + 0.1))
    packed = copy.deepcopy(model)
    doran.pack(packed)
    return model, packed, torch.randn(6, 8)


def _train(model, x, steps: int = 4, path: str = "fused") -> list[float]:
    opt = torch.optim.AdamW(doran.param_groups(model, lr=1e-2, weight_decay=0.1))
    losses = []
    with fused.execution(path=path):
        for _ in range(steps):
            loss = model(x).square().mean()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
    return losses


def _assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("method, kw", [("doran", {}), ("doran", {"sharing": "qv_full"}), ("dora", {}),
                                        ("doran", {"tau_mode": "fixed", "tau_init": 0.1})])
@pytest.mark.parametrize("path", ["fused", "reference"])
def test_packed_training_is_the_unpacked_training_bit_for_bit(method, kw, path):
    model, packed, x = _pair(method, **kw)
    n_before = sum(p.requires_grad for p in model.parameters())
    n_after = sum(p.requires_grad for p in packed.parameters())
    assert n_after < n_before / 2
    assert _train(model, x, path=path) == _train(packed, x, path=path)
    _assert_same_state(model, packed)


def test_pack_keeps_names_counts_and_groups():
    model, packed, _ = _pair()
    # DoRAN, qv_first: emb A/B, first A/B (weight, bias), second A/B, magnitude, tau: 10 tensors + the head's 2
    assert len([p for p in packed.parameters() if p.requires_grad]) == 12
    groups = {n: g for n, _, g in doran.named_adapter_parameters(model)}
    assert {n: g for n, _, g in doran.named_adapter_parameters(packed)} == groups
    assert doran.trainable_parameter_counts(packed) == doran.trainable_parameter_counts(model)
    for got, want in zip(doran.param_groups(packed, lr=1.0, weight_decay=0.5),
                         doran.param_groups(model, lr=1.0, weight_decay=0.5)):
        assert (got["name"], got["lr"], got["weight_decay"]) == (want["name"], want["lr"], want["weight_decay"])
        assert sum(p.numel() for p in got["params"]) == sum(p.numel() for p in want["params"])
    ad = packed.blocks[1].qkv.doran["v"]
    assert not ad._parameters and torch.equal(ad.magnitude, model.blocks[1].qkv.doran["v"].magnitude)
    assert sorted(packing.trainable_names(packed)) == \
        sorted(n for n, p in model.named_parameters() if p.requires_grad)


def test_state_dicts_and_adapter_files_cross_between_packed_and_unpacked(tmp_path):
    model, packed, x = _pair()
    _train(packed, x)
    fresh = copy.deepcopy(model)
    fresh.load_state_dict(packed.state_dict())  # strict: the packed state dict has the unpacked names
    _assert_same_state(fresh, packed)
    again = copy.deepcopy(model)
    doran.pack(again)
    again.load_state_dict(fresh.state_dict())
    _assert_same_state(again, packed)
    path = doran.save_adapter(packed, tmp_path / "a.safetensors")
    into = copy.deepcopy(model)
    doran.load_adapter(into, path)
    _assert_same_state(into, packed)
    into_packed = copy.deepcopy(model)
    doran.pack(into_packed)
    doran.load_adapter(into_packed, path)
    torch.testing.assert_close(into_packed(x), packed(x), rtol=0, atol=0)


def test_views_train_the_packed_tensors_on_the_per_slice_path():
    """A layer called outside its model's forward computes its own factors from the views: the gradient
    reaches the packed tensor's row of that slice, and only that row."""
    _, packed, x = _pair()
    layer = packed.blocks[1].qkv
    layer(x).square().sum().backward()
    store = packed.doran_packed
    grad = store.g0_magnitude.grad
    assert grad is not None and grad[2:4].abs().sum() > 0
    assert grad[:2].abs().sum() == 0 and grad[4:].abs().sum() == 0


def test_merge_eject_merged_copy_and_unpack():
    model, packed, x = _pair()
    want = model(x).detach()
    doran.merge(packed)
    with pytest.raises(RuntimeError, match="merged"):  # training a merged layer: its views count too
        packed(x)
    with torch.no_grad():
        torch.testing.assert_close(packed(x), want, rtol=1e-5, atol=1e-6)
    doran.unmerge(packed)
    plain = doran.merged_copy(packed)
    assert not hasattr(plain, packing.ATTR) and not any(isinstance(m, doran.AdaptedLinear) for m in plain.modules())
    torch.testing.assert_close(plain(x), want, rtol=1e-5, atol=1e-6)
    copied = copy.deepcopy(packed)  # its own store: changing it leaves the original alone
    with torch.no_grad():
        copied.doran_packed.g0_magnitude.mul_(2)
    torch.testing.assert_close(packed(x), want, rtol=0, atol=0)
    doran.unpack(packed)
    assert not doran.is_packed(packed) and type(packed.blocks[0].qkv.doran["q"]) is doran.SliceAdapter
    _assert_same_state(model, packed)
    assert sum(1 for _ in packed.parameters()) == sum(1 for _ in model.parameters())
    doran.pack(packed)
    doran.eject(packed)
    assert type(packed.blocks[0].qkv) is nn.Linear and not hasattr(packed, packing.ATTR)


def _merged(model):
    m = copy.deepcopy(model)
    doran.merge(m)
    return m


def test_tensors_shared_across_groups_stay_unpacked():
    """A block's first generator layers (sharing="qv_first") serve its qkv slices and a narrower v_proj, two
    bank groups: they stay where they are; the per-slice tensors are packed. Training is the unpacked one."""
    model, packed, x = _pair(narrow=True, sharing="qv_first")
    keys = set(dict(packed.doran_packed.named_parameters()))
    assert not any("first" in k for k in keys) and {"g0_generator_second_A_weight", "g1_generator_emb_B"} <= keys
    assert len(packed.doran_packed.groups) == 2
    assert _train(model, x) == _train(packed, x)
    _assert_same_state(model, packed)


def test_pack_refuses_a_merged_model_and_packs_once():
    model, packed, _ = _pair()
    assert doran.pack(packed) is packed.doran_packed
    with pytest.raises(RuntimeError, match="unmerge"):
        doran.pack(_merged(model))
    lora = Net()
    doran.inject(lora, doran.AdapterConfig.preset("lora", r=2, targets=("qkv",)))
    assert doran.pack(lora) is None and not doran.is_packed(lora)  # LoRA slices are not the bank's


def test_a_compiled_packed_model_gives_the_eager_values_and_gradients():
    model, packed, x = _pair()
    want = model(x)
    want.square().sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    torch._dynamo.reset()
    got = doran.compile_model(packed, "aot_eager")(x)
    got.square().sum().backward()
    torch._dynamo.reset()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    views = packing.named_views(packed)
    checked = 0
    for name, p in packed.named_parameters():
        if p.grad is None:
            continue
        rows = [row_name for row_name, _, _ in views[id(p)]] if id(p) in views else [name]
        for i, row_name in enumerate(rows):
            g = p.grad[i] if id(p) in views else p.grad
            torch.testing.assert_close(g, grads[row_name], rtol=1e-5, atol=1e-7, msg=row_name)
            checked += 1
    assert checked == len(grads)


def test_gradients_by_unpacked_name_and_optimizer_leaves():
    """named_adapter_gradients gives a packed row its row of the packed gradient (what the non-finite guard
    and the gradient-norm recorder read); adapter_leaves lists each packed tensor once with its rows' group."""
    model, packed, x = _pair()
    for m in (model, packed):
        m(x).square().sum().backward()
    got, want = dict(doran.named_adapter_gradients(packed)), dict(doran.named_adapter_gradients(model))
    assert set(got) == set(want) and len(want) == 50
    for name, grad in want.items():
        torch.testing.assert_close(got[name], grad, rtol=0, atol=0, msg=name)
    leaves = list(doran.adapter_leaves(packed))
    assert len(leaves) == 12 and all(p.is_leaf for p, _, _ in leaves)
    assert {g for _, g, _ in leaves} == {"generator", "magnitude", "tau", "other"}
    assert sum(p.numel() for p, _, _ in leaves) == sum(p.numel() for p, _, _ in doran.adapter_leaves(model))


@pytest.mark.parametrize("packed_model", [False, True])
def test_copy_pickle_and_merged_copy_after_a_training_step(packed_model, tmp_path):
    """The bank's tensors of the last forward belong to its autograd graph: deepcopy, torch.save(model) and
    merged_copy leave them out (they failed on any injected model after a training forward)."""
    import io

    model, packed, x = _pair()
    m = packed if packed_model else model
    m(x).square().sum().backward()
    want = m(x).detach()
    copied = copy.deepcopy(m)
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    for other in (copied, loaded):
        torch.testing.assert_close(other(x), want, rtol=0, atol=0)
        assert doran.is_packed(other) == packed_model
    if packed_model:  # the copy reads its own store
        with torch.no_grad():
            loaded.doran_packed.g0_magnitude.mul_(2)
        assert not torch.equal(loaded(x), want)
        torch.testing.assert_close(m(x), want, rtol=0, atol=0)
    m(x).sum().backward()
    torch.testing.assert_close(doran.merged_copy(m)(x), want, rtol=1e-5, atol=1e-6)
