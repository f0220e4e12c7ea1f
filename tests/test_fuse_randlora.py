"""RandLoRA's merged-product site (passes/fuse_sites.py, methods/randlora_merged.py): the fused graph
computes y' = x (W + g·ΔW)ᵀ + b in one product, with the rewritten graph's outputs and gradients.

Model: up (32 -> 64, tall) then down (64 -> 32, wide), rank 8, so D = 64, d = 32, R = 32 for both.
Break-evens of the merged form against the base product plus the factored Δy
(randlora_forms.merged_costs): forward D·d / (D + d) ≈ 21 tokens; backward with dx, tall
2·D·d·R / (R·(D + 2d) − D·d) = 64, wide 2·D·d·R / (2·R·(D + d) − D·d) = 32. SMALL (6 tokens)
sits below all of them, LARGE (80) above.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lowrank_fx as lfx
from lowrank_fx.methods import randlora_forms
from lowrank_fx.methods.randlora_merged import randlora_linear
from lowrank_fx.passes.fuse_sites import fuse_sites

IN, OUT, RANK = 32, 64, 8
SMALL, LARGE = (2, 3), (2, 40)
FORMS = ("auto", "dense", "factored")


def _rel(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@pytest.fixture(scope="module")
def graphs():
    """form -> (rewritten graph, its fused form), non-trivial diagonals, biases on both layers."""
    out = {}
    for form in FORMS:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(IN, OUT), nn.Linear(OUT, IN))
        gm = lfx.rewrite(model, lfx.Spec(targets=["0", "1"], method=lfx.RandLoRA(rank=RANK, init="nonzero", form=form)),
                         example_inputs=(torch.randn(*SMALL, IN),)).train()
        with torch.no_grad():
            for unit in gm.lowrank_fx.default.randlora.units.values():
                unit.lam.mul_(0.05)
                unit.gamma.uniform_(0.0, 2.0 / unit.gamma.shape[1])
        gm.base_model = model  # the plain model, for the base output (rewrite leaves it as it was)
        out[form] = gm, fuse_sites(gm)
    return out


def _step(module, gm, x):
    """y, then (dλ, dγ of every unit, dx) after a backward of a fixed linear functional of y."""
    gm.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    y = module(x)
    (y * torch.linspace(-1, 1, y.numel()).reshape(y.shape)).sum().backward()
    grads = {n: p.grad.clone() for n, p in gm.named_parameters() if p.requires_grad}
    return y.detach(), grads, x.grad


def test_break_evens_are_the_documented_ones():
    for tokens, expected in ((21, False), (22, True)):
        for tall in (True, False):
            costs = randlora_forms.merged_costs(tokens, OUT, IN, IN, tall)
            assert (costs[1] < costs[0]) is expected
    for tall, t_star in ((True, 64), (False, 32)):
        assert randlora_forms.use_dense("auto", randlora_forms.merged_costs(t_star + 1, OUT, IN, IN, tall, True))
        assert not randlora_forms.use_dense("auto", randlora_forms.merged_costs(t_star - 1, OUT, IN, IN, tall, True))


@pytest.mark.parametrize("form", FORMS)
def test_sites_merge_unless_factored_and_gm_is_untouched(graphs, form):
    gm, fused = graphs[form]
    merged = [n for n in fused.graph.nodes if n.target is randlora_linear]
    units = [n for n in fused.graph.nodes if n.meta.get("lowrank_fx", {}).get("role") == "delta"]
    assert (len(merged), len(units)) == ((0, 2) if form == "factored" else (2, 0))
    assert not any(n.target is randlora_linear for n in gm.graph.nodes)
    assert {id(p) for p in fused.parameters()} == {id(p) for p in gm.parameters()}


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("shape", [SMALL, LARGE], ids=["small", "large"])
def test_outputs_and_gradients_equal_the_rewritten_graph(graphs, form, shape):
    gm, fused = graphs[form]
    x = torch.randn(*shape, IN)
    y, grads, grad_x = _step(gm, gm, x)
    got_y, got_grads, got_x = _step(fused, gm, x)
    assert _rel(got_y, y) < 1e-5 and _rel(got_x, grad_x) < 1e-5
    assert got_grads.keys() == grads.keys() and len(grads) == 4  # λ, γ of up and down
    assert all(_rel(got_grads[n], grads[n]) < 1e-5 for n in grads)


@pytest.mark.parametrize("form", FORMS)
def test_gate_zero_gives_the_base_exactly(graphs, form):
    gm, fused = graphs[form]
    x = torch.randn(*LARGE, IN)
    try:
        lfx.set_active_adapters(gm, [])
        with torch.no_grad():
            assert torch.equal(fused(x), gm.base_model(x))
    finally:
        lfx.set_active_adapters(gm, ["default"])


@pytest.mark.parametrize("form", ["auto", "dense"])
def test_saves_no_weight_sized_tensor_but_the_weights_and_bases(graphs, form):
    gm, fused = graphs[form]
    group = gm.lowrank_fx.default.randlora
    free = {t.data_ptr() for t in (gm.get_parameter("0.weight"), gm.get_parameter("1.weight"), group.basis_A,
                                   group.basis_B)}  # parameters and the shared bases: saved, not copied
    saved = []

    def pack(t):
        saved.append(t)
        return t

    x = torch.randn(2, 12, IN, requires_grad=True)  # 24 tokens: past the forward break-even, x·(64) < 64·32
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = fused(x)
    y.sum().backward()
    big = [t for t in saved if t.numel() >= OUT * IN]
    assert big and all(t.data_ptr() in free for t in big)


@pytest.mark.parametrize("form", FORMS)
def test_compiled_never_recompiles_across_the_break_even(graphs, form):
    gm, fused = graphs[form]
    torch._dynamo.reset()
    compiled = torch.compile(fused, backend="aot_eager", fullgraph=True, dynamic=True)
    try:
        with torch._dynamo.config.patch(error_on_recompile=True):
            for shape in (SMALL, LARGE, (2, 7)):
                x = torch.randn(*shape, IN)
                y, grads, grad_x = _step(gm, gm, x)
                got_y, got_grads, got_x = _step(compiled, gm, x)
                assert _rel(got_y, y) < 1e-5 and _rel(got_x, grad_x) < 1e-5
                assert all(_rel(got_grads[n], grads[n]) < 1e-5 for n in grads)
    finally:
        torch._dynamo.reset()


def test_auto_merges_past_the_break_evens_only(graphs, monkeypatch):
    """Eager auto: below every break-even no pass builds W + g·ΔW; above, every pass does
    (forward and backward of both sites)."""
    from lowrank_fx.methods import randlora_merged

    calls = []
    build = randlora_merged.merged_weight
    monkeypatch.setattr(randlora_merged, "merged_weight", lambda *a: calls.append(1) or build(*a))
    gm, fused = graphs["auto"]
    for shape, expected in ((SMALL, 0), (LARGE, 4)):
        calls.clear()
        _step(fused, gm, torch.randn(*shape, IN))
        assert len(calls) == expected


def test_layer_blocks_merge_inside():
    """A graph structured into layer blocks gets its RandLoRA sites merged inside each block."""
    from models import build

    case = build("llama")
    spec = lfx.Spec(["*.q_proj", "*.v_proj", "*.up_proj", "*.down_proj"],
                    method=lfx.RandLoRA(rank=8, init="nonzero", form="dense"))
    gm = lfx.rewrite(case.model, spec, example_inputs=case.args, example_kwargs=case.kwargs, layers="auto").eval()
    fused = fuse_sites(gm).eval()
    block = fused.get_submodule("model.layers.0")
    assert sum(n.target is randlora_linear for n in block.graph.nodes) == 4

    def run(module):
        gm.zero_grad(set_to_none=True)
        out = case.output(module(*case.other_args, **case.other_kwargs))
        (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
        return out.detach(), {n: p.grad.clone() for n, p in gm.named_parameters() if p.grad is not None}

    (expected, expected_grads), (got, grads) = run(gm), run(fused)
    assert _rel(got, expected) < 1e-5 and grads.keys() == expected_grads.keys()
    assert all(_rel(grads[n], expected_grads[n]) < 1e-5 for n in grads)
