"""RandLoRA: parity with PEFT's RandLoraConfig, full rank, bases, and what training keeps in memory.

Parity: we rewrite a tiny model, build PEFT's RandLoRA on a deep copy, copy our bases and
diagonals into it (our layout is PEFT's: basis_A (r, d_max) = randlora_A (r, 1, d_max),
basis_B (D_max, N_max·r) = randlora_B (D_max, N_max, r) flattened), and compare outputs
and the gradients of λ and γ for L = Σ out ⊙ R: max|ours - peft| / max|peft| ≤ 1e-5.
"""

from __future__ import annotations

import copy
import math

import models
import pytest
import torch
from peft import RandLoraConfig, get_peft_model
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import lowrank_fx as lfx

RANK, TOL = 8, 1e-5
TARGETS = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
}


def rel_err(ours, ref) -> float:
    return ((ours - ref).abs().max() / ref.abs().max()).item()


def _rewrite(case, patterns, method):
    return lfx.rewrite(case.model, lfx.Spec(targets=patterns, method=method),
                       example_inputs=case.args, example_kwargs=case.kwargs)


def _randomize(group, lam_scale: float = 1.0) -> None:
    """Non-trivial diagonals: λ as init="nonzero" draws it (times lam_scale), γ around its init 1/d."""
    with torch.no_grad():
        for unit in group.units.values():
            unit.lam.mul_(lam_scale)
            unit.gamma.uniform_(0.0, 2.0 / unit.gamma.shape[1])


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_matches_peft(family):
    case = models.build(family)
    reference = copy.deepcopy(case.model)
    gm = _rewrite(case, TARGETS[family], lfx.RandLoRA(rank=RANK, init="nonzero"))
    group = gm.lowrank_fx.default.randlora
    _randomize(group, lam_scale=0.05)  # s = 80: keep ΔW near W's size, so fp32 stays well conditioned

    config = RandLoraConfig(r=RANK, randlora_alpha=640, target_modules=TARGETS[family],
                            fan_in_fan_out=(family == "gpt2"))
    peft_model = get_peft_model(reference, config)
    tuner = peft_model.base_model
    assert tuner.randlora_A["default"].shape == (RANK, 1, group.basis_A.shape[1])
    assert tuner.randlora_B["default"].shape == (group.basis_B.shape[0], group.basis_B.shape[1] // RANK, RANK)
    tuner.randlora_A["default"] = group.basis_A.reshape(RANK, 1, -1).clone()
    tuner.randlora_B["default"] = group.basis_B.reshape(group.basis_B.shape[0], -1, RANK).clone()
    layers = {name: m for name, m in peft_model.get_base_model().named_modules() if hasattr(m, "randlora_lambda")}
    assert sorted(layers) == sorted(group.target_names)
    with torch.no_grad():
        for name, layer in layers.items():
            unit = group.unit(name)
            assert layer.scaling["default"] == unit.scale == 640 / RANK
            layer.randlora_lambda["default"].copy_(unit.lam)
            layer.randlora_gamma["default"].copy_(unit.gamma)

    ours = case.output(gm(*case.args, **case.kwargs))
    theirs = case.output(peft_model(*case.args, **case.kwargs))
    assert rel_err(ours, theirs) <= TOL
    weights = torch.randn_like(ours)
    (ours * weights).sum().backward()
    (theirs * weights).sum().backward()
    for name, layer in layers.items():
        unit = group.unit(name)
        assert rel_err(unit.lam.grad, layer.randlora_lambda["default"].grad) <= TOL, name
        assert rel_err(unit.gamma.grad, layer.randlora_gamma["default"].grad) <= TOL, name


def test_defaults_follow_peft():
    """r = 32, alpha = 640, s = alpha / r, λ = 0, γ = 1/d: the adapted model starts as the base."""
    method = lfx.RandLoRA()
    assert (method.rank, method.alpha, method.scale) == (32, 640.0, 20.0)
    model = nn.Sequential(nn.Linear(96, 40), nn.Linear(40, 96))
    x = torch.randn(3, 96)
    gm = lfx.rewrite(model, lfx.Spec(targets=["0", "1"], method=method))
    group = gm.lowrank_fx.default.randlora
    for name, (n, d) in {"0": (2, 40), "1": (2, 40)}.items():
        unit = group.unit(name)
        assert unit.lam.shape == (32, n) and not unit.lam.any()
        assert unit.gamma.shape == (n, d) and torch.all(unit.gamma == 1.0 / d)
    torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)


def test_update_is_full_rank():
    """N·r ≥ d, so a RandLoRA update has rank d = min(out, in), for both orientations."""
    model = nn.Sequential(nn.Linear(24, 40), nn.Linear(40, 24))
    gm = lfx.rewrite(model, lfx.Spec(targets=["0", "1"], method=lfx.RandLoRA(rank=4, init="nonzero")))
    group = gm.lowrank_fx.default.randlora
    _randomize(group)
    for name in ("0", "1"):
        delta = group.delta_weight(name).double()
        assert delta.shape == model.get_submodule(name).weight.shape
        assert torch.linalg.matrix_rank(delta) == 24


def test_bases_regenerated_from_seed_and_not_saved():
    model = nn.Sequential(nn.Linear(16, 32), nn.Linear(32, 16))
    def make(**kw):
        return lfx.rewrite(model, lfx.Spec(targets=["0", "1"], method=lfx.RandLoRA(rank=4, **kw))).lowrank_fx.default.randlora
    first, again, other = make(seed=3), make(seed=3), make(seed=4)
    assert first.basis_A.shape == (4, 32) and first.basis_B.shape == (32, 32)  # d_max = D_max = 32, N_max = 8
    assert torch.equal(first.basis_A, again.basis_A) and torch.equal(first.basis_B, again.basis_B)
    assert not torch.equal(first.basis_A, other.basis_A)
    assert not any("basis" in key for key in first.state_dict())
    for basis in (first.basis_A, first.basis_B):
        assert basis.std().item() == pytest.approx(1.0, abs=1e-5)

    sparse = make(sparse=True).basis_B
    values = sparse.unique()
    assert len(values) == 3 and values[0] == -values[2] and values[1] == 0
    assert (sparse != 0).float().mean().item() == pytest.approx(1 / 3, abs=0.08)
    assert sparse.std().item() == pytest.approx(1.0, abs=1e-5)


def test_rank_above_dimension_uses_one_basis_as_peft():
    """rank 8 on a 5x32 head: N = 1 (λ (8, 1), γ (1, 5)), as PEFT, with PEFT's outputs and gradients."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32), nn.GELU(), nn.Linear(32, 5))
    reference = copy.deepcopy(model)
    gm = lfx.rewrite(model, lfx.Spec(targets=["0", "2"], method=lfx.RandLoRA(rank=8, init="nonzero")))
    group = gm.lowrank_fx.default.randlora
    _randomize(group, lam_scale=0.05)
    head = group.unit("2")
    assert head.lam.shape == (8, 1) and head.gamma.shape == (1, 5) and group.unit("0").lam.shape == (8, 4)
    assert torch.linalg.matrix_rank(group.delta_weight("2").double()) == 5  # full rank

    peft_model = get_peft_model(reference, RandLoraConfig(r=8, randlora_alpha=640, target_modules=["0", "2"]))
    tuner = peft_model.base_model
    tuner.randlora_A["default"] = group.basis_A.reshape(8, 1, -1).clone()
    tuner.randlora_B["default"] = group.basis_B.reshape(group.basis_B.shape[0], -1, 8).clone()
    layers = {name: m for name, m in peft_model.get_base_model().named_modules() if hasattr(m, "randlora_lambda")}
    with torch.no_grad():
        for name, layer in layers.items():
            assert layer.randlora_lambda["default"].shape == group.unit(name).lam.shape
            layer.randlora_lambda["default"].copy_(group.unit(name).lam)
            layer.randlora_gamma["default"].copy_(group.unit(name).gamma)
    x = torch.randn(3, 4, 32)
    ours, theirs = gm(x), peft_model(x)
    assert rel_err(ours, model(x)) > 1e-3
    assert rel_err(ours, theirs) <= TOL
    weights = torch.randn_like(ours)
    (ours * weights).sum().backward()
    (theirs * weights).sum().backward()
    for name, layer in layers.items():
        assert rel_err(group.unit(name).lam.grad, layer.randlora_lambda["default"].grad) <= TOL, name
        assert rel_err(group.unit(name).gamma.grad, layer.randlora_gamma["default"].grad) <= TOL, name


# ---- memory: what training keeps, eager and compiled -------------------------------------

IN, OUT, R, TOKENS = 48, 96, 4, (2, 3)  # d = 48, N = 12: r·N·d = 2304, far above 2·3·96


class _MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(IN, OUT), nn.Linear(OUT, IN)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def _mlp_graph(form="auto"):
    method = lfx.RandLoRA(rank=R, init="nonzero", form=form)
    gm = lfx.rewrite(_MLP(), lfx.Spec(targets=["up", "down"], method=method))
    _randomize(gm.lowrank_fx.default.randlora)
    return gm


LIMIT = R * math.ceil(IN / R) * IN  # r·N·d of both targets (d = 48 for up and down)


class _MatmulShapes(TorchDispatchMode):
    """Records the output shape of every matrix product run under it."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.bmm, torch.ops.aten.addmm, torch.ops.aten.matmul):
            self.shapes.append(tuple(out.shape))
        return out


@pytest.mark.parametrize("form", ["factored", "dense"])
def test_eager_backward_keeps_no_large_activation_nor_dense_delta(form):
    """Neither form keeps ΔW (out, in) or Â (r·N, d) for backward; the dense form builds ΔW
    inside each pass, the factored form never."""
    gm = _mlp_graph(form)
    owned = {t.untyped_storage().data_ptr() for t in list(gm.parameters()) + list(gm.buffers())}
    large = []

    def pack(tensor):
        if tensor.numel() >= LIMIT and tensor.untyped_storage().data_ptr() not in owned:
            large.append(tuple(tensor.shape))
        return tensor

    x = torch.randn(*TOKENS, IN, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), _MatmulShapes() as products:
        gm(x).square().sum().backward()
    assert large == []
    assert bool({(OUT, IN), (IN, OUT)} & set(products.shapes)) == (form == "dense")  # ΔW of up / down
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in gm.parameters() if p.requires_grad)


@pytest.mark.parametrize("form", ["factored", "dense", "auto"])
def test_compiled_matches_eager_and_saves_no_large_tensor(form):
    from torch._dynamo.backends.common import aot_autograd
    from torch._dynamo.backends.debugging import boxed_nop
    from torch._functorch.partitioners import min_cut_rematerialization_partition

    graphs = {}

    def keep(kind):
        def compiler(graph, inputs):
            graphs[kind] = graph
            return boxed_nop(graph, inputs)
        return compiler

    # aot_eager with its own partitioner, plus a look at the forward and backward graphs.
    backend = aot_autograd(fw_compiler=keep("forward"), bw_compiler=keep("backward"),
                           partition_fn=min_cut_rematerialization_partition, keep_inference_input_mutations=True)
    gm = _mlp_graph(form)
    x = torch.randn(*TOKENS, IN, requires_grad=True)
    compiled = torch.compile(gm, backend=backend, fullgraph=True, dynamic=True)  # symbolic token count
    out = compiled(x)
    out.square().sum().backward()
    grads = [p.grad.clone() for p in gm.parameters() if p.requires_grad]
    gm.zero_grad()
    eager = gm(x)
    eager.square().sum().backward()
    eager_grads = [p.grad.clone() for p in gm.parameters() if p.requires_grad]
    torch.testing.assert_close(out, eager, rtol=1e-6, atol=1e-6)
    for got, want in zip(grads, eager_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)

    torch._dynamo.reset()  # and the stock backend, by name
    gm.zero_grad()
    stock = torch.compile(gm, backend="aot_eager", fullgraph=True)(x)
    stock.square().sum().backward()
    torch.testing.assert_close(stock, eager, rtol=1e-6, atol=1e-6)
    for got, want in zip([p.grad for p in gm.parameters() if p.requires_grad], eager_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)

    forward = graphs["forward"].graph
    returned = list(forward.output_node().args[0])
    saved = [n for n in returned[1:]  # inputs (weights, bases, x) are kept anyway; sizes are not tensors
             if n.op != "placeholder" and isinstance(n.meta["val"], torch.Tensor)]
    assert saved and all(n.meta["val"].numel() < LIMIT for n in saved), [n.meta["val"].shape for n in saved]
    # "auto" holds both forms of each pass, one torch.cond per site on the symbolic token count
    # (randlora_op.py), whose products sit in its branches' graphs; the fixed forms
    # hold theirs: the dense form builds ΔW in each pass (and, as checked above, does not keep it),
    # the factored form never
    for graph in (forward, graphs["backward"].graph):
        assert sum(n.target is torch.ops.higher_order.cond for n in graph.nodes) == (2 if form == "auto" else 0)
        products = [tuple(n.meta["val"].shape) for n in graph.nodes
                    if n.op == "call_function" and n.target in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default)]
        weight_sized = [shape for shape in products if shape in ((OUT, IN), (IN, OUT))]  # static sizes only
        assert bool(weight_sized) == (form == "dense")
