"""Specs that mix methods: rewrite, merge and merged_state_dict against the adapted graph and
the original model, for every method; plus two adapters of different methods on one graph,
and the rank of a folded LoRA update.

"Exact" here: outputs agree to fp32 rounding (relative ≤ 1e-5), and each merged weight is
W + ΔW with ΔW from the method's own fold formula.
"""

from __future__ import annotations

import copy

import models
import pytest
import torch

import lowrank_fx as lfx

TOL = 1e-5

SPECS = {
    "llama-issue-example": ("llama", {
        "re:.*(q|k|v|o)_proj": lfx.LoRTA(rank=8, init="nonzero"),
        "re:.*(gate|up|down)_proj": lfx.LoRA(rank=8, init="nonzero"),
    }),
    "llama-three-methods": ("llama", {
        "re:.*(q|k|v|o)_proj": lfx.LoRTA(rank=4, init="nonzero"),
        "re:.*(gate|up)_proj": lfx.RandLoRA(rank=8, alpha=16.0, init="nonzero"),
        "re:.*down_proj": lfx.LoRA(rank=4, init="nonzero"),
    }),
    "gpt2-conv1d-and-tied-head": ("gpt2", {  # Conv1D weights are stored (in, out)
        "re:attn\\.c_attn": lfx.LoRTA(rank=4, init="nonzero"),
        "re:attn\\.c_proj": lfx.LoRA(rank=4, init="nonzero"),
        "re:mlp\\.c_(fc|proj)": lfx.RandLoRA(rank=8, alpha=16.0, init="nonzero"),
        "lm_head": lfx.LoRA(rank=2, init="nonzero"),
    }),
    "t5-encoder-decoder": ("t5", {
        "re:(SelfAttention|EncDecAttention)\\.[qkvo]$": lfx.LoRTA(rank=4, init="nonzero"),
        "re:DenseReluDense": lfx.RandLoRA(rank=8, alpha=16.0, init="nonzero"),
    }),
}


def rel_err(ours, ref) -> float:
    return ((ours - ref).abs().max() / ref.abs().max()).item()


def _run(case, model, other=False):
    args, kwargs = (case.other_args, case.other_kwargs) if other else (case.args, case.kwargs)
    with torch.no_grad():
        return case.output(model(*args, **kwargs))


@pytest.mark.parametrize("name", list(SPECS))
def test_merge_and_merged_state_are_exact(name):
    family, targets = SPECS[name]
    case = models.build(family)
    original = copy.deepcopy(case.model)
    gm = lfx.rewrite(case.model, lfx.Spec(targets=targets), example_inputs=case.args, example_kwargs=case.kwargs)
    kinds = {group.split("_")[0] for group in gm.lowrank_fx.default}
    assert kinds == {m.kind for m in targets.values()}

    base = _run(case, original)
    adapted = _run(case, gm)
    assert rel_err(adapted, base) > 1e-3  # the adapters do change the model

    merged = lfx.merge(gm)
    assert not any(n.startswith("lowrank_fx.") for n, _ in merged.named_parameters())  # adapters gone
    for other in (False, True):
        assert rel_err(_run(case, merged, other), _run(case, gm, other)) <= TOL

    state = lfx.merged_state_dict(gm, untie=True)
    fresh = copy.deepcopy(original)
    if family == "gpt2":  # the adapted head is tied to the embedding in the original model
        fresh.lm_head.weight = torch.nn.Parameter(fresh.lm_head.weight.detach().clone())
    fresh.load_state_dict(state)
    for other in (False, True):
        assert rel_err(_run(case, fresh, other), _run(case, gm, other)) <= TOL

    record = gm.meta["lowrank_fx"]
    groups = record.adapters["default"].groups
    weights = dict(original.named_parameters(remove_duplicate=False))
    for key, value in state.items():
        target = key.removesuffix(".weight")
        if key.endswith(".weight") and target in groups:
            delta = gm.lowrank_fx.default[groups[target]].delta_weight(target)
            if family == "gpt2" and target != "lm_head":
                delta = delta.t()  # Conv1D layout
            torch.testing.assert_close(value, weights[key].detach() + delta, rtol=0, atol=1e-6)
        elif key in weights and not (family == "gpt2" and key == "transformer.wte.weight"):
            assert torch.equal(value, weights[key].detach()), key


def test_two_adapters_of_different_methods():
    case = models.build("llama")
    original = copy.deepcopy(case.model)
    gm = lfx.rewrite(case.model, lfx.Spec(targets=["q_proj", "v_proj"], method=lfx.LoRTA(rank=4, init="nonzero")),
                     example_inputs=case.args, example_kwargs=case.kwargs)
    gm = lfx.rewrite(gm, lfx.Spec(targets=["v_proj", "down_proj"], method=lfx.RandLoRA(rank=8, alpha=16.0, init="nonzero")),
                     adapter="second")
    adapted = _run(case, gm)
    assert rel_err(lfx.merge(gm)(*case.args, **case.kwargs).logits.detach(), adapted) <= TOL
    fresh = copy.deepcopy(original)
    fresh.load_state_dict(lfx.merged_state_dict(gm))
    assert rel_err(_run(case, fresh), adapted) <= TOL


def test_folded_lora_update_has_rank_at_most_r():
    case = models.build("llama")
    original = {n: p.detach().clone() for n, p in case.model.named_parameters()}
    rank = 3
    gm = lfx.rewrite(case.model, lfx.Spec(targets={"re:.*_proj": lfx.LoRA(rank=rank, init="nonzero")}),
                     example_inputs=case.args, example_kwargs=case.kwargs)
    state = lfx.merged_state_dict(gm)
    checked = 0
    for key, value in state.items():
        if key.endswith("_proj.weight"):
            delta = (value.double() - original[key].double())
            assert torch.linalg.matrix_rank(delta, rtol=1e-4) == rank, key
            checked += 1
    assert checked == 14
