"""Bad inputs: each raises the documented exception type with a message that says what to do."""

from __future__ import annotations

import models
import pytest
import torch
from torch import fx, nn

import lowrank_fx as lfx


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed_tokens = nn.Embedding(16, 8)
        self.attn = nn.ModuleDict({"q_proj": nn.Linear(8, 8), "k_proj": nn.Linear(8, 4)})
        self.fc1 = nn.Linear(8, 32)

    def forward(self, ids):
        h = self.embed_tokens(ids)
        return self.fc1(self.attn["q_proj"](h)).sum(-1) + self.attn["k_proj"](h).sum(-1)


IDS = (torch.randint(0, 16, (2, 5)),)


def rewrite(spec, model=None, **kw):
    return lfx.rewrite(model if model is not None else Small(), spec, example_inputs=IDS, **kw)


def state_of(gm):
    return gm.code, {k: v.clone() for k, v in gm.state_dict().items()}, [p.requires_grad for p in gm.parameters()]


def assert_same(gm, before):
    code, state, grads = before
    assert gm.code == code
    assert list(gm.state_dict()) == list(state)
    assert [p.requires_grad for p in gm.parameters()] == grads


def test_pattern_matching_nothing_lists_nearest_names():
    with pytest.raises(lfx.SpecError) as info:
        rewrite(lfx.Spec(["q_prj"]))
    message = str(info.value)
    assert "'q_prj'" in message and "matched no linear-like target" in message
    assert "attn.q_proj" in message.split("Nearest target names:")[1]
    assert "lfx.plan" in message


def test_rank_must_be_positive():
    for rank in (0, -3, 2.5, True):
        with pytest.raises(lfx.SpecError, match="rank must be a positive integer"):
            lfx.LoRA(rank=rank)


def test_rank_above_min_dimension_is_exact_and_a_bias_without_base_bias_leaves_graph_unchanged():
    # A rank above min(out, in) is accepted, as PEFT does: the update is exact, just not low-rank.
    model = Small()
    gm = rewrite(lfx.Spec(["k_proj"], method=lfx.LoRA(rank=6, init="nonzero")), model=model)
    unit = gm.lowrank_fx.default.lora.units["attn-k_proj"]
    expected = model(*IDS) + (unit.scale * (model.embed_tokens(*IDS) @ (unit.lora_B @ unit.lora_A).t())).sum(-1)
    torch.testing.assert_close(gm(*IDS), expected, rtol=1e-5, atol=1e-6)

    no_bias = Small()
    no_bias.attn["k_proj"] = nn.Linear(8, 4, bias=False)
    gm = rewrite(lfx.Spec(["q_proj"], method=lfx.LoRA(rank=2)), model=no_bias)
    before = state_of(gm)
    with pytest.raises(lfx.SpecError, match="bias=True.*k_proj.*has none"):
        lfx.rewrite(gm, lfx.Spec(["k_proj"], method=lfx.LoRA(rank=2, bias=True)), adapter="second")
    assert_same(gm, before)
    assert list(gm.lowrank_fx) == ["default"]


class WithNorm(Small):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(8)

    def forward(self, ids):
        return super().forward(ids) + self.norm(self.embed_tokens(ids)).sum(-1)


def test_target_that_is_not_linear_like():
    with pytest.raises(lfx.TargetError) as info:
        rewrite(lfx.Spec(["q_proj", "norm"]), model=WithNorm())
    message = str(info.value)
    assert "norm.weight" in message and "layer_norm" in message and "linear-like" in message
    assert isinstance(info.value, ValueError)


def test_embeddings_and_convs_are_targets_by_name_but_not_all_linear():
    gm = rewrite(lfx.Spec(["embed_tokens"], method=lfx.LoRA(rank=2)))
    assert gm.lowrank_fx.default.lora.target_names == ["embed_tokens"]
    assert "embed_tokens" not in rewrite(lfx.Spec("all-linear")).lowrank_fx.default.lora.target_names


def test_unknown_option_names_the_right_one():
    with pytest.raises(lfx.SpecError) as info:
        lfx.LoRA(rnak=8)
    assert "'rnak'" in str(info.value) and "did you mean 'rank'" in str(info.value)
    with pytest.raises(lfx.SpecError, match="did you mean 'targets'"):
        lfx.Spec(target=["q_proj"])
    with pytest.raises(lfx.SpecError, match="init must be one of"):
        lfx.LoRA(init="zeros")
    with pytest.raises(lfx.SpecError, match="dropout must be in"):
        lfx.LoRA(dropout=1.0)
    with pytest.raises(lfx.SpecError, match="bad regular expression"):
        lfx.Spec(["re:(q_proj"])
    with pytest.raises(lfx.SpecError, match="lfx.LoRA"):
        lfx.Spec(["q_proj"], method="lora")


def test_merge_of_a_graph_without_adapters():
    plain = fx.symbolic_trace(Small())
    for fold in (lfx.merge, lfx.merged_state_dict):
        with pytest.raises(lfx.MergeError, match="no adapters") as info:
            fold(plain)
        assert "lfx.rewrite" in str(info.value)


def test_model_that_is_not_a_module():
    for thing in (lambda x: x, Small().state_dict(), "gpt2"):
        with pytest.raises(lfx.ModelTypeError) as info:
            lfx.rewrite(thing, lfx.Spec(["q_proj"]), example_inputs=IDS)
        assert "torch.nn.Module" in str(info.value) and type(thing).__name__ in str(info.value)
        assert isinstance(info.value, TypeError)


def test_adapter_name_already_taken_or_invalid():
    gm = rewrite(lfx.Spec(["q_proj"], method=lfx.LoRA(rank=2)))
    before = state_of(gm)
    with pytest.raises(lfx.SpecError) as info:
        lfx.rewrite(gm, lfx.Spec(["fc1"], method=lfx.LoRA(rank=2)))
    assert "'default'" in str(info.value) and "adapter=" in str(info.value)
    assert_same(gm, before)
    with pytest.raises(lfx.SpecError, match="identifier"):
        lfx.rewrite(gm, lfx.Spec(["fc1"]), adapter="my-adapter")
    assert_same(gm, before)


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent Python control flow
            return self.lin(x)
        return -self.lin(x)


def test_capture_failure_gives_a_hint():
    with pytest.raises(lfx.CaptureError) as info:
        lfx.rewrite(Branchy(), lfx.Spec(["lin"]), example_inputs=(torch.randn(3, 4),))
    message = str(info.value)
    assert "Branchy" in message and "Try:" in message and "torch.cond" in message
    assert isinstance(info.value.__cause__, Exception)  # the original error is kept

    with pytest.raises(lfx.CaptureError) as info:  # no examples: symbolic_trace
        lfx.rewrite(Branchy(), lfx.Spec(["lin"]))
    assert "symbolic_trace" in str(info.value) and "example_inputs" in str(info.value)


def test_decoder_capture_without_use_cache_hint():
    case = models.build("gpt2")
    with pytest.raises(lfx.CaptureError) as info:
        lfx.rewrite(case.model, lfx.Spec(["c_attn"]), example_inputs=case.args)
    assert "example_kwargs={'use_cache': False}" in str(info.value)
    assert all(p.requires_grad for p in case.model.parameters())  # the model is untouched
