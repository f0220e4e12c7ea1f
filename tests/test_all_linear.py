"""What "all-linear" leaves out, family by family, and how `plan` reports it.

PEFT's all-linear (peft tuners_utils `_maybe_include_all_linear_layers`) leaves out the LM
head and, for sequence classification, the top-level `classifier` / `score`, and adapts every
other nn.Linear / Conv1D, BERT's pooler.dense under the classifier included. Here the heads
come from the graph (graph/heads.py): tied to or as wide as an embedding, named like a
classification head, or feeding a model output through pass-through ops only. Targets that
are not linear layers (embeddings, the ViT patch convolution) are left out as well.
"""

from __future__ import annotations

import copy
import re

import models
import pytest
import torch
import zoo
from torch import nn

import lowrank_fx as lfx
from lowrank_fx.adapt.capture import capture
from lowrank_fx.graph.heads import left_out
from lowrank_fx.graph.record import Record
from lowrank_fx.graph.targets import find_targets

NOT_LINEAR = "not a linear layer"
# family -> {target all-linear leaves out: a regex its reason matches}
LEFT_OUT = {
    "llama": {"model.embed_tokens": NOT_LINEAR,
              "lm_head": r"^LM head: as wide as the embedding model\.embed_tokens\.weight .*'logits'"},
    "qwen2": {"model.embed_tokens": NOT_LINEAR,
              "lm_head": r"^LM head: as wide as the embedding model\.embed_tokens\.weight .*'logits'"},
    "gpt2": {"transformer.wte": NOT_LINEAR, "transformer.wpe": NOT_LINEAR,
             "lm_head": r"^LM head tied to the embedding transformer\.wte\.weight$"},
    "t5": {"encoder.embed_tokens": NOT_LINEAR, "encoder.block.0.layer.0.SelfAttention.relative_attention_bias": NOT_LINEAR,
           "decoder.block.0.layer.0.SelfAttention.relative_attention_bias": NOT_LINEAR,
           "lm_head": r"^LM head tied to the embedding shared\.weight$"},
    "bert_cls": {"bert.embeddings.word_embeddings": NOT_LINEAR, "bert.embeddings.token_type_embeddings": NOT_LINEAR,
                 "bert.embeddings.position_embeddings": NOT_LINEAR,
                 "classifier": r"^classification head \(named 'classifier', as PEFT leaves out\)$"},
    "vit_cls": {"vit.embeddings.patch_embeddings.projection": "a conv2d op, " + NOT_LINEAR,
                "classifier": r"^classification head \(named 'classifier'"},
    "encoder": {"head": r"^output head: its result is the model output 'output' with no linear op after it$"},
    "mlp": {"w3": r"^output head: its result is the model output 'output'"},  # through log_softmax
    "twice": {},  # its one weight feeds its own second call: a hidden layer, not a head
    # Without a classifier, BERT's and ViT's pooler.dense is the head: tanh -> pooler_output.
    "bert": {"embeddings.word_embeddings": NOT_LINEAR, "embeddings.token_type_embeddings": NOT_LINEAR,
             "embeddings.position_embeddings": NOT_LINEAR, "pooler.dense": r"model output 'pooler_output'"},
    "vit": {"embeddings.patch_embeddings.projection": NOT_LINEAR, "pooler.dense": r"model output 'pooler_output'"},
}
# Linear layers that look like heads but are not, and stay in.
KEPT = {"bert_cls": ["bert.pooler.dense"], "gpt2": ["transformer.h.0.mlp.c_fc"],  # 128 wide, like the vocabulary
        "encoder": ["encoder.layers.1.linear2"], "twice": ["lin"], "mlp": ["w1", "w2"]}


def _case(family):
    return zoo.build(family) if family in zoo.FAMILIES else models.build(family)


@pytest.fixture(scope="module")
def capture_of():
    """family -> (family, case, captured graph), each captured once for the module."""
    cache = {}

    def get(family):
        if family not in cache:
            case = _case(family)
            cache[family] = family, case, capture(case.model, case.args, case.kwargs)
        return cache[family]
    return get


@pytest.fixture(params=list(LEFT_OUT))
def captured(request, capture_of):
    return capture_of(request.param)


def _targets(gm):
    return find_targets(gm, Record.find(gm).aliases)


def test_left_out_exactly_and_why(captured):
    family, _, gm = captured
    plan = lfx.plan(gm, lfx.Spec("all-linear"))
    assert list(plan.left_out) == [n for n in _targets(gm) if n in LEFT_OUT[family]]  # exactly, in graph order
    for name, reason in LEFT_OUT[family].items():
        assert re.search(reason, plan.left_out[name]), (name, plan.left_out[name])
    rows = [r.target for r in plan.rows]
    assert rows == [n for n in _targets(gm) if n not in plan.left_out]  # everything else is adapted
    assert all(name in rows for name in KEPT.get(family, []))
    text = str(plan)
    section = text[text.index(f"left out by all-linear ({len(plan.left_out)}):"):] if plan.left_out else ""
    assert plan.left_out or "left out by all-linear" not in text
    for name, reason in plan.left_out.items():
        assert re.search(rf"\n  {re.escape(name)} +{re.escape(reason)}(\n|$)", section)


@pytest.mark.parametrize("family, head", [("bert_cls", "classifier"), ("encoder", "head"), ("llama", "lm_head")])
def test_heads_are_found_again_in_an_adapted_graph(capture_of, family, head):
    # resolve runs again on adapted graphs (second adapters, adapter files): an adapter's
    # y + gate·Δy after a head must not hide it, nor one on the head itself.
    _, _, gm = capture_of(family)
    adapted = lfx.rewrite(copy.deepcopy(gm), lfx.Spec("all-linear", method=lfx.LoRA(rank=2)))
    lfx.rewrite(adapted, lfx.Spec([head], method=lfx.LoRA(rank=2)), adapter="head")
    assert left_out(adapted, _targets(adapted)) == left_out(gm, _targets(gm))
    again = lfx.rewrite(adapted, lfx.Spec("all-linear", method=lfx.LoRA(rank=2)), adapter="third")
    third = again.lowrank_fx.third.lora.target_names
    assert head not in third and third == adapted.lowrank_fx.default.lora.target_names


def test_a_head_named_in_the_spec_is_adapted(capture_of):
    _, _, gm = capture_of("bert_cls")
    plan = lfx.plan(gm, lfx.Spec({"all-linear": lfx.LoRA(rank=4), "classifier": lfx.LoRA(rank=2)}))
    assert "classifier" in [r.target for r in plan.rows] and "classifier" not in plan.left_out
    plan = lfx.plan(gm, lfx.Spec(["classifier", "query"]))  # no all-linear: nothing is "left out"
    assert plan.left_out == {} and "left out by all-linear" not in str(plan)


# ---------------------------------------------------------------------------------------
# Method defaults on the odd targets all-linear keeps, or that a spec names.

@pytest.fixture
def encoder(capture_of):
    return capture_of("encoder")[1:]


def test_lorta_defaults_on_a_five_way_head_and_targets_without_a_layer(encoder):
    case, gm = encoder
    plan = lfx.plan(gm, lfx.Spec(["head", "linear1"], method=lfx.LoRTA()))
    assert plan.modes["lorta_5x16_nolayer"] == (
        "LoRTA modes d_in=16, d_head=5, H=1, L=1, M=1; one head: the attention head size 8 does not "
        "divide the output width 5; no layer index in the targets' names: a group of their own")
    assert plan.modes["lorta_32x16"] == "LoRTA modes d_in=16, d_head=8, H=4, L=2, M=1"
    assert "[shared by group lorta_5x16_nolayer] LoRTA modes d_in=16, d_head=5, H=1" in str(plan)
    gm2 = lfx.rewrite(copy.deepcopy(gm), lfx.Spec(["head", "linear1"], method=lfx.LoRTA(rank=8, init="nonzero")))
    model = copy.deepcopy(case.model)
    lfx.load_merged(model, gm2)
    with torch.no_grad():
        ours = gm2(*case.other_args)
        assert (ours - case.model(*case.other_args)).abs().max() > 1e-3
        torch.testing.assert_close(model(*case.other_args), ours, rtol=1e-5, atol=1e-6)


def test_explicit_head_dim_that_cannot_hold_is_an_error(encoder):
    _, gm = encoder
    with pytest.raises(lfx.SpecError, match=r"head_dim 8 does not divide the output width 5 of targets head"):
        lfx.plan(gm, lfx.Spec(["head"], method=lfx.LoRTA(head_dim=8)))


def test_randlora_default_rank_above_the_head_uses_one_basis(encoder):
    case, gm = encoder
    gm2 = lfx.rewrite(copy.deepcopy(gm), lfx.Spec(["head"], method=lfx.RandLoRA(init="nonzero", alpha=32.0)))
    unit = gm2.lowrank_fx.default.randlora.unit("head")
    assert unit.lam.shape == (32, 1) and unit.gamma.shape == (1, 5)  # rank 32 > 5: N = 1
    model = copy.deepcopy(case.model)
    lfx.load_merged(model, gm2)
    with torch.no_grad():
        torch.testing.assert_close(model(*case.other_args), gm2(*case.other_args), rtol=1e-5, atol=1e-6)


def test_heads_of_a_symbolically_traced_module():
    class Scored(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Linear(8, 8)
            self.score = nn.Linear(8, 2)  # named like a classification head
            self.out = nn.Linear(8, 3)

        def forward(self, x):
            h = torch.relu(self.body(x))
            return {"score": self.score(h), "probs": nn.functional.softmax(self.out(h), dim=-1) * 2.0}

    plan = lfx.plan(Scored(), lfx.Spec("all-linear"))
    assert [r.target for r in plan.rows] == ["body"]
    assert plan.left_out == {"score": "classification head (named 'score', as PEFT leaves out)",
                             "out": "output head: its result is the model output 'probs' with no linear op after it"}
