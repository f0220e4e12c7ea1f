"""LoRA(init="eva") against PEFT 0.21's get_eva_state_dict / initialize_lora_eva_weights.

With the same model and the same batches (no padding: PEFT's mask keeps every row), each
target's rank, A and B, the scale and the outputs equal PEFT's (max-relative error ≤ 1e-5, fp32),
with rho = 1 (no redistribution) and rho = 2 (ranks moved across targets, q/k/v sharing one PCA).
save_peft writes init_lora_weights="eva" with its eva_config and rank / alpha patterns, and PEFT
loads it; load_peft loads PEFT's EVA directory, load_adapters our file (neither redoes the data pass).
"""

from __future__ import annotations

import copy
import json

import models
import pytest
import torch
from peft import EvaConfig, LoraConfig, PeftModel, get_peft_model, initialize_lora_eva_weights

import lowrank_fx as lfx

RANK, ALPHA, TOL = 4, 8, 1e-5
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]


def err(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.detach().double(), want.detach().double()
    scale = want.abs().max()
    return float((got - want).abs().max() / scale) if scale else float((got - want).abs().max())


@pytest.fixture(scope="module")
def case():
    case = models.build("llama")
    generator = torch.Generator().manual_seed(5)
    case.batches = [torch.randint(0, models.VOCAB, (2, 8), generator=generator) for _ in range(3)]
    return case


def _run(case):
    return lambda graph: [graph(ids, **case.kwargs) for ids in case.batches]


def _ours(case, **eva):
    spec = lfx.Spec(targets=TARGETS, method=lfx.LoRA(rank=RANK, alpha=ALPHA, init="eva", eva_config=eva))
    return lfx.rewrite(case.model, spec, example_inputs=case.args, example_kwargs=case.kwargs, calibration=_run(case))


def _peft(case, **eva):
    config = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS, init_lora_weights="eva",
                        eva_config=EvaConfig(**eva))
    model = get_peft_model(copy.deepcopy(case.model), config)
    loader = [{"input_ids": ids, "attention_mask": torch.ones_like(ids), **case.kwargs} for ids in case.batches]
    initialize_lora_eva_weights(model, dataloader=loader, show_progress_bar=False)
    return model


def _layers(peft_model) -> dict:
    return {name: module for name, module in peft_model.get_base_model().named_modules()
            if hasattr(module, "lora_A") and "default" in module.lora_A}


def _units(gm) -> dict:
    """Our unit by target (targets of another rank are another method's group)."""
    return {name: group.unit(name) for group in gm.lowrank_fx.default.values() for name in group.target_names}


def _same_b(gm, peft_model, seed=1):
    """Give both the same random B (B = 0 at the start), so the outputs test A and the scale."""
    generator = torch.Generator().manual_seed(seed)
    units = _units(gm)
    with torch.no_grad():
        for name, layer in _layers(peft_model).items():
            b = torch.randn(layer.lora_B["default"].weight.shape, generator=generator)
            units[name].lora_B.copy_(b)
            layer.lora_B["default"].weight.copy_(b)


def _out(case, model):
    with torch.no_grad():
        return case.output(model(*case.args, **case.kwargs))


@pytest.mark.parametrize("eva", [{"rho": 1.0}, {"rho": 2.0, "tau": 0.95},
                                 {"rho": 2.0, "tau": 0.9, "whiten": True, "adjust_scaling_factors": False}])
def test_eva_matches_peft(case, tmp_path, eva):
    gm = _ours(case, **eva)
    peft_model = _peft(case, **eva)
    layers, units = _layers(peft_model), _units(gm)
    assert set(units) == set(layers)  # a target given rank 0 has no adapter in either
    ranks = {name: layer.r["default"] for name, layer in layers.items()}
    if eva["rho"] == 1.0:
        assert set(ranks.values()) == {RANK}
    else:
        assert len(set(ranks.values())) > 1  # the test data does move ranks
    shared = [name for name in layers if name.endswith(("q_proj", "k_proj", "v_proj"))]
    for name, layer in layers.items():
        unit = units[name]
        want = layer.lora_A["default"].weight
        if eva.get("whiten") and name in shared:
            # PEFT divides the components q, k and v share in place, once for each of them:
            # theirs are ours / √S²; o_proj and down_proj (own inputs) are compared
            assert err(unit.lora_A / unit.lora_A.norm(dim=1, keepdim=True),
                       want / want.norm(dim=1, keepdim=True)) <= TOL, name
            continue
        assert unit.lora_A.shape == want.shape, name
        assert err(unit.lora_A, want) <= TOL, name
        assert torch.count_nonzero(unit.lora_B) == 0
        assert unit.scale == pytest.approx(layer.scaling["default"], rel=1e-12), name
    if eva.get("whiten"):
        return
    assert err(_out(case, gm), case.output(case.model(*case.args, **case.kwargs))) == 0
    _same_b(gm, peft_model)
    want = _out(case, peft_model)
    assert err(_out(case, gm), want) <= TOL
    if eva != {"rho": 2.0, "tau": 0.95}:  # the files once, with ranks and alphas per target
        return
    lfx.save_peft(gm, tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert config["init_lora_weights"] == "eva" and config["eva_config"]["rho"] == eva["rho"]
    assert config["rank_pattern"] and config["alpha_pattern"]
    reloaded = PeftModel.from_pretrained(copy.deepcopy(case.model), tmp_path / "ours")
    assert err(_out(case, reloaded), want) <= TOL
    lfx.save_adapters(gm, tmp_path / "ours.safetensors")  # values only: no data pass on load
    loaded = lfx.load_adapters(case.model, tmp_path / "ours.safetensors", example_inputs=case.args,
                               example_kwargs=case.kwargs)
    assert err(_out(case, loaded), want) <= TOL
    peft_model.save_pretrained(tmp_path / "peft")
    loaded = lfx.load_peft(case.model, tmp_path / "peft", example_inputs=case.args, example_kwargs=case.kwargs)
    assert err(_out(case, loaded), want) <= TOL


def test_eva_needs_a_calibration_run(case):
    spec = lfx.Spec(targets=TARGETS, method=lfx.LoRA(rank=RANK, init="eva"))
    with pytest.raises(lfx.SpecError, match="calibration=run"):
        lfx.rewrite(case.model, spec, example_inputs=case.args, example_kwargs=case.kwargs)
    with pytest.raises(lfx.SpecError, match="never reached"):
        lfx.rewrite(case.model, spec, example_inputs=case.args, example_kwargs=case.kwargs,
                    calibration=lambda graph: None)
    with pytest.raises(lfx.SpecError, match="rows they need"):  # 8 components, batches of 2 rows
        lfx.rewrite(case.model, spec, example_inputs=case.args, example_kwargs=case.kwargs,
                    calibration=lambda graph: graph(case.batches[0][:1, :2], **case.kwargs))
    with pytest.raises(lfx.SpecError, match="exceed its 32 input features"):
        lfx.rewrite(case.model, lfx.Spec(targets=TARGETS, method=lfx.LoRA(rank=20, init="eva")),
                    example_inputs=case.args, example_kwargs=case.kwargs, calibration=_run(case))
    with pytest.raises(lfx.SpecError, match="rho"):
        lfx.LoRA(init="eva", eva_config={"rho": 0.5})
    with pytest.raises(lfx.SpecError, match="only applies to init='eva'"):
        lfx.LoRA(eva_config={"rho": 1.0})
    with pytest.raises(lfx.SpecError, match="unknown option 'use_label_mask'"):
        lfx.LoRA(init="eva", eva_config={"use_label_mask": False})
