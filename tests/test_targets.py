"""Finding and naming linear-like targets, Spec matching, plan, and the shape of the rewritten graph.

The numerical oracle for unusual linear uses is the module itself with its weight replaced
by W + ΔW (ΔW = s · B A, transposed where the weight is stored (in, out)), computed here
independently of lowrank_fx's fold code.
"""

from __future__ import annotations

import copy

import models
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lowrank_fx as lfx
from lowrank_fx.adapt.capture import capture
from lowrank_fx.graph.heads import output_heads
from lowrank_fx.graph.record import Record
from lowrank_fx.graph.targets import find_targets

aten = torch.ops.aten
TOL = 1e-5


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours - ref).abs().max() / ref.abs().max()).item()


def lora(rank=2, alpha=4.0):
    return lfx.LoRA(rank=rank, alpha=alpha, init="nonzero")


def targets_of(gm):
    return find_targets(gm, Record.find(gm).aliases)


def dense_oracle(model: nn.Module, gm, weights: dict[str, tuple[str, str]]) -> nn.Module:
    """A copy of `model` with W += ΔW for {target name: (parameter name, layout)}."""
    oracle = copy.deepcopy(model)
    group = gm.lowrank_fx.default.lora
    with torch.no_grad():
        for target, (param, layout) in weights.items():
            unit = group.unit(target)
            delta = unit.scale * unit.lora_B @ unit.lora_A  # (out, in)
            oracle.get_parameter(param).add_(delta if layout == "out_in" else delta.t())
    return oracle


def check_against_oracle(model, gm, weights, *inputs):
    oracle = dense_oracle(model, gm, weights)
    with torch.no_grad():
        ours, base, expected = gm(*inputs), model(*inputs), oracle(*inputs)
    assert rel_err(expected, base) > 1e-3
    assert rel_err(ours, expected) <= TOL
    with torch.no_grad():
        assert rel_err(lfx.merge(gm)(*inputs), expected) <= TOL
    merged = copy.deepcopy(model)  # the original module with the merged state
    merged.load_state_dict(lfx.merged_state_dict(gm))
    with torch.no_grad():
        assert rel_err(merged(*inputs), expected) <= TOL


# ---------------------------------------------------------------------------------------
# Unusual linear uses.

class RawOps(nn.Module):
    """Every way of multiplying by a weight parameter without nn.Linear."""

    def __init__(self):
        super().__init__()
        self.raw_weight = nn.Parameter(torch.randn(8, 8) / 3)  # F.linear: (out, in)
        self.raw_bias = nn.Parameter(torch.randn(8))
        self.w_io = nn.Parameter(torch.randn(8, 6) / 3)  # x @ W: (in, out)
        self.w_oi = nn.Parameter(torch.randn(6, 8) / 3)  # x @ W.t(): (out, in)
        self.w_T = nn.Parameter(torch.randn(6, 8) / 3)  # x @ W.T: (out, in)
        self.mm_w = nn.Parameter(torch.randn(6, 5) / 3)  # torch.mm: (in, out)
        self.addmm_w = nn.Parameter(torch.randn(5, 4) / 3)  # torch.addmm: (in, out)
        self.addmm_b = nn.Parameter(torch.randn(4))

    def forward(self, x):
        x = F.linear(x, self.raw_weight, self.raw_bias)
        h = (x @ self.w_io + x @ self.w_oi.t() + x @ self.w_T.T).reshape(-1, 6)
        return torch.addmm(self.addmm_b, torch.mm(h, self.mm_w), self.addmm_w)


RAW_EXPECTED = {  # target name: (op, layout, (out, in), parameter)
    "raw": ("linear", "out_in", (8, 8), "raw_weight"),
    "w_io": ("matmul", "in_out", (6, 8), "w_io"),
    "w_oi": ("matmul", "out_in", (6, 8), "w_oi"),
    "w_T": ("matmul", "out_in", (6, 8), "w_T"),
    "mm_w": ("mm", "in_out", (5, 6), "mm_w"),
    "addmm_w": ("addmm", "in_out", (4, 5), "addmm_w"),
}


@pytest.mark.parametrize("path", ["export", "symbolic_trace"])
def test_raw_parameter_ops_are_targets_with_their_layout(path):
    model = RawOps()
    x = torch.randn(2, 3, 8)
    gm = capture(model, (x,) if path == "export" else None)
    found = {name: (t.op, t.layout, t.shape, t.weight) for name, t in targets_of(gm).items()}
    assert found == RAW_EXPECTED

    gm = lfx.rewrite(model, lfx.Spec(list(RAW_EXPECTED), method=lora()),
                     example_inputs=(x,) if path == "export" else None)
    check_against_oracle(model, gm, {n: (e[3], e[1]) for n, e in RAW_EXPECTED.items()}, x)
    if path == "export":  # one graph for every batch size and sequence length
        check_against_oracle(model, gm, {n: (e[3], e[1]) for n, e in RAW_EXPECTED.items()}, torch.randn(4, 5, 8))


class Twice(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.lin(torch.tanh(self.lin(x))))


def test_an_exported_graph_module_is_accepted():
    model = RawOps()
    x = torch.randn(2, 3, 8)
    exported = torch.export.export(model, (x,)).module()
    gm = lfx.rewrite(exported, lfx.Spec(["raw", "w_T"], method=lora()))
    assert sorted(gm.lowrank_fx.default.lora.target_names) == ["raw", "w_T"]
    check_against_oracle(model, gm, {"raw": ("raw_weight", "out_in"), "w_T": ("w_T", "out_in")}, x)


def test_linear_called_twice_shares_one_adapter():
    model = Twice()
    x = torch.randn(4, 8)
    gm = lfx.rewrite(model, lfx.Spec(["lin"], method=lora()), example_inputs=(x,))
    target = targets_of(gm)["lin"]
    assert len(target.sites) == 2
    group = gm.lowrank_fx.default.lora
    assert list(group.units) == ["lin"]
    calls = [n for n in gm.graph.nodes if n.op == "call_module" and n.target == "lowrank_fx.default.lora.units.lin"]
    assert len(calls) == 2
    check_against_oracle(model, gm, {"lin": ("lin.weight", "out_in")}, x)


def test_symbolic_trace_path_for_a_simple_module():
    model = Twice()
    x = torch.randn(4, 8)
    gm = lfx.rewrite(model, lfx.Spec(["lin", "head"], method=lora()))  # no example inputs
    assert not any(n.op == "call_module" and n.target in ("lin", "head") for n in gm.graph.nodes)
    assert sorted(gm.lowrank_fx.default.lora.target_names) == ["head", "lin"]
    assert list(lfx.plan(model, lfx.Spec("all-linear")).left_out) == ["head"]  # its result is the output
    check_against_oracle(model, gm, {"lin": ("lin.weight", "out_in"), "head": ("head.weight", "out_in")}, x)


def test_a_symbolically_traced_graph_module_is_accepted():
    model = Twice()
    x = torch.randn(4, 8)
    traced = torch.fx.symbolic_trace(model)
    code = traced.code
    gm = lfx.rewrite(traced, lfx.Spec(["lin"], method=lora()))
    assert traced.code == code  # the caller's graph is not edited
    check_against_oracle(model, gm, {"lin": ("lin.weight", "out_in")}, x)


def test_transformer_encoder_packed_in_proj():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(d_model=16, nhead=2, dim_feedforward=32, dropout=0.0, batch_first=True)
    model = nn.TransformerEncoder(layer, num_layers=1, enable_nested_tensor=False).eval()
    x = torch.randn(2, 5, 16)
    gm = capture(model, (x,))
    found = {name: t.shape for name, t in targets_of(gm).items()}
    assert found == {"layers.0.self_attn.in_proj": (48, 16), "layers.0.self_attn.out_proj": (16, 16),
                     "layers.0.linear1": (32, 16), "layers.0.linear2": (16, 32)}
    gm = lfx.rewrite(model, lfx.Spec(["in_proj", "out_proj"], method=lora()), example_inputs=(x,))
    check_against_oracle(model, gm, {"layers.0.self_attn.in_proj": ("layers.0.self_attn.in_proj_weight", "out_in"),
                                     "layers.0.self_attn.out_proj": ("layers.0.self_attn.out_proj.weight", "out_in")},
                         torch.randn(3, 7, 16))


def test_gpt2_conv1d_and_tied_head():
    case = models.build("gpt2")
    gm = capture(case.model, case.args, case.kwargs)
    targets = targets_of(gm)
    c_attn = targets["transformer.h.0.attn.c_attn"]
    assert (c_attn.op, c_attn.layout, c_attn.shape) == ("addmm", "in_out", (96, 32))
    assert (targets["transformer.h.0.mlp.c_fc"].shape, targets["transformer.h.0.mlp.c_proj"].shape) == ((128, 32), (32, 128))
    head = targets["lm_head"]  # named by its calling module, not by transformer.wte
    assert (head.op, head.layout, head.shape) == ("linear", "out_in", (128, 32))
    # The tied table is also read by an embedding: a target of its own, which all-linear leaves out.
    assert (targets["transformer.wte"].op, targets["transformer.wte"].shape) == ("embedding", (32, 128))
    assert output_heads(gm, targets) == {"lm_head"}

    rows = lfx.plan(gm, lfx.Spec("all-linear")).rows
    # Every Conv1D, including the MLP whose width 4·32 equals the vocabulary (128), but no head.
    assert [r.target for r in rows] == [f"transformer.h.{i}.{m}" for i in range(2)
                                        for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
    rows = lfx.plan(gm, lfx.Spec(["lm_head"])).rows
    assert [(r.target, r.shape) for r in rows] == [("lm_head", (128, 32))]


# ---------------------------------------------------------------------------------------
# Spec matching.

NAMES = [f"model.layers.{i}.{kind}" for i in range(2) for kind in
         ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.up_proj")] + ["lm_head"]


def matched(spec, heads=frozenset()):
    return list(spec.assign(NAMES, set(heads)))


def test_spec_glob_matches_whole_dotted_suffixes():
    assert matched(lfx.Spec(["q_proj"])) == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    assert matched(lfx.Spec(["*.q_proj"])) == matched(lfx.Spec(["q_proj"]))
    assert matched(lfx.Spec(["model.layers.1.self_attn.q_proj"])) == ["model.layers.1.self_attn.q_proj"]
    assert matched(lfx.Spec(["layers.1.*_proj"])) == [n for n in NAMES if ".1." in n]
    assert matched(lfx.Spec(["self_attn.*"])) == [n for n in NAMES if "self_attn" in n]
    with pytest.raises(lfx.SpecError):  # "proj" is not a whole dotted part of "q_proj"
        matched(lfx.Spec(["proj"]))


def test_spec_regex_exclude_and_all_linear():
    assert matched(lfx.Spec(["re:layers\\.0\\..*(q|v)_proj$"])) == ["model.layers.0.self_attn.q_proj",
                                                                    "model.layers.0.self_attn.v_proj"]
    assert matched(lfx.Spec(["*_proj"], exclude=["layers.1.*", "k_proj"])) == [
        "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj", "model.layers.0.mlp.up_proj"]
    assert matched(lfx.Spec("all-linear"), heads={"lm_head"}) == NAMES[:-1]
    assert matched(lfx.Spec(["lm_head"]), heads={"lm_head"}) == ["lm_head"]  # by name it can be adapted


def test_spec_with_one_method_per_pattern_first_match_wins():
    small, big = lora(rank=2), lora(rank=4)
    spec = lfx.Spec(targets={"q_proj": small, "*_proj": big})
    assigned = spec.assign(NAMES, set())
    assert assigned["model.layers.0.self_attn.q_proj"] is small
    assert assigned["model.layers.0.self_attn.k_proj"] is big
    assert "lm_head" not in assigned


# ---------------------------------------------------------------------------------------
# plan: a dry run.

def test_plan_table_and_totals():
    case = models.build("llama")
    model = case.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = lfx.plan(model, lfx.Spec(["q_proj", "v_proj"], method=lfx.LoRA(rank=4)),
                      example_inputs=case.args, example_kwargs=case.kwargs)
    rows = [(r.target, r.op, r.shape, r.trainable) for r in result.rows]
    # q: 32x32 -> 4·(32+32) = 256; v (2 kv heads of 8): 16x32 -> 4·(32+16) = 192.
    assert rows == [(f"model.layers.{i}.self_attn.{p}", "linear", shape, n) for i in range(2)
                    for p, shape, n in (("q_proj", (32, 32), 256), ("v_proj", (16, 32), 192))]
    assert result.trainable == 2 * (256 + 192)
    assert result.base == sum(p.numel() for p in model.parameters())
    text = str(result)
    for row in result.rows:
        assert row.target in text
    assert "4 targets" in text and "896" in text and "lora(rank=4" in text
    # Nothing changed: no adapters, weights trainable and equal.
    assert all(p.requires_grad for p in model.parameters())
    assert not hasattr(model, "lowrank_fx")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


# ---------------------------------------------------------------------------------------
# The rewritten graph.

def check_graph_shape(gm, names):
    """Each site: site -> call_module units.<key>(x) -> get_attr gate -> aten.addcmul(site, delta, gate);
    users read the addcmul."""
    targets = targets_of(gm)
    nodes = {n.name: n for n in gm.graph.nodes}
    for name in names:
        key = name.replace(".", "-")
        for site_name, x_index in zip(targets[name].sites, targets[name].activations):
            site = nodes[site_name]
            delta, gate, add = site.next, site.next.next, site.next.next.next
            assert (delta.op, delta.target) == ("call_module", f"lowrank_fx.default.lora.units.{key}")
            assert delta.args[0] is site.args[x_index]
            assert (gate.op, gate.target) == ("get_attr", "lowrank_fx_gates.default")
            assert (add.op, add.target, add.args) == ("call_function", aten.addcmul.default, (site, delta, gate))
            assert set(site.users) == {add}


def check_only_adapters_train(gm, adapter):
    trainable = [n for n, p in gm.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith(f"lowrank_fx.{adapter}.") for n in trainable)
    assert len(trainable) == 2 * len(getattr(gm.lowrank_fx, adapter).lora.units)


def test_rewritten_graph_structure_and_merge_removes_it():
    case = models.build("bert")
    gm = lfx.rewrite(case.model, lfx.Spec(["query", "value"], method=lora()),
                     example_inputs=case.args, example_kwargs=case.kwargs)
    names = gm.lowrank_fx.default.lora.target_names
    assert len(names) == 4
    check_graph_shape(gm, names)
    check_only_adapters_train(gm, "default")

    lfx.rewrite(gm, lfx.Spec(["key"], method=lora()), adapter="second")
    check_only_adapters_train(gm, "second")

    merged = lfx.merge(gm)
    assert not any(n.op == "call_module" and n.target.startswith("lowrank_fx.") for n in merged.graph.nodes)
    assert not any(n.target is aten.add.Tensor and "lowrank_fx" in n.meta for n in merged.graph.nodes)
    assert not any(name.startswith("lowrank_fx.") for name, _ in merged.named_parameters())
    sites = {n.target: 0 for n in merged.graph.nodes if n.op == "call_function"}
    assert aten.linear.default in sites
