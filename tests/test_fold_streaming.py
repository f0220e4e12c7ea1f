"""Folding one target at a time, and folding in place.

Oracles: the adapted graph's outputs; for weights, a reference written here from the methods'
own ΔW (group.delta_weight): W' = (W in fp32 + Σ gate · ΔW in W's layout) in W's dtype, which
every fold must give bit for bit (torch.equal). In place: the copying `lfx.merge(gm)` of an
identical graph, the tensors' storage (data_ptr), and snapshots for the all-or-nothing checks.
"""

from __future__ import annotations

import copy

import models
import pytest
import torch
from torch import nn

import lowrank_fx as lfx
from lowrank_fx.passes.layers import blocks

METHODS = {
    "lora": {"*": lfx.LoRA(rank=4, alpha=8.0, init="nonzero")},
    "dora": {"*": lfx.LoRA(rank=4, alpha=8.0, init="nonzero", dora=True)},
    "lorta": {"*": lfx.LoRTA(rank=4, init="nonzero")},
    "randlora": {"*": lfx.RandLoRA(rank=8, alpha=16.0, init="nonzero")},
    "mixed": {"re:.*(q|k|v|o)_proj": lfx.LoRTA(rank=4, init="nonzero"),
              "re:.*(gate|up)_proj": lfx.RandLoRA(rank=8, alpha=16.0, init="nonzero"),
              "re:.*down_proj": lfx.LoRA(rank=4, init="nonzero", dora=True)},
}


def _spec(method: str) -> lfx.Spec:
    targets = METHODS[method]
    if list(targets) == ["*"]:
        return lfx.Spec("all-linear", method=targets["*"])
    return lfx.Spec(targets=targets)


def _adapted(method: str = "lora", seed: int = 0):
    case = models.build("llama", seed=seed)
    gm = lfx.rewrite(case.model, _spec(method), example_inputs=case.args, example_kwargs=case.kwargs)
    return case, gm


def _out(module, case) -> torch.Tensor:
    with torch.no_grad():
        return case.output(module(*case.other_args, **case.other_kwargs))


def _expected(gm) -> dict[str, torch.Tensor]:
    """{weight name: W + Σ_adapters ΔW} by the formula (all gates 1): LoRA's s · B A from its factors,
    the other methods' ΔW from their group's delta_weight."""
    total: dict[str, torch.Tensor] = {}
    for adapter, info in gm.meta["lowrank_fx"].adapters.items():
        for target, group in info.groups.items():
            weight = gm.get_parameter(f"{target}.weight").detach()  # Llama: (out, in), as ΔW
            unit = getattr(gm.lowrank_fx, adapter)[group].unit(target)
            if hasattr(unit, "lora_B") and not hasattr(unit, "lora_magnitude"):  # plain LoRA: s · B A from its factors
                delta = (unit.lora_B.detach() @ unit.lora_A.detach()) * unit.scale
            else:
                delta = getattr(gm.lowrank_fx, adapter)[group].delta_weight(target, weight).detach().float()
            total[target] = total[target] + delta if target in total else delta
    return {f"{t}.weight": (gm.get_parameter(f"{t}.weight").detach().float() + d).to(gm.get_parameter(f"{t}.weight").dtype)
            for t, d in total.items()}


def _weights(module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in module.named_parameters()}


# ---------------------------------------------------------------------------------------
# Streaming: the same bits as the formula, unfolded tensors not copied.

@pytest.mark.parametrize("method", list(METHODS))
def test_merged_state_merge_and_load_merged_give_the_formula_bit_for_bit(method):
    case, gm = _adapted(method)
    if method == "lora":  # a second adapter on some targets: the two updates are summed first
        lfx.rewrite(gm, lfx.Spec(["*.q_proj", "*.down_proj"], method=lfx.LoRA(rank=2, init="nonzero")), adapter="b")
    expected = _expected(gm)
    assert len(expected) == 14
    state = lfx.merged_state_dict(gm)
    assert list(state) == list(case.model.state_dict())
    merged = lfx.merge(gm)
    loaded = lfx.load_merged(copy.deepcopy(case.model), gm)
    for key, want in expected.items():
        assert torch.equal(state[key], want), key
        assert torch.equal(merged.get_parameter(key), want), key
        assert torch.equal(loaded.get_parameter(key), want), key
    assert torch.allclose(_out(merged, case), _out(gm, case), rtol=1e-5, atol=1e-6)


def test_unfolded_values_are_the_graphs_own_tensors_and_folded_ones_are_new():
    case, gm = _adapted()
    graph_ptrs = {t.data_ptr() for t in [*gm.parameters(), *gm.buffers()]}
    model_state = case.model.state_dict()
    state = lfx.merged_state_dict(gm)
    folded = set(_expected(gm))
    for key, value in state.items():
        if key in folded:
            assert value.data_ptr() not in graph_ptrs, key
        else:  # not copied: the model's (and the graph's) own tensor, detached
            assert value.data_ptr() == model_state[key].data_ptr() and not value.requires_grad, key


def test_load_merged_that_fails_midway_puts_every_tensor_back():
    case, gm = _adapted()
    last = list(gm.meta["lowrank_fx"].adapters["default"].groups)[-1]
    with torch.no_grad():
        gm.lowrank_fx.default.lora.unit(last).lora_B[0, 0] = float("nan")
    model = copy.deepcopy(case.model)
    before = dict(model.named_parameters())
    values = _weights(model)
    with pytest.raises(lfx.MergeError, match=last):
        lfx.load_merged(model, gm)
    after = dict(model.named_parameters())
    assert list(after) == list(before) and all(after[k] is before[k] for k in before)
    assert all(torch.equal(p, values[k]) for k, p in after.items())


# ---------------------------------------------------------------------------------------
# merge(gm, inplace=True): PEFT's merge_and_unload.

def test_inplace_merge_folds_into_the_same_storage_and_equals_the_copy():
    case, gm = _adapted("mixed")
    _, twin = _adapted("mixed")  # the same seed: identical weights and adapters
    copied = lfx.merge(twin)
    adapted = _out(gm, case)
    expected = _expected(gm)
    ptrs = {k: gm.get_parameter(k).data_ptr() for k in expected}
    model_weight = case.model.model.layers[0].self_attn.q_proj.weight
    gates = gm.lowrank_fx_gates

    merged = lfx.merge(gm, inplace=True)
    assert merged is gm
    assert not any(n.startswith("lowrank_fx") for n, _ in gm.named_parameters())
    assert not any("lowrank_fx" in str(n.target) for n in gm.graph.nodes)
    for key, want in expected.items():
        weight = gm.get_parameter(key)
        assert weight.data_ptr() == ptrs[key], key  # truly in place
        assert torch.equal(weight, want) and torch.equal(weight, copied.get_parameter(key)), key
    assert torch.equal(_out(gm, case), _out(copied, case))
    assert torch.allclose(_out(gm, case), adapted, rtol=1e-5, atol=1e-6)
    # the original model shares the weights: it is merged too, as with PEFT
    assert torch.equal(model_weight, expected["model.layers.0.self_attn.q_proj.weight"])
    assert torch.equal(_out(case.model, case), _out(gm, case))
    # the adapters are gone: no second fold, no double update through a graph that kept the gates
    assert all(float(g) == 0.0 for g in gates.buffers())
    with pytest.raises(lfx.MergeError, match="no adapters"):
        lfx.merge(gm, inplace=True)
    with pytest.raises(lfx.MergeError, match="no adapters"):
        lfx.merged_state_dict(gm)


def test_inplace_merge_of_a_graph_with_layer_blocks_keeps_its_blocks():
    case = models.build("llama")
    gm = lfx.rewrite(case.model, _spec("lora"), example_inputs=case.args, example_kwargs=case.kwargs, layers="auto")
    lfx.checkpoint_layers(gm)
    paths = blocks(gm)
    assert paths
    copied = lfx.merge(gm)
    merged = lfx.merge(gm, inplace=True)
    assert merged is gm and blocks(gm) == paths
    assert torch.equal(_out(gm, case), _out(copied, case))
    assert not any("lowrank_fx" in name for name, _ in gm.named_modules())


def test_inplace_merge_of_bf16_weights_rounds_like_the_copy():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).to(torch.bfloat16)
    x = torch.randn(5, 8, dtype=torch.bfloat16)
    gm = lfx.rewrite(model, lfx.Spec(["0", "2"], method=lfx.LoRA(rank=2, alpha=0.05, init="nonzero", bias=True)),
                     example_inputs=(x,))
    copied = lfx.merge(gm)
    ptrs = [p.data_ptr() for p in model.parameters()]
    lfx.merge(gm, inplace=True)
    assert [p.data_ptr() for p in model.parameters()] == ptrs
    for name, weight in copied.named_parameters():
        assert torch.equal(gm.get_parameter(name), weight), name  # weights and LoRA-bias biases


def test_lora_bound_covers_its_update():
    _, gm = _adapted()
    group = gm.lowrank_fx.default.lora
    for name in group.target_names:
        unit = group.unit(name)
        assert unit.delta_weight().abs().max().item() <= unit.delta_bound()
    _, dora = _adapted("dora")
    group = dora.lowrank_fx.default[dora.meta["lowrank_fx"].adapters["default"].groups[name]]
    assert group.unit(name).delta_bound() is None  # DoRA's ΔW reads W and divides by a norm


@pytest.mark.parametrize("broken", ["inf", "overflow"])
def test_inplace_merge_that_fails_changes_nothing(broken):
    _case, gm = _adapted()
    last = list(gm.meta["lowrank_fx"].adapters["default"].groups)[-1]
    unit = gm.lowrank_fx.default.lora.unit(last)
    with torch.no_grad():
        if broken == "inf":
            unit.lora_B[1, 0] = float("inf")
        else:  # finite factors whose product is past fp32's range: the bound cannot vouch, ΔW is checked
            unit.lora_B.fill_(3e38)
            unit.lora_A.fill_(1.0)
            assert torch.isfinite(unit.lora_B).all() and not torch.isfinite(unit.delta_weight()).all()
    code, values = gm.code, _weights(gm)
    with pytest.raises(lfx.MergeError, match=last) as info:
        lfx.merge(gm, inplace=True)
    assert "inf" in str(info.value)
    assert gm.code == code
    now = _weights(gm)
    assert list(now) == list(values) and all(torch.equal(now[k], v) for k, v in values.items())
    with pytest.raises(lfx.MergeError, match="requantize"):
        lfx.merge(gm, inplace=True, requantize=True)
    assert gm.code == code


def test_inplace_merge_unties_a_tied_head_and_leaves_the_embedding():
    case = models.build("gpt2")
    model = case.model
    embedding = model.transformer.wte.weight
    values = embedding.detach().clone()
    gm = lfx.rewrite(model, lfx.Spec(["lm_head", "c_attn"], method=lfx.LoRA(rank=4, init="nonzero")),
                     example_inputs=case.args, example_kwargs=case.kwargs)
    _, twin = _adapted_gpt2()
    copied = lfx.merge(twin)
    c_attn = model.transformer.h[0].attn.c_attn.weight
    ptr = c_attn.data_ptr()
    lfx.merge(gm, inplace=True)
    assert torch.equal(_out(gm, case), _out(copied, case))
    assert torch.equal(embedding, values)  # the lookup keeps its rows
    assert model.lm_head.weight is embedding  # the model's tie is left alone, with the base values
    assert c_attn.data_ptr() == ptr and torch.equal(c_attn, copied.get_parameter("transformer.h.0.attn.c_attn.weight"))
    assert not torch.equal(gm.get_parameter("lowrank_fx_untied.lm_head"), values)


def _adapted_gpt2():
    case = models.build("gpt2")
    gm = lfx.rewrite(case.model, lfx.Spec(["lm_head", "c_attn"], method=lfx.LoRA(rank=4, init="nonzero")),
                     example_inputs=case.args, example_kwargs=case.kwargs)
    return case, gm


def test_inplace_merge_writes_trained_modules_into_the_base():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    x = torch.randn(5, 8)
    gm = lfx.rewrite(model, lfx.Spec(["0"], method=lfx.LoRA(rank=2, init="nonzero"), train=["2"]), example_inputs=(x,))
    with torch.no_grad():
        for name, param in gm.named_parameters():
            if "trained" in name:
                param.add_(0.5)
    copied = lfx.merge(gm)
    ptr = model[2].weight.data_ptr()
    lfx.merge(gm, inplace=True)
    assert model[2].weight.data_ptr() == ptr
    assert torch.equal(model[2].weight, copied.get_parameter("2.weight"))
    assert torch.equal(gm(x), copied(x)) and torch.equal(model(x), copied(x))


def test_inplace_merge_folds_a_quantized_target_to_a_dense_layer():
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    def quantized():
        case = models.build("llama")
        quantize_(case.model, Int8WeightOnlyConfig(), filter_fn=lambda m, fqn: fqn.endswith("q_proj"))
        gm = lfx.rewrite(case.model, _spec("lora"), example_inputs=case.args, example_kwargs=case.kwargs)
        return case, gm

    case, gm = quantized()
    copied = lfx.merge(quantized()[1])
    int8 = case.model.model.layers[0].self_attn.q_proj.weight
    k_proj = case.model.model.layers[0].self_attn.k_proj.weight
    ptr = k_proj.data_ptr()
    lfx.merge(gm, inplace=True)
    assert torch.equal(_out(gm, case), _out(copied, case))
    name = "model.layers.0.self_attn.q_proj.weight"
    assert type(gm.get_parameter(name)) is nn.Parameter and torch.equal(gm.get_parameter(name), copied.get_parameter(name))
    assert case.model.model.layers[0].self_attn.q_proj.weight is int8  # the quantized tensor is left as it was
    assert k_proj.data_ptr() == ptr and torch.equal(k_proj, copied.get_parameter("model.layers.0.self_attn.k_proj.weight"))
