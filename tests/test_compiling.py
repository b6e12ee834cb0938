"""How the Lightning modules run the model: the compile modes, token padding for CUDA graphs, and a
compiled module training as the eager one does (CPU: the aot_eager backend, no C compiler needed)."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch

import doran
from doran.fast.compiling import (
    TOKEN_MULTIPLE,
    CompiledModel,
    CompiledRunner,
    WholeCall,
    pad_tokens,
    resolve_compile,
)
from doran.fast.optim import FusedAdamW
from doran.training import AdapterClassifier, CausalLMModule, build_text_model, build_timm
from tests.test_lm import TINY
from tests.test_training import _datamodule, _module, _trainer


@pytest.mark.parametrize("mode, device, sharded, expected", [
    ("auto", "cuda", False, "reduce-overhead"),
    ("auto", "cpu", False, "none"),
    ("auto", "cuda", True, "none"),  # FSDP: eager
    ("default", "cpu", False, "default"),
    ("none", "cuda", False, "none"),
])
def test_auto_compiles_with_cuda_graphs_on_a_gpu_only(mode, device, sharded, expected):
    assert resolve_compile(mode, device, sharded) == expected


def test_unknown_compile_mode_is_a_clear_error_before_any_work():
    with pytest.raises(ValueError, match="unknown compile mode 'fast'.*none"):
        resolve_compile("fast", "cpu")
    model, _, _ = build_text_model("random-bert", 2)
    with pytest.raises(ValueError, match="unknown compile mode"):
        AdapterClassifier(backbone={"kind": "text", "name": "random-bert"}, method="lora", adapter={"r": 2},
                          num_classes=2, compile="fast", model=model)


def test_token_padding_keeps_class_labels_and_masks_the_new_positions():
    batch = {"input_ids": torch.arange(10).view(2, 5) + 1, "attention_mask": torch.ones(2, 5, dtype=torch.long),
             "labels": torch.tensor([0, 1])}
    out = pad_tokens(batch, 4, pad_id=9)
    assert out["input_ids"].shape == (2, 8)
    assert out["input_ids"][:, 5:].eq(9).all() and out["attention_mask"][:, 5:].eq(0).all()
    assert torch.equal(out["input_ids"][:, :5], batch["input_ids"]) and torch.equal(out["labels"], batch["labels"])
    tokens = {**batch, "labels": batch["input_ids"].clone()}
    assert pad_tokens(tokens, 4)["labels"][:, 5:].eq(-100).all()  # token labels: ignored by the loss
    assert pad_tokens(out, 4) is out  # already a multiple: untouched


def test_padding_does_not_change_the_logits_of_a_classifier():
    """Under CUDA graphs token batches are padded to a multiple of TOKEN_MULTIPLE; the masked positions
    must not change the prediction (float32, random BERT)."""
    module = _module("doran")
    module.eval()
    batch = {"input_ids": torch.randint(5, 90, (3, 11)), "attention_mask": torch.ones(3, 11, dtype=torch.long),
             "labels": torch.tensor([0, 1, 0])}
    batch["attention_mask"][1, 7:] = 0
    runner = CompiledRunner(module.model, "none", "cpu")
    runner.mode = "reduce-overhead"  # only its padding; the model itself runs eager here
    padded = runner.prepare(batch)
    assert padded["input_ids"].shape[1] == TOKEN_MULTIPLE
    with torch.no_grad():
        plain = module.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        wide = module.model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).logits
    torch.testing.assert_close(wide, plain, rtol=1e-5, atol=1e-6)


def _fit(tokenizer, compile_mode):
    module = _module("doran")
    module.hparams.compile = compile_mode
    pl.seed_everything(0)
    _trainer(max_steps=3, accelerator="cpu").fit(module, datamodule=_datamodule(tokenizer))
    return module


def test_a_compiled_classifier_trains_the_adapter_the_eager_one_trains():
    tokenizer = build_text_model("random-bert", 2)[1]
    eager = _fit(tokenizer, "none")
    compiled = _fit(tokenizer, "aot_eager")
    assert eager.runner.mode == "none" and compiled.runner.mode == "aot_eager"
    assert isinstance(compiled.runner.model, CompiledModel)
    assert isinstance(compiled.runner.model.compiled, torch._dynamo.eval_frame.OptimizedModule)
    got = {n: p for n, p, _ in doran.named_adapter_parameters(compiled.model)}
    for name, p, _ in doran.named_adapter_parameters(eager.model):
        torch.testing.assert_close(got[name], p, rtol=1e-4, atol=1e-6, msg=name)
    # the compiled wrapper is not a submodule: state dict and checkpoints keep the adapter's own names
    assert not any("_orig_mod" in k or "runner" in k for k in compiled.state_dict())
    assert set(compiled.state_dict()) == set(eager.state_dict())


def test_the_language_model_module_compiles_too():
    torch.manual_seed(0)
    module = CausalLMModule(lm=TINY, method="doran", adapter=dict(r=4, alpha=8, targets=("q_proj", "v_proj")),
                            compile="aot_eager")
    ids = torch.randint(3, 200, (2, 9))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    loss = module(batch)
    loss.backward()
    assert module.runner.mode == "aot_eager" and torch.isfinite(loss)
    grads = [p.grad for _, p, _ in doran.named_adapter_parameters(module.model)]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    module._runner, module.hparams.compile = (), "none"
    torch.testing.assert_close(loss, module(batch), rtol=1e-5, atol=1e-6)


def _vit_module():
    torch.manual_seed(0)
    model, _ = build_timm("vit_tiny_patch16_224", 3, pretrained=False, img_size=32, patch_size=8, depth=2)
    return AdapterClassifier(backbone={}, method="doran", adapter={"r": 2, "alpha": 4, "targets": ["qkv"]},
                             num_classes=3, head="head", trainable=["head"], lr=1e-2, seed=0, model=model)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_auto_on_a_gpu_trains_with_cuda_graphs_and_eager_gradients():
    """The default on a GPU (reduce-overhead), on a tiny ViT: Lightning trains through it, and its gradients
    are eager's (float32; compared per step, since Adam turns rounding noise on near-zero gradients into
    lr-sized moves)."""
    from torch.utils.data import DataLoader, TensorDataset

    g = torch.Generator().manual_seed(0)
    images, labels = torch.randn(24, 3, 32, 32, generator=g), torch.randint(0, 3, (24,), generator=g)
    loader = DataLoader(TensorDataset(images, labels), batch_size=8,
                        collate_fn=lambda items: {"pixel_values": torch.stack([i for i, _ in items]),
                                                  "labels": torch.stack([y for _, y in items])})
    modes = set()

    class Mode(pl.Callback):  # Lightning moves the module back to the CPU after fit: look during it
        def on_train_batch_end(self, trainer, pl_module, *args):
            modes.add(pl_module.runner.mode)

    module = _vit_module()
    before = {n: p.detach().clone() for n, p, _ in doran.named_adapter_parameters(module.model)}
    trainer = _trainer(callbacks=[Mode()], max_steps=3, accelerator="gpu", devices=1)
    trainer.fit(module, train_dataloaders=loader)
    assert modes == {"reduce-overhead"}
    assert isinstance(trainer.optimizers[0], FusedAdamW)  # doran.fast.optim.adamw on a GPU
    assert any(not torch.equal(p.cpu(), before[n]) for n, p, _ in doran.named_adapter_parameters(module.model))

    batch = {"pixel_values": images[:8].cuda(), "labels": labels[:8].cuda()}
    grads = []
    for mode in ("none", "auto"):
        module = _vit_module().cuda().eval()  # no dropout: the same function in both modes
        module.hparams.compile = mode
        for _ in range(3):  # CUDA graphs are recorded on a later call
            module.zero_grad(set_to_none=True)
            module.model_step(batch)[0].backward()
        grads.append({n: p.grad.clone() for n, p, _ in doran.named_adapter_parameters(module.model)})
    assert module.runner.mode == "reduce-overhead"
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-3, atol=1e-6, msg=name)


def test_compile_model_traces_the_bank_hook_and_the_forward_as_one_graph():
    """torch.compile(model) compiles the bank's pre-hook as a frame of its own (two graphs, the factors
    crossing between them); compile_model traces hooks and forward together: one graph, eager's values."""
    from torch._dynamo.utils import counters

    from tests.test_fused import Blocks, _perturb

    torch.manual_seed(0)
    model = Blocks(d=8, n=3)
    doran.inject(model, doran.AdapterConfig.preset("doran", r=2, targets=("q_proj", "v_proj")))
    _perturb(model)
    x = torch.randn(4, 8)
    ref = model(x)
    graphs = {}
    for name, compiled in (("bare", torch.compile(model, backend="aot_eager")),
                           ("compile_model", doran.compile_model(model, "aot_eager"))):
        torch._dynamo.reset()
        counters.clear()
        out = compiled(x)
        graphs[name] = counters["stats"]["unique_graphs"]
        torch.testing.assert_close(out, ref)
    torch._dynamo.reset()
    assert graphs == {"bare": 2, "compile_model": 1}
    assert doran.compile_model(model, "none") is model
    assert doran.compile_model(model) is model  # auto on a CPU: eager
    with pytest.raises(ValueError, match="unknown compile mode 'fast'"):
        doran.compile_model(model, "fast")


def _graph_ops(store: list):
    """An aot_eager-like backend that records the aten ops of each forward graph it compiles."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    def fw(gm, example_inputs):
        store.append({str(n.target) for n in gm.graph.nodes if n.op == "call_function"})
        return make_boxed_func(gm.forward)

    return aot_autograd(fw_compiler=fw, bw_compiler=lambda gm, _: make_boxed_func(gm.forward))


def test_compile_model_reads_the_row_norms_it_checked_and_follows_a_changed_base_weight():
    """compile_model's graph takes ||W0||_row from the bank's copies (no norm of W0 in the graph), checked
    against the weights' versions before each call: a base weight changed in place between calls gives the
    eager values of the new weight. A model compiled directly computes the norms in its graph."""
    from tests.test_fused import Blocks, _perturb

    torch.manual_seed(0)
    model = Blocks(d=8, n=2)
    doran.inject(model, doran.AdapterConfig.preset("doran", r=2, targets=("q_proj", "v_proj")))
    _perturb(model)
    x = torch.randn(4, 8)
    graphs: list = []
    torch._dynamo.reset()
    compiled = doran.compile_model(model, "aot_eager")
    compiled.compiled = torch.compile(WholeCall(model), backend=_graph_ops(graphs))
    for step in range(3):
        if step == 2:  # the base weight of the second block's q_proj changes in place
            with torch.no_grad():
                model.layers[1].q_proj.weight.mul_(1.5)
        out = compiled(x)
        out.square().sum().backward()
        got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad()
        ref = model(x)
        ref.square().sum().backward()
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
        for n, p in model.named_parameters():
            if p.grad is not None:
                torch.testing.assert_close(got[n], p.grad, rtol=1e-4, atol=1e-6, msg=n)
        model.zero_grad()
    assert len(graphs) == 1 and not any("norm" in op for op in graphs[0])
    bare: list = []
    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(WholeCall(model), backend=_graph_ops(bare))(x), model(x))
    assert any("linalg_vector_norm" in op for op in bare[0])
    torch._dynamo.reset()


def test_adamw_is_the_default_implementation_off_a_gpu():
    from doran.fast.optim import adamw

    params = [torch.nn.Parameter(torch.randn(3))]
    opt = adamw([{"params": params, "weight_decay": 0.0}], lr=1e-3, weight_decay=0.1)
    assert not opt.defaults.get("fused") and opt.param_groups[0]["weight_decay"] == 0.0
    assert not adamw([{"params": params}], lr=1e-3, weight_decay=0.0, sharded=True).defaults.get("fused")


def test_fused_adamw_steps_as_torchs_fused_adamw_bit_for_bit():
    """FusedAdamW (torch's first step, then the kernel called on kept lists) gives torch's fused AdamW's
    parameters exactly: two groups, a schedule, a closure, a step with a missing gradient (torch's step),
    its state saved and loaded into a fresh optimizer midway."""
    torch.manual_seed(0)
    init = [torch.randn(4, 3), torch.randn(5), torch.randn(2, 2), torch.randn(3)]
    data = [[torch.randn_like(t) for t in init] for _ in range(8)]
    data = [grads[:3] + [grads[3] if i >= 6 else None] for i, grads in enumerate(data)]  # the last: idle, then not

    def train(cls, **kw):
        params = [torch.nn.Parameter(t.clone()) for t in init]
        groups = [{"params": params[:2], "weight_decay": 0.1}, {"params": params[2:], "weight_decay": 0.0}]
        # params[3] gets no gradient before step 6: the lean step runs with it idle

        def make(state=None):
            opt = cls(groups, lr=1e-2, weight_decay=0.1, **kw)
            if state is not None:
                opt.load_state_dict(state)
            return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0 / (1 + i))

        opt, sched = make()
        for i, grads in enumerate(data):
            def closure(grads=grads, i=i):
                for p, g in zip(params, grads):
                    p.grad = None if (i == 3 and p is params[1]) or g is None else g.clone()
                return sum(float(g.sum()) for g in grads if g is not None)
            assert opt.step(closure) == closure()
            sched.step()
            opt.zero_grad()
            assert all(p.grad is None for p in params)
            if i == 4:  # resume from a checkpoint of the optimizer
                state = opt.state_dict()
                opt, sched = make(state)
                for _ in range(i + 1):
                    sched.step()
        return params

    lean = []
    original = FusedAdamW._lean_step
    FusedAdamW._lean_step = lambda self, skip=None: lean.append(original(self, skip)) or lean[-1]
    try:
        ours = train(FusedAdamW)
    finally:
        FusedAdamW._lean_step = original
    assert lean.count(True) == 4  # steps 1, 2, 4, 7; torch's at 0, 3 (a gradient missing), 5 (loaded), 6 (the
    # idle tensor's first gradient)
    for got, expect in zip(ours, train(torch.optim.AdamW, fused=True)):
        assert torch.equal(got, expect)


def test_a_gradient_scalers_found_inf_is_left_to_the_scaler():
    """A gradient scaler sets ``found_inf`` before ``step`` and deletes it after: the step must leave it."""
    p = torch.nn.Parameter(torch.ones(3))
    opt = FusedAdamW([p], lr=0.1)
    for found, moves in ((0.0, True), (1.0, False)):
        p.grad = torch.ones(3)
        before = p.detach().clone()
        opt.found_inf = torch.tensor(found)
        opt.step()
        assert hasattr(opt, "found_inf")  # the scaler deletes it, not the optimizer
        del opt.found_inf
        assert (not torch.equal(p.detach(), before)) == moves
    p.grad = torch.full((3,), float("nan"))
    before = p.detach().clone()
    opt.skip_if = torch.tensor(1.0)  # the guard's flag: the step is dropped, and no attribute is left
    opt.step()
    assert torch.equal(p.detach(), before) and not hasattr(opt, "found_inf") and opt.skip_if is None


def test_a_compiler_that_fails_on_the_first_call_falls_back_to_eager_loudly(monkeypatch):
    model = torch.nn.Sequential(torch.nn.Linear(4, 3))
    cfg = doran.AdapterConfig.preset("doran", r=2, alpha=4, targets=("0",), factors="static")
    doran.inject(model, cfg)

    def broken(fn, **kwargs):
        def call(*args, **kw):
            raise AssertionError("Can't unpack scalar tensors")

        return call

    monkeypatch.setattr(torch, "compile", broken)
    run = doran.compile_model(model, "default")
    x = torch.randn(5, 4)
    with pytest.warns(RuntimeWarning, match="torch.compile failed on the first call .*running eager"):
        out = run(x)
    assert torch.equal(out, model(x)) and run.compiled_ok is False
    assert run.fallback == "AssertionError: Can't unpack scalar tensors"
    assert torch.equal(run(x), model(x))  # later calls run eager, without a warning


def test_a_compiler_that_fails_on_a_later_graph_falls_back_to_eager_loudly(monkeypatch):
    """The first (training) call compiles; evaluation under no_grad needs a new graph, whose tracing fails (as
    torch 2.11's dynamo did on a GPU): that call and every later one run eager, with the eager values."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 3))
    doran.inject(model, doran.AdapterConfig.preset("doran", r=2, alpha=4, targets=("0",), factors="static"))
    calls = []

    def fails_without_grad(fn, **kwargs):
        def call(*args, **kw):
            calls.append(torch.is_grad_enabled())
            if not torch.is_grad_enabled():
                raise AssertionError("Can't unpack scalar tensors.\n\nfrom user code: ...")
            return fn(*args, **kw)

        return call

    monkeypatch.setattr(torch, "compile", fails_without_grad)
    run = doran.compile_model(model, "default")
    x = torch.randn(5, 4)
    assert torch.equal(run(x), model(x)) and run.compiled_ok is True
    with torch.no_grad(), pytest.warns(RuntimeWarning, match=r"failed on a later call \(a new graph\).*eager"):
        out = run(x)
    assert torch.equal(out, model(x)) and run.compiled_ok is False
    assert run.fallback == "AssertionError: Can't unpack scalar tensors."
    assert torch.equal(run(x), model(x)) and calls == [True, False]  # eager from then on: never compiled again
    with pytest.raises(torch.OutOfMemoryError):  # an out-of-memory error is the call's own, not the compiler's
        run.compiled_ok = True
        object.__setattr__(run, "compiled", lambda *a: (_ for _ in ()).throw(torch.OutOfMemoryError("oom")))
        run(x)


def test_row_scales_without_grad_are_the_autograd_nodes_values():
    """Under no_grad the row scale is the same forward as a plain function (no node, nothing saved)."""
    from doran.fast.rowscale import row_scale, row_scales

    torch.manual_seed(0)
    A, B = torch.randn(2, 3, 6, dtype=torch.float64), torch.randn(2, 4, 3, dtype=torch.float64)
    W = torch.randn(8, 6, dtype=torch.float64)
    m, t = torch.rand(2, 4, dtype=torch.float64) + 0.5, torch.full((2, 1), 0.1, dtype=torch.float64)
    w0_sq = W.square().sum(1).reshape(2, 4)
    for fn, args in ((row_scales, (A, B, m, t, [W], [(0, 0), (0, 4)], w0_sq)),
                     (row_scale, (A, B, m.reshape(-1), None, W, w0_sq.reshape(-1)))):
        ref = fn(*args, 2.0, False)
        with torch.no_grad():
            got = fn(*args, 2.0, False)
        assert got.grad_fn is None and ref.grad_fn is None  # no input requires grad here
        torch.testing.assert_close(got, ref, rtol=0, atol=0)
    V = W + 2.0 * torch.cat([B[0] @ A[0], B[1] @ A[1]])  # independent: the norm of the built matrix
    expect = m.reshape(-1) / (V.norm(dim=1) + 0.1)
    with torch.no_grad():
        torch.testing.assert_close(row_scales(A, B, m, t, [W], [(0, 0), (0, 4)], w0_sq, 2.0, False).reshape(-1), expect)
