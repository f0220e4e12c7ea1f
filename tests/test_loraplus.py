"""LoRA+ parameter groups on a graph that mixes LoRA, LoRTA and RandLoRA.

ratio · lr: LoRA's B, LoRTA's shared B, RandLoRA's λ. lr: everything else trainable.
"""

from __future__ import annotations

import copy

import models
import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.optimizers import create_loraplus_optimizer

import lowrank_fx as lfx
from lowrank_fx.errors import LowRankFxError

LR, RATIO = 1e-3, 16.0


@pytest.fixture(scope="module")
def mixed():
    case = models.build("llama")
    spec = lfx.Spec(targets={
        "re:.*(q|k|v|o)_proj": lfx.LoRTA(rank=4),
        "re:.*(gate|up)_proj": lfx.LoRA(rank=4),
        "re:.*down_proj": lfx.RandLoRA(rank=8),
    })
    gm = lfx.rewrite(case.model, spec, example_inputs=case.args, example_kwargs=case.kwargs)
    return case, gm


def _names(gm, params) -> set[str]:
    by_id = {id(p): n for n, p in gm.named_parameters()}
    return {by_id[id(p)] for p in params}


def test_groups_hold_the_right_parameters(mixed):
    _, gm = mixed
    groups = lfx.loraplus_param_groups(gm, lr=LR, ratio=RATIO, weight_decay=0.1)
    assert [(g["name"], g["lr"], g["weight_decay"]) for g in groups] == [
        ("base_lr", LR, 0.1), ("ratio_lr", LR * RATIO, 0.1)]
    slow, fast = (_names(gm, g["params"]) for g in groups)
    trainable = {n for n, p in gm.named_parameters() if p.requires_grad}
    assert slow | fast == trainable and not slow & fast
    assert len(groups[0]["params"]) + len(groups[1]["params"]) == len(trainable)

    def leaf(names):
        return sorted({n.rsplit(".", 1)[-1] for n in names})
    assert leaf(fast) == ["B", "lam", "lora_B"]
    assert leaf(slow) == ["A", "C_H", "C_L", "C_M", "gamma", "lora_A"]
    lorta_b = {n for n in trainable if n.endswith(".B") and ".lorta_" in n}
    assert len(lorta_b) == 2 and lorta_b <= fast  # one shared B per LoRTA group: q/o and k/v
    assert len([n for n in fast if n.endswith("lora_B")]) == 4  # gate, up x 2 layers
    assert len([n for n in fast if n.endswith("lam")]) == 2  # down x 2 layers


def test_optimizer(mixed):
    _, gm = mixed
    opt = lfx.loraplus_optimizer(gm, lr=LR, ratio=4.0, betas=(0.8, 0.9))
    assert isinstance(opt, torch.optim.AdamW)
    assert [(g["lr"], g["betas"], g["weight_decay"]) for g in opt.param_groups] == [
        (LR, (0.8, 0.9), 0.0), (4 * LR, (0.8, 0.9), 0.0)]
    sgd = lfx.loraplus_optimizer(gm, lr=0.1, optimizer_cls=torch.optim.SGD, momentum=0.9)
    assert isinstance(sgd, torch.optim.SGD) and [g["lr"] for g in sgd.param_groups] == [0.1, 1.6]


def test_one_step_moves_b_side_faster_on_sgd():
    """With plain SGD a step is lr · grad, so the ratio is visible in the update itself."""
    model = torch.nn.Sequential(torch.nn.Linear(8, 8))
    gm = lfx.rewrite(model, lfx.Spec(targets=["0"], method=lfx.LoRA(rank=2, init="nonzero")))
    unit = gm.lowrank_fx.default.lora.unit("0")
    before = {n: p.detach().clone() for n, p in unit.named_parameters()}
    gm(torch.randn(4, 8)).sum().backward()
    grads = {n: p.grad.clone() for n, p in unit.named_parameters()}
    lfx.loraplus_optimizer(gm, lr=0.01, ratio=RATIO, optimizer_cls=torch.optim.SGD).step()
    torch.testing.assert_close(before["lora_A"] - unit.lora_A, 0.01 * grads["lora_A"])
    torch.testing.assert_close(before["lora_B"] - unit.lora_B, 0.01 * RATIO * grads["lora_B"])


def test_lora_grouping_matches_peft():
    case = models.build("llama")
    targets = ["q_proj", "v_proj"]
    peft_model = get_peft_model(copy.deepcopy(case.model), LoraConfig(r=4, target_modules=targets))
    peft_opt = create_loraplus_optimizer(peft_model, torch.optim.AdamW, lr=LR, loraplus_lr_ratio=RATIO)
    peft_fast = sum(p.numel() for g in peft_opt.param_groups if g["lr"] == LR * RATIO for p in g["params"])
    peft_slow = sum(p.numel() for g in peft_opt.param_groups if g["lr"] == LR for p in g["params"])
    gm = lfx.rewrite(case.model, lfx.Spec(targets=targets, method=lfx.LoRA(rank=4)),
                     example_inputs=case.args, example_kwargs=case.kwargs)
    slow, fast = lfx.loraplus_param_groups(gm, lr=LR, ratio=RATIO)
    assert sum(p.numel() for p in fast["params"]) == peft_fast > 0
    assert sum(p.numel() for p in slow["params"]) == peft_slow > 0


def test_only_trainable_parameters_and_errors():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8))
    with pytest.raises(LowRankFxError, match="no trainable parameters"):
        lfx.loraplus_param_groups(torch.fx.symbolic_trace(model).requires_grad_(False), lr=LR)
    gm = lfx.rewrite(model, lfx.Spec(targets=["0"], method=lfx.LoRA(rank=2)))
    gm = lfx.rewrite(gm, lfx.Spec(targets=["1"], method=lfx.RandLoRA(rank=2)), adapter="second")
    groups = lfx.loraplus_param_groups(gm, lr=LR)  # the first adapter is frozen now
    names = set().union(*(_names(gm, g["params"]) for g in groups))
    assert names == {"lowrank_fx.second.randlora.units.1.lam", "lowrank_fx.second.randlora.units.1.gamma"}
    gm.lowrank_fx.second.requires_grad_(False)
    gm.lowrank_fx.default.lora.units["0"].lora_A.requires_grad_(True)
    assert [g["name"] for g in lfx.loraplus_param_groups(gm, lr=LR)] == ["base_lr"]  # empty groups are left out
