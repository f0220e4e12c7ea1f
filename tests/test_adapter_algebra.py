"""Adapter algebra: combine_adapters against PEFT's add_weighted_adapter, delete_adapter against a
graph that never had the adapter, adapters_disabled against the base model.

The PEFT twin holds the very factors of our adapters (copied in). Parity is
max|ours - peft| / max|peft| ≤ 1e-5 in fp32, on the new adapter's factors A and B of every
target and on the model output with the new adapter active. DARE: PEFT draws its masks from
torch's global generator after its new layers' init draws; a PEFT run of a combination that
draws nothing gives the generator's state at the first mask, and ours starts from that state.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import safetensors.torch
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

import lowrank_fx as lfx
from lowrank_fx.adapt.capture import capture
from lowrank_fx.errors import SpecError
from lowrank_fx.graph.record import CONTAINER, Record

TOL = 1e-5
IDS = torch.tensor([[1, 5, 7, 2, 0, 15], [3, 3, 9, 11, 4, 6]])
# adapter -> (targets, rank, alpha); "u" and "v" share a rank, "w" does not
ADAPTERS = {"u": (["emb", "fc1", "fc2"], 4, 8.0), "v": (["fc1", "fc2"], 4, 6.0), "w": (["fc1", "emb"], 2, 4.0)}


class Tiny(nn.Module):
    """fc2 is registered before emb and fc1: PEFT's (module) order differs from the call order."""

    def __init__(self):
        super().__init__()
        self.fc2 = nn.Linear(12, 6)
        self.emb = nn.Embedding(16, 8)
        self.fc1 = nn.Linear(8, 12)

    def forward(self, ids):
        return self.fc2(torch.relu(self.fc1(self.emb(ids))))


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours - ref).abs().max() / ref.abs().max()).item()


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Tiny().eval()


@pytest.fixture(scope="module")
def base(model):
    return capture(model, (IDS,))


def ours_with(base, adapters=ADAPTERS, **options) -> torch.fx.GraphModule:
    gm = copy.deepcopy(base)
    torch.manual_seed(1)
    for name, (targets, rank, alpha) in adapters.items():
        spec = lfx.Spec(targets=targets, method=lfx.LoRA(rank=rank, alpha=alpha, init="nonzero", **options))
        gm = lfx.rewrite(gm, spec, adapter=name)
    return gm


def unit(gm, adapter, target):
    record = Record.find(gm)
    return getattr(gm, CONTAINER)[adapter][record.adapters[adapter].groups[target]].unit(target)


def peft_twin(model, gm):
    """A PeftModel with adapters u, v, w holding exactly the factors of `gm`'s."""
    twin = None
    for name, (targets, rank, alpha) in ADAPTERS.items():
        config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights=False)
        if twin is None:
            twin = get_peft_model(copy.deepcopy(model), config, adapter_name=name)
        else:
            twin.add_adapter(name, config)
        for target in targets:
            layer, ours = twin.base_model.model.get_submodule(target), unit(gm, name, target)
            with torch.no_grad():
                if target == "emb":
                    layer.lora_embedding_A[name].copy_(ours.lora_A)
                    layer.lora_embedding_B[name].copy_(ours.lora_B)
                else:
                    layer.lora_A[name].weight.copy_(ours.lora_A)
                    layer.lora_B[name].weight.copy_(ours.lora_B)
    return twin.eval()


def peft_factors(twin, adapter):
    found = {}
    for target in ("emb", "fc1", "fc2"):
        layer = twin.base_model.model.get_submodule(target)
        if adapter in layer.lora_A:
            found[target] = (layer.lora_A[adapter].weight, layer.lora_B[adapter].weight)
        elif adapter in layer.lora_embedding_A:
            found[target] = (layer.lora_embedding_A[adapter], layer.lora_embedding_B[adapter])
    return found


@pytest.fixture(scope="module")
def pair(model, base):
    gm = ours_with(base)
    return gm, peft_twin(model, gm)


CASES = [  # (combination, adapters and weights, options)
    ("linear", {"u": 0.7, "v": -0.3}, {}),
    ("linear", {"w": 1.5}, {}),
    ("cat", {"u": 0.7, "v": 0.3, "w": -0.4}, {}),
    ("svd", {"u": 0.7, "v": 0.3, "w": -0.4}, {}),
    ("svd", {"u": 0.6, "w": 0.9}, {"svd_rank": 3, "svd_clamp": 0.9, "svd_full_matrices": False}),
    ("ties", {"u": 0.7, "v": 0.3}, {"density": 0.5}),
    ("ties", {"u": 0.7, "v": -0.3}, {"density": 0.6, "majority_sign_method": "frequency"}),
    ("ties_svd", {"u": 0.7, "v": 0.3, "w": 0.5}, {"density": 0.5}),
    ("magnitude_prune", {"u": 0.7, "v": 0.3}, {"density": 0.4}),
    ("magnitude_prune_svd", {"u": 0.7, "w": 0.3}, {"density": 0.4}),
    ("dare_linear", {"u": 0.7, "v": 0.3}, {"density": 0.5}),
    ("dare_ties", {"u": 0.7, "v": -0.3}, {"density": 0.5}),
    ("dare_linear_svd", {"u": 0.7, "v": 0.3, "w": 0.2}, {"density": 0.6}),
    ("dare_ties_svd", {"u": 0.7, "w": 0.3}, {"density": 0.5, "majority_sign_method": "frequency"}),
]


@pytest.mark.parametrize("index", range(len(CASES)), ids=[f"{c[0]}-{''.join(c[1])}" for c in CASES])
def test_combination_matches_peft(pair, base, index):
    combination, weights, options = CASES[index]
    gm, twin = pair
    name = f"mix{index}"
    peft_options = dict(options)
    draws = combination.startswith("dare")
    if draws:  # PEFT's generator at its first mask draw: after a run of the same rank that draws nothing
        torch.manual_seed(7)
        twin.add_weighted_adapter(list(weights), list(weights.values()), f"probe{index}",
                                  "svd" if combination.endswith("svd") else "linear",
                                  **{k: v for k, v in options.items() if k.startswith("svd")})
        state = torch.get_rng_state()
        torch.manual_seed(7)
    twin.add_weighted_adapter(list(weights), list(weights.values()), name, combination, **peft_options)
    if draws:
        torch.set_rng_state(state)
    lfx.combine_adapters(gm, weights, name, combination, **options)
    theirs = peft_factors(twin, name)
    assert set(theirs) == set(Record.find(gm).adapters[name].groups)
    for target, (A, B) in theirs.items():
        ours = unit(gm, name, target)
        assert ours.lora_A.shape == A.shape and ours.lora_B.shape == B.shape
        assert rel_err(ours.lora_A.detach(), A) <= TOL, (target, "A")
        assert rel_err(ours.lora_B.detach(), B) <= TOL, (target, "B")
    assert lfx.active_adapters(gm) == ["u", "v", "w"]  # the new adapter starts inactive, as in PEFT
    lfx.set_active_adapters(gm, name)
    twin.set_adapter(name)
    with torch.no_grad():
        ours_out, theirs_out = gm(IDS), twin(IDS)
    lfx.set_active_adapters(gm, ["u", "v", "w"])
    assert rel_err(ours_out, theirs_out) <= TOL
    with torch.no_grad():
        assert rel_err(ours_out, base(IDS)) > 1e-3
