"""Train/eval behaviour of a rewritten graph: it must follow `.train()` / `.eval()` like the
model it was captured from (dropout, attention dropout, batch norm and its counters).

Oracle: the original eager module. The graph runs the same random ops in the same order, so
with the same seed even the training-mode (dropout) outputs agree exactly.
"""

from __future__ import annotations

import copy

import models
import pytest
import torch
from torch import nn

import lowrank_fx as lfx

TOL = 1e-6


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours - ref).abs().max() / ref.abs().max()).item()


def seeded(module, case, seed):
    torch.manual_seed(seed)
    with torch.no_grad():
        return case.output(module(*case.args, **case.kwargs))


@pytest.mark.parametrize("family", ["gpt2", "bert"])
def test_dropout_follows_train_and_eval(family):
    case = models.build(family)
    config = case.model.config
    probs = [getattr(config, k) for k in ("resid_pdrop", "attn_pdrop", "hidden_dropout_prob",
                                          "attention_probs_dropout_prob") if hasattr(config, k)]
    assert probs and all(p > 0 for p in probs)  # the families' default dropout is on
    reference = copy.deepcopy(case.model)
    # Default init (B = 0): the adapted model equals the original one.
    gm = lfx.rewrite(case.model, lfx.Spec("all-linear", method=lfx.LoRA(rank=4)),
                     example_inputs=case.args, example_kwargs=case.kwargs)
    assert not gm.training  # starts in the model's own mode

    evaluated = seeded(gm, case, 1)
    assert torch.equal(seeded(gm, case, 2), evaluated)
    assert rel_err(evaluated, seeded(reference, case, 1)) <= TOL

    gm.train()
    reference.train()
    first, second = seeded(gm, case, 1), seeded(gm, case, 2)
    assert rel_err(first, second) > 1e-2
    assert rel_err(first, evaluated) > 1e-2
    # Same seed: the same dropout masks as the eager model, op by op.
    assert rel_err(first, seeded(reference, case, 1)) <= TOL

    gm.eval()
    assert torch.equal(seeded(gm, case, 3), evaluated)


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(8, 32)
        self.down = nn.Linear(32, 8)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def test_lora_dropout_follows_train_and_eval():
    model = MLP().eval()
    x = torch.randn(4, 8)
    gm = lfx.rewrite(model, lfx.Spec(["up"], method=lfx.LoRA(rank=2, dropout=0.5, init="nonzero")),
                     example_inputs=(x,))
    unit = gm.lowrank_fx.default.lora.unit("up")
    oracle = copy.deepcopy(model)
    with torch.no_grad():
        oracle.up.weight += unit.scale * unit.lora_B @ unit.lora_A
        expected = oracle(x)
        assert rel_err(gm(x), expected) <= 1e-5  # eval: no dropout on the adapter's input
        gm.train()
        assert rel_err(gm(x), gm(x)) > 1e-3
        gm.eval()
        assert torch.equal(gm(x), gm(x))


class CNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 6 * 6, 5)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))


def buffers(module):
    return {k: v.clone() for k, v in module.named_buffers()}


def assert_same_buffers(gm, reference):
    ours, theirs = dict(gm.named_buffers()), buffers(reference)
    for key, value in theirs.items():
        assert torch.allclose(ours[key].double(), value.double(), rtol=1e-6, atol=1e-7), (key, ours[key], value)


@pytest.mark.parametrize("captured_in", ["eval", "train"])
def test_batch_norm_follows_train_and_eval(captured_in):
    model = CNN().train(captured_in == "train")
    reference = copy.deepcopy(model)
    x = torch.randn(6, 3, 8, 8)
    gm = lfx.rewrite(model, lfx.Spec(["fc"], method=lfx.LoRA(rank=2)), example_inputs=(x,))
    assert gm.training == (captured_in == "train")
    assert_same_buffers(gm, reference)  # capturing does not step the statistics

    gm.train()
    reference.train()
    for step in range(3):
        batch = torch.randn(5, 3, 8, 8) * (step + 1) + step
        with torch.no_grad():
            assert rel_err(gm(batch), reference(batch)) <= 1e-5
    assert_same_buffers(gm, reference)
    assert int(dict(gm.named_buffers())["bn.num_batches_tracked"]) == 3
    stats = buffers(gm)

    gm.eval()
    reference.eval()
    with torch.no_grad():
        for _ in range(2):  # eval uses the running statistics and leaves them alone
            out = gm(x)
            assert rel_err(out, reference(x)) <= 1e-5
    assert_same_buffers(gm, reference)
    assert all(torch.equal(v, stats[k]) for k, v in gm.named_buffers())
    with torch.no_grad():  # and it differs from batch statistics
        gm.train()
        assert rel_err(gm(x), out) > 1e-3
