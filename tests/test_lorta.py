"""LoRTA against a dense reference built here, straight from the paper's formula.

For each target the test derives (layer l, matrix m) itself, builds

    ΔW = s · [ (A diag(C_H[h] ⊙ C_L[l] ⊙ C_M[m]) B)ᵀ  for h = 0..H-1 ]  stacked over heads

with an explicit loop, and runs the original model with W + ΔW through
torch.func.functional_call. Outputs and the gradients of A, B, C_H, C_L, C_M must match
the rewritten graph (which never builds ΔW while training).
"""

from __future__ import annotations

import re

import models
import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import lowrank_fx as lfx
from lowrank_fx.errors import SpecError
from lowrank_fx.methods.lorta_index import LAYER_PATTERN, layer_key, matrix_key

RANK, TOL = 4, 1e-5
LLAMA = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Tiny Llama (hidden 32, 4 heads of 8, 2 KV heads, MLP 64, 2 layers): groups by weight shape,
# matrix types in graph order.
LLAMA_GROUPS = {
    "lorta_32x32": {"leaves": ["q_proj", "o_proj"], "d_in": 32, "H": 4},
    "lorta_16x32": {"leaves": ["k_proj", "v_proj"], "d_in": 32, "H": 2},
    "lorta_64x32": {"leaves": ["gate_proj", "up_proj"], "d_in": 32, "H": 8},
    "lorta_32x64": {"leaves": ["down_proj"], "d_in": 64, "H": 4},
}
D_HEAD = 8


def rel_err(ours, ref) -> float:
    return ((ours - ref).abs().max() / ref.abs().max()).item()


def reference_delta(factors: dict, layer: int, matrix: int, scale: float) -> torch.Tensor:
    """ΔW (H·d_head, d_in), head block by head block."""
    A, B = factors["A"], factors["B"]
    blocks = []
    for h in range(factors["C_H"].shape[0]):
        c = factors["C_H"][h] * factors["C_L"][layer] * factors["C_M"][matrix]  # (r,)
        blocks.append((A @ torch.diag(c) @ B).t())  # (d_head, d_in)
    return scale * torch.cat(blocks, dim=0)


@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(0)
    case = models.build("llama")
    gm = lfx.rewrite(case.model, lfx.Spec(targets=LLAMA, method=lfx.LoRTA(rank=RANK, init="nonzero")),
                     example_inputs=case.args, example_kwargs=case.kwargs)
    return case, gm


def test_matches_dense_reference(llama):
    case, gm = llama
    method = lfx.LoRTA(rank=RANK)
    groups = gm.lowrank_fx.default
    assert sorted(groups) == sorted(LLAMA_GROUPS)
    factors = {g: {k: getattr(groups[g], k).detach().clone().requires_grad_() for k in ("A", "B", "C_H", "C_L", "C_M")}
               for g in groups}
    deltas = {}
    for name, _ in case.model.named_parameters():
        leaf = name.removesuffix(".weight").rsplit(".", 1)[-1]
        if leaf not in LLAMA:
            continue
        group = next(g for g, info in LLAMA_GROUPS.items() if leaf in info["leaves"])
        layer = int(re.search(r"layers\.(\d+)\.", name).group(1))
        matrix = LLAMA_GROUPS[group]["leaves"].index(leaf)
        deltas[name] = reference_delta(factors[group], layer, matrix, method.scale)
    assert len(deltas) == 14
    weights = {name: case.model.get_parameter(name).detach() + delta for name, delta in deltas.items()}

    gm.zero_grad()
    ours = case.output(gm(*case.args, **case.kwargs))
    ref = case.output(torch.func.functional_call(case.model, weights, case.args, case.kwargs))
    assert rel_err(ours, ref) <= TOL
    loss_weights = torch.randn_like(ours)
    (ours * loss_weights).sum().backward()
    (ref * loss_weights).sum().backward()
    for g, fs in factors.items():
        for k, tensor in fs.items():
            assert rel_err(getattr(groups[g], k).grad, tensor.grad) <= TOL, (g, k)
    for name, delta in deltas.items():  # the ΔW that folding uses is the formula's too
        target = name.removesuffix(".weight")
        assert rel_err(_group_of(gm, target).delta_weight(target), delta.detach()) <= TOL, target


def _group_of(gm, target: str):
    record = gm.meta["lowrank_fx"]
    return gm.lowrank_fx.default[record.adapters["default"].groups[target]]


def test_parameter_count_and_plan(llama):
    case, gm = llama
    plan = lfx.plan(case.model, lfx.Spec(targets=LLAMA, method=lfx.LoRTA(rank=RANK)),
                    example_inputs=case.args, example_kwargs=case.kwargs)
    assert all(row.trainable == 0 for row in plan.rows)  # every LoRTA parameter is shared
    total = 0
    for g, info in LLAMA_GROUPS.items():
        L, M = 2, len(info["leaves"])
        expected = RANK * (info["d_in"] + D_HEAD + info["H"] + L + M)
        assert sum(p.numel() for p in gm.lowrank_fx.default[g].parameters()) == expected
        assert plan.shared[g] == expected
        assert plan.modes[g] == f"LoRTA modes d_in={info['d_in']}, d_head={D_HEAD}, H={info['H']}, L={L}, M={M}"
        total += expected
    assert plan.trainable == total
    assert f"[shared by group lorta_32x32] {plan.modes['lorta_32x32']}" in str(plan)


def test_default_init_starts_at_the_base_model():
    case = models.build("llama")
    base = case.output(case.model(*case.args, **case.kwargs))
    gm = lfx.rewrite(case.model, lfx.Spec(targets=LLAMA, method=lfx.LoRTA(rank=RANK)),
                     example_inputs=case.args, example_kwargs=case.kwargs)
    group = gm.lowrank_fx.default["lorta_32x32"]
    assert not group.B.any()
    assert group.A.abs().max() <= 1 / 32 ** 0.5
    for name in ("C_H", "C_L", "C_M"):
        assert getattr(group, name).min() >= 0 and getattr(group, name).max() <= 1
    torch.testing.assert_close(case.output(gm(*case.args, **case.kwargs)), base, rtol=0, atol=0)


# ---- index rules and errors, on a small symbolically traced stack --------------------------

class _Pair(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.q, self.k = nn.Linear(width, width), nn.Linear(width, width)


class _Block(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.self, self.cross = _Pair(width), _Pair(width)


class _Stack(nn.Module):
    """layers.<i>.self.q / .k and layers.<i>.cross.q / .k, plus an unindexed head."""

    def __init__(self, width=16, depth=3):
        super().__init__()
        self.layers = nn.ModuleList(_Block(width) for _ in range(depth))
        self.head = nn.Linear(width, width)

    def forward(self, x):
        for block in self.layers:
            x = x + block.self.q(x) * block.self.k(x) + block.cross.q(x) - block.cross.k(x)
        return self.head(x)


def test_index_parsing_of_model_families():
    cases = {
        "model.layers.3.self_attn.q_proj": ("model.layers.3", "self_attn.q_proj"),
        "transformer.h.0.attn.c_attn": ("transformer.h.0", "attn.c_attn"),
        "encoder.layer.1.attention.self.query": ("encoder.layer.1", "attention.self.query"),
        "decoder.block.2.layer.1.EncDecAttention.q": ("decoder.block.2", "layer.1.EncDecAttention.q"),
        "layers.0.attention.o_proj": ("layers.0", "attention.o_proj"),
    }
    for name, (layer, matrix) in cases.items():
        assert layer_key(name, LAYER_PATTERN) == layer
        assert matrix_key(name, layer, None) == matrix
    assert matrix_key("decoder.block.2.layer.1.EncDecAttention.q", "decoder.block.2", r"(\w+)\.\w+$") == "EncDecAttention"
    assert layer_key("stack.blk12.mix.q", r"blk\d+") == "stack.blk12"


def test_layers_and_matrices_of_a_stack():
    model = _Stack()
    gm = lfx.rewrite(model, lfx.Spec(targets=["re:layers"], method=lfx.LoRTA(rank=2, head_dim=4)))
    group = gm.lowrank_fx.default["lorta_16x16"]
    assert group.modes == {"d_in": 16, "d_head": 4, "H": 4, "L": 3, "M": 4}
    unit = group.unit("layers.2.cross.k")
    assert (unit.layer, unit.matrix) == (2, 3)  # matrices in graph order: self.q, self.k, cross.q, cross.k
    x = torch.randn(2, 5, 16)
    torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)  # B = 0


def test_training_never_builds_the_dense_update():
    class Products(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.shapes = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.bmm, torch.ops.aten.addmm):
                self.shapes.add(tuple(out.shape))
            return out

    gm = lfx.rewrite(_Stack(), lfx.Spec(targets=["re:layers"], method=lfx.LoRTA(rank=2, head_dim=4, init="nonzero")))
    x = torch.randn(2, 3, 16, requires_grad=True)
    with Products() as seen:
        gm(x).square().sum().backward()
    assert seen.shapes and not {(16, 16), (4, 4, 16), (4, 16, 4)} & seen.shapes  # no product is a ΔW
    assert all(p.grad.abs().sum() > 0 for p in gm.lowrank_fx.default["lorta_16x16"].parameters())


def test_head_dim_comes_from_the_model(llama):
    _case, gm = llama
    assert gm.lowrank_fx.default["lorta_32x32"].modes["d_head"] == 8  # Llama's head_dim
    # No attention op in the graph: one head per group, and the group says why.
    group = lfx.rewrite(_Stack(), lfx.Spec(targets=["re:layers"], method=lfx.LoRTA(rank=2))).lowrank_fx.default["lorta_16x16"]
    assert group.modes == {"d_in": 16, "d_head": 16, "H": 1, "L": 3, "M": 4}
    assert "one head: the graph has no scaled-dot-product attention op" in group.describe()


def test_targets_without_a_layer_index_form_a_group_of_their_own():
    model = _Stack()
    gm = lfx.rewrite(model, lfx.Spec(targets=["re:."], method=lfx.LoRTA(rank=2, head_dim=4, init="nonzero")))
    groups = gm.lowrank_fx.default
    assert list(groups) == ["lorta_16x16", "lorta_16x16_nolayer"]  # the same shape, apart
    assert groups["lorta_16x16"].modes == {"d_in": 16, "d_head": 4, "H": 4, "L": 3, "M": 4}
    assert groups["lorta_16x16_nolayer"].modes == {"d_in": 16, "d_head": 4, "H": 4, "L": 1, "M": 1}
    assert groups["lorta_16x16_nolayer"].target_names == ["head"]
    assert "no layer index" in groups["lorta_16x16_nolayer"].describe()
    x = torch.randn(2, 5, 16)
    merged = lfx.merge(gm)
    torch.testing.assert_close(merged(x), gm(x), rtol=1e-5, atol=1e-5)
    # The head's update is its own group's CP slice: layer 0, matrix 0.
    factors = {k: getattr(groups["lorta_16x16_nolayer"], k).detach() for k in ("A", "B", "C_H", "C_L", "C_M")}
    expected = reference_delta(factors, 0, 0, scale=8.0 / 2)  # s = alpha / r
    torch.testing.assert_close(groups["lorta_16x16_nolayer"].delta_weight("head"), expected, rtol=1e-5, atol=1e-6)


def test_rank_may_exceed_a_slice_of_the_tensor():
    # The CP rank of a group's tensor is not bounded by one layer's (out, in).
    group = lfx.rewrite(_Stack(), lfx.Spec(targets=["re:layers"], method=lfx.LoRTA(rank=17, head_dim=4))).lowrank_fx.default["lorta_16x16"]
    assert group.A.shape == (16, 17)


@pytest.mark.parametrize("method, pattern, message", [
    (lfx.LoRTA(rank=2, head_dim=5), ["re:layers"], r"head_dim 5 does not divide the output width 16"),
    (lfx.LoRTA(rank=2, head_dim=4, matrix_pattern=r"\w+$"), ["re:layers"],
     r"maps layers.0.self.q and layers.0.cross.q to the same layer 'layers.0' and matrix 'q'"),
    (lfx.LoRTA(rank=2, head_dim=4, layer_pattern=r"blocks\.\d+"), ["re:layers"], r"could not find a layer index"),
    (lfx.LoRTA(rank=2, head_dim=4, layer_pattern=r"layers\.\d+"), ["re:."], r"layer index in target 'head'"),
])
def test_errors(method, pattern, message):
    with pytest.raises(SpecError, match=message):
        lfx.rewrite(_Stack(), lfx.Spec(targets=pattern, method=method))


def test_bad_options():
    with pytest.raises(SpecError, match="head_dim must be a positive integer"):
        lfx.LoRTA(head_dim=0)
    with pytest.raises(SpecError, match="did you mean 'head_dim'"):
        lfx.LoRTA(head_dims=8)
    with pytest.raises(SpecError, match="layer_pattern '\\(' is not a regular expression"):
        lfx.LoRTA(layer_pattern="(")
