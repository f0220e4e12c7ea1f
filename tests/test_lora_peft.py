"""LoRA against PEFT: same A/B values in, same outputs and A/B gradients out (fp32).

For each model family we rewrite with lowrank_fx, build PEFT's LoRA on a deep copy of the
same model, copy our (non-zero) factors into PEFT's modules, and compare the forward output
and the gradients of a scalar loss L = Σ out ⊙ R with R fixed and random. Parity is the
relative error max|ours - peft| / max|peft| ≤ 1e-5.
"""

from __future__ import annotations

import copy

import models
import pytest
import torch
from peft import LoraConfig, get_peft_model

import lowrank_fx as lfx

RANK, ALPHA, TOL = 4, 8, 1e-5

# Attention and MLP module names per family (as PEFT's target_modules and our patterns).
TARGETS = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "bert": ["query", "key", "value", "dense"],
    "t5": ["q", "k", "v", "o", "wi", "wo"],
    "vit": ["q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2"],
}


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours - ref).abs().max() / ref.abs().max()).item()


def _peft_lora_layers(peft_model) -> dict[str, torch.nn.Module]:
    """PEFT's LoRA layers by the module name in the original model."""
    base = peft_model.get_base_model()
    return {name: module for name, module in base.named_modules() if hasattr(module, "lora_A")
            and "default" in module.lora_A}


def _loss(out: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return (out * weights).sum()


def run_parity(family: str, rslora: bool = False) -> dict[str, float]:
    """Rewrite `family` both ways; return the worst relative errors (outputs, grads of A, of B)."""
    case = models.build(family)
    reference = copy.deepcopy(case.model)
    with torch.no_grad():
        base = case.output(case.model(*case.args, **case.kwargs))
    method = lfx.LoRA(rank=RANK, alpha=ALPHA, init="nonzero", rslora=rslora)
    gm = lfx.rewrite(case.model, lfx.Spec(targets=TARGETS[family], method=method),
                     example_inputs=case.args, example_kwargs=case.kwargs)
    group = gm.lowrank_fx.default.lora

    config = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS[family], lora_dropout=0.0,
                        fan_in_fan_out=(family == "gpt2"), use_rslora=rslora)
    peft_model = get_peft_model(reference, config)
    layers = _peft_lora_layers(peft_model)

    # Both libraries must pick the same modules.
    assert sorted(group.target_names) == sorted(layers), (group.target_names, sorted(layers))
    expected = RANK ** -0.5 * ALPHA if rslora else ALPHA / RANK
    with torch.no_grad():
        for name, layer in layers.items():
            unit = group.unit(name)
            assert unit.scale == pytest.approx(expected)
            assert layer.scaling["default"] == pytest.approx(expected)
            layer.lora_A["default"].weight.copy_(unit.lora_A)
            layer.lora_B["default"].weight.copy_(unit.lora_B)

    ours = case.output(gm(*case.args, **case.kwargs))
    theirs = case.output(peft_model.get_base_model()(*case.args, **case.kwargs))
    # The adapters change the output, else the comparison would prove nothing.
    assert rel_err(ours.detach(), base) > 1e-3
    weights = torch.randn_like(theirs)
    _loss(ours, weights).backward()
    _loss(theirs, weights).backward()

    errors = {"out": rel_err(ours.detach(), theirs.detach()), "grad_A": 0.0, "grad_B": 0.0}
    for name, layer in layers.items():
        unit = group.unit(name)
        # A layer off the loss's path (BERT's pooler when the output is last_hidden_state)
        # gets no gradient in either library.
        assert (unit.lora_A.grad is None) == (layer.lora_A["default"].weight.grad is None), name
        if unit.lora_A.grad is None:
            continue
        errors["grad_A"] = max(errors["grad_A"], rel_err(unit.lora_A.grad, layer.lora_A["default"].weight.grad))
        errors["grad_B"] = max(errors["grad_B"], rel_err(unit.lora_B.grad, layer.lora_B["default"].weight.grad))
    errors["targets"] = len(layers)
    return errors


@pytest.mark.parametrize("family", models.FAMILIES)
def test_outputs_and_gradients_match_peft(family):
    errors = run_parity(family)
    assert errors["out"] <= TOL, errors
    assert errors["grad_A"] <= TOL, errors
    assert errors["grad_B"] <= TOL, errors


def test_rslora_scaling_matches_peft():
    errors = run_parity("gpt2", rslora=True)
    assert max(errors["out"], errors["grad_A"], errors["grad_B"]) <= TOL, errors
