"""Folding: `lfx.merge` and `lfx.merged_state_dict` against the adapted graph as oracle.

ΔW = s · B A (out, in) is added to W in W's own layout (Conv1D stores W as (in, out)), in
fp32 or wider, and cast back to W's dtype. Checked: the merged graph and the ORIGINAL model
loaded with the merged state reproduce the adapted outputs at shapes other than the capture
shapes; tied weights; the input graph is never modified; non-finite updates are refused.
"""

from __future__ import annotations

import models
import pytest
import torch
from torch import nn

import lowrank_fx as lfx

TOL = 1e-5


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours - ref).abs().max() / ref.abs().max()).item()


def lora(rank=4, alpha=8.0, **kw):
    return lfx.LoRA(rank=rank, alpha=alpha, init="nonzero", **kw)


def adapter_leftovers(gm: torch.fx.GraphModule) -> list[str]:
    """Nodes and parameters of a graph that belong to an adapter (none after folding)."""
    keep = ("lowrank_fx_modes", "lowrank_fx_untied")
    nodes = [str(n.target) for n in gm.graph.nodes
             if "lowrank_fx." in str(n.target) and not str(n.target).startswith(keep)]
    params = [name for name, _ in gm.named_parameters() if name.startswith("lowrank_fx.")]
    return nodes + params


def snapshot(gm: torch.fx.GraphModule) -> tuple[str, dict[str, torch.Tensor]]:
    return gm.code, {k: v.detach().clone() for k, v in gm.state_dict().items()}


def assert_unchanged(gm, before) -> None:
    code, state = before
    assert gm.code == code
    now = gm.state_dict()
    assert set(now) == set(state)
    for key, value in state.items():
        assert torch.equal(now[key], value), key


def run(module, args, kwargs, case=None):
    with torch.no_grad():
        out = module(*args, **kwargs)
    return case.output(out) if case is not None else out


# ---------------------------------------------------------------------------------------
# All five families, "all-linear".

# Every linear-like target but the output head: the vocabulary head (llama, gpt2, t5), and
# BERT's and ViT's pooler.dense, whose tanh is the model output pooler_output. GPT-2's MLP
# (4·32 = 128 wide) and T5's attention (32 wide, like its relative-position table) are as
# wide as an embedding table, yet they are hidden layers, not heads.
ALL_LINEAR_COUNTS = {"llama": 14, "gpt2": 8, "bert": 12, "t5": 32, "vit": 12}


@pytest.mark.parametrize("family", models.FAMILIES)
def test_fold_reproduces_adapted_outputs(family):
    case = models.build(family)
    keys = list(case.model.state_dict())
    gm = lfx.rewrite(case.model, lfx.Spec("all-linear", method=lora()),
                     example_inputs=case.args, example_kwargs=case.kwargs)
    names = gm.lowrank_fx.default.lora.target_names
    assert len(names) == ALL_LINEAR_COUNTS[family] and "lm_head" not in names
    other = (case.other_args, case.other_kwargs)
    adapted = run(gm, *other, case)
    assert rel_err(adapted, run(case.model, *other, case)) > 1e-3  # the adapters do something

    before = snapshot(gm)
    merged = lfx.merge(gm)
    assert_unchanged(gm, before)
    assert adapter_leftovers(merged) == []
    assert rel_err(run(merged, *other, case), adapted) <= TOL
    assert rel_err(run(merged, case.args, case.kwargs, case), run(gm, case.args, case.kwargs, case)) <= TOL

    state = lfx.merged_state_dict(gm)
    assert list(state) == keys
    missing, unexpected = case.model.load_state_dict(state, strict=False)
    assert (missing, unexpected) == ([], [])
    assert rel_err(run(case.model, *other, case), adapted) <= TOL


# ---------------------------------------------------------------------------------------
# GPT-2: lm_head is the token embedding (tied); Conv1D weights are stored (in, out).

def test_gpt2_tied_head_folds_into_an_untied_copy():
    case = models.build("gpt2")
    model = case.model
    assert model.lm_head.weight is model.transformer.wte.weight
    embedding = model.transformer.wte.weight.detach().clone()
    gm = lfx.rewrite(model, lfx.Spec(["lm_head", "c_attn"], method=lora()),
                     example_inputs=case.args, example_kwargs=case.kwargs)
    other = (case.other_args, case.other_kwargs)
    adapted = run(gm, *other, case)
    delta = gm.lowrank_fx.default.lora.delta_weight("lm_head")

    with pytest.raises(lfx.MergeError, match="tied") as info:
        lfx.merged_state_dict(gm)
    assert "lm_head.weight" in str(info.value) and "transformer.wte.weight" in str(info.value)
    assert "load_merged" in str(info.value)

    merged = lfx.merge(gm)
    assert rel_err(run(merged, *other, case), adapted) <= TOL
    assert torch.equal(merged.get_parameter("transformer.wte.weight"), embedding)
    assert adapter_leftovers(merged) == []

    lfx.load_merged(model, gm)
    assert model.lm_head.weight is not model.transformer.wte.weight
    assert model.config.tie_word_embeddings is False  # so saving and reloading keeps them apart
    assert torch.equal(model.transformer.wte.weight, embedding)  # the lookup keeps its rows
    assert torch.allclose(model.lm_head.weight, embedding + delta, rtol=0, atol=1e-6)
    assert rel_err(run(model, *other, case), adapted) <= TOL
    assert rel_err(run(gm, *other, case), adapted) == 0.0  # the graph kept its own weights


def test_two_adapters_fold_to_their_sum():
    case = models.build("gpt2")
    model = case.model
    gm = lfx.rewrite(model, lfx.Spec("all-linear", method=lora()),
                     example_inputs=case.args, example_kwargs=case.kwargs)
    first = run(gm, case.other_args, case.other_kwargs, case)
    again = lfx.rewrite(gm, lfx.Spec(["c_attn"], method=lora(rank=2, alpha=3.0)), adapter="second")
    assert again is gm
    both = run(gm, case.other_args, case.other_kwargs, case)
    assert rel_err(both, first) > 1e-3

    name = "transformer.h.1.attn.c_attn"
    d1 = gm.lowrank_fx.default.lora.delta_weight(name)
    d2 = gm.lowrank_fx.second.lora.delta_weight(name)
    weight = gm.get_parameter(f"{name}.weight").detach().clone()  # Conv1D: (in, out)
    state = lfx.merged_state_dict(gm)
    assert torch.allclose(state[f"{name}.weight"], weight + (d1 + d2).t(), rtol=0, atol=1e-6)

    assert rel_err(run(lfx.merge(gm), case.other_args, case.other_kwargs, case), both) <= TOL
    model.load_state_dict(state, strict=False)
    assert rel_err(run(model, case.other_args, case.other_kwargs, case), both) <= TOL


# ---------------------------------------------------------------------------------------
# Small models: refusals and precision.

class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(8, 16)
        self.down = nn.Linear(16, 4)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def test_merge_refuses_non_finite_update_and_changes_nothing():
    model = MLP()
    gm = lfx.rewrite(model, lfx.Spec(["up", "down"], method=lora()), example_inputs=(torch.randn(3, 8),))
    with torch.no_grad():
        gm.lowrank_fx.default.lora.unit("down").lora_B[1, 2] = float("inf")
    before = snapshot(gm)
    with pytest.raises(lfx.MergeError, match="down") as info:
        lfx.merge(gm)
    assert "inf" in str(info.value)
    with pytest.raises(lfx.MergeError, match="down"):
        lfx.merged_state_dict(gm)
    with pytest.raises(lfx.MergeError):
        lfx.load_merged(MLP(), gm)
    assert_unchanged(gm, before)


def test_merge_without_adapters_is_refused():
    gm = lfx.rewrite(MLP(), lfx.Spec(["up"], method=lora()), example_inputs=(torch.randn(3, 8),))
    with pytest.raises(lfx.MergeError, match="no adapters"):
        lfx.merge(lfx.merge(gm))


def test_fold_of_bf16_weights_adds_in_fp32():
    torch.manual_seed(1)
    model = MLP().to(torch.bfloat16)
    x = torch.randn(3, 8, dtype=torch.bfloat16)
    gm = lfx.rewrite(model, lfx.Spec(["up", "down"], method=lora(rank=2, alpha=0.05)), example_inputs=(x,))
    unit = gm.lowrank_fx.default.lora.unit("up")
    assert unit.lora_A.dtype == torch.float32  # adapters of bf16 weights are fp32
    weight = model.up.weight.detach().clone()
    exact = (weight.float() + unit.scale * (unit.lora_B.detach() @ unit.lora_A.detach())).to(torch.bfloat16)
    naive = weight + (unit.scale * (unit.lora_B.detach() @ unit.lora_A.detach())).to(torch.bfloat16)
    assert not torch.equal(exact, naive)  # the test can tell the two apart

    state = lfx.merged_state_dict(gm)
    assert state["up.weight"].dtype == torch.bfloat16
    assert torch.equal(state["up.weight"], exact)
    merged = lfx.merge(gm)
    assert torch.equal(merged.get_parameter("up.weight"), exact)


def test_fold_of_float64_weights_keeps_float64_precision():
    model = MLP().double()
    x = torch.randn(5, 8, dtype=torch.float64)
    gm = lfx.rewrite(model, lfx.Spec(["up", "down"], method=lora()), example_inputs=(x,))
    adapted = run(gm, (x,), {})
    merged = lfx.merge(gm)
    assert merged.get_parameter("up.weight").dtype == torch.float64
    assert rel_err(run(merged, (x,), {}), adapted) <= 1e-12
    model.load_state_dict(lfx.merged_state_dict(gm))
    assert rel_err(run(model, (x,), {}), adapted) <= 1e-12
