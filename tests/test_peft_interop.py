"""PEFT interop through real PEFT, both ways: PEFT directory -> our graph, our graph -> PEFT.

Parity is the relative error max|ours - peft| / max|peft| of the model output, fp32, ≤ 1e-5;
every comparison also checks that the adapter moves the output off the base model's.
"""

from __future__ import annotations

import copy
import json

import models
import pytest
import safetensors
import torch
from peft import LoraConfig, PeftModel, RandLoraConfig, get_peft_model

import lowrank_fx as lfx
from lowrank_fx.adapt.capture import capture

TOL = 1e-5
MODULES = {"llama": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "c_proj", "c_fc"]}


@pytest.fixture(scope="module")
def cases():
    """Each family's model and its captured base graph, built once (copy before rewriting)."""
    built = {}
    for family in MODULES:
        case = models.build(family)
        built[family] = (case, capture(case.model, case.args, case.kwargs))
    return built


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours - ref).abs().max() / ref.abs().max()).item()


def run(case, module) -> torch.Tensor:
    with torch.no_grad():
        return case.output(module(*case.args, **case.kwargs))


def peft_directory(case, tmp_path, family, **options):
    """A trained-looking (non-zero) PEFT LoRA adapter of `family`, saved by PEFT."""
    config = LoraConfig(r=4, lora_alpha=8, target_modules=MODULES[family], init_lora_weights=False,
                        fan_in_fan_out=(family == "gpt2"), **options)
    model = get_peft_model(copy.deepcopy(case.model), config).eval()
    model.save_pretrained(tmp_path)
    return model


@pytest.mark.parametrize("family", MODULES)
def test_peft_adapter_loads_onto_graph(cases, tmp_path, family):
    case, base = cases[family]
    peft_model = peft_directory(case, tmp_path, family)
    gm = lfx.load_peft(copy.deepcopy(base), tmp_path)
    ours, theirs = run(case, gm), run(case, peft_model)
    assert rel_err(ours, run(case, base)) > 1e-3
    assert rel_err(ours, theirs) <= TOL
    spec = gm.meta["lowrank_fx"].adapters["default"].spec
    assert sorted(spec.targets) == sorted(MODULES[family])  # PEFT's own patterns carried over
    assert spec.method == lfx.LoRA(rank=4, alpha=8.0)


@pytest.mark.parametrize("family", MODULES)
def test_our_adapter_loads_in_peft(cases, tmp_path, family):
    case, base = cases[family]
    gm = lfx.rewrite(copy.deepcopy(base), lfx.Spec("all-linear", method=lfx.LoRA(rank=4, alpha=6.0, init="nonzero")))
    lfx.save_peft(gm, tmp_path, base_model_name_or_path="tiny-" + family, task_type="CAUSAL_LM")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is (family == "gpt2")
    assert config["base_model_name_or_path"] == "tiny-" + family
    peft_model = PeftModel.from_pretrained(copy.deepcopy(case.model), tmp_path).eval()
    ours, theirs = run(case, gm), run(case, peft_model)
    assert rel_err(ours, run(case, base)) > 1e-3
    assert rel_err(ours, theirs) <= TOL


def peft_randlora_directory(case, tmp_path, family):
    """A PEFT RandLoRA adapter with non-zero diagonals and PEFT's own random bases."""
    config = RandLoraConfig(r=8, randlora_alpha=16, target_modules=MODULES[family], projection_prng_key=5,
                            fan_in_fan_out=(family == "gpt2"))
    model = get_peft_model(copy.deepcopy(case.model), config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "randlora_lambda" in name or "randlora_gamma" in name:
                param.normal_()
    model.save_pretrained(tmp_path)
    return model


@pytest.mark.parametrize("family", MODULES)
def test_peft_randlora_loads_onto_graph_and_keeps_its_bases(cases, tmp_path, family):
    case, base = cases[family]
    peft_model = peft_randlora_directory(case, tmp_path, family)
    gm = lfx.load_peft(copy.deepcopy(base), tmp_path)
    ours = run(case, gm)
    assert rel_err(ours, run(case, base)) > 1e-3
    assert rel_err(ours, run(case, peft_model)) <= TOL
    # PEFT's bases are not what our seed regenerates, so our file must keep them
    path = lfx.save_adapters(gm, tmp_path / "ours.safetensors")
    with safetensors.safe_open(str(path), "pt") as file:
        assert {"default.randlora.basis_A", "default.randlora.basis_B"} <= set(file.keys())
    assert rel_err(run(case, lfx.load_adapters(copy.deepcopy(base), path)), ours) == 0.0


@pytest.mark.parametrize("family", MODULES)
def test_our_randlora_loads_in_peft(cases, tmp_path, family):
    case, base = cases[family]
    method = lfx.RandLoRA(rank=4, alpha=32.0, seed=7, init="nonzero")
    gm = lfx.rewrite(copy.deepcopy(base), lfx.Spec(MODULES[family], method=method))
    lfx.save_peft(gm, tmp_path)
    peft_model = PeftModel.from_pretrained(copy.deepcopy(case.model), tmp_path).eval()
    ours = run(case, gm)
    assert rel_err(ours, run(case, base)) > 1e-3
    assert rel_err(ours, run(case, peft_model)) <= TOL  # PEFT used our bases, not its own draw
    assert rel_err(run(case, lfx.load_peft(copy.deepcopy(base), tmp_path)), ours) <= TOL


def test_randlora_without_saved_bases_is_refused(cases, tmp_path):
    case, base = cases["llama"]
    peft_randlora_directory(case, tmp_path, "llama")
    _edit_config(tmp_path, save_projection=False)
    with pytest.raises(lfx.AdapterFileError, match="save_projection=False.*random bases are not in the file"):
        lfx.load_peft(copy.deepcopy(base), tmp_path)


def test_mixed_ranks_and_alphas_round_trip_through_peft(cases, tmp_path):
    case, base = cases["llama"]
    spec = lfx.Spec({"q_proj": lfx.LoRA(rank=4, alpha=8.0, init="nonzero"),
                     "v_proj": lfx.LoRA(rank=2, alpha=3.0, init="nonzero"),
                     "down_proj": lfx.LoRA(rank=4, alpha=8.0, init="nonzero")})
    gm = lfx.rewrite(copy.deepcopy(base), spec)
    lfx.save_peft(gm, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (4, 8)
    assert set(config["rank_pattern"].values()) == {2} and set(config["alpha_pattern"].values()) == {3}
    peft_model = PeftModel.from_pretrained(copy.deepcopy(case.model), tmp_path).eval()
    assert rel_err(run(case, gm), run(case, peft_model)) <= TOL
    back = lfx.load_peft(copy.deepcopy(base), tmp_path)
    assert rel_err(run(case, back), run(case, gm)) <= TOL
    methods = {m for _, m in back.meta["lowrank_fx"].adapters["default"].spec.rules()}
    assert methods == {lfx.LoRA(rank=4, alpha=8.0), lfx.LoRA(rank=2, alpha=3.0)}


def test_rslora_and_layers_to_transform(cases, tmp_path):
    case, base = cases["llama"]
    peft_model = peft_directory(case, tmp_path, "llama", use_rslora=True, layers_to_transform=[1])
    gm = lfx.load_peft(copy.deepcopy(base), tmp_path, adapter="tuned")
    assert sorted(gm.meta["lowrank_fx"].adapters["tuned"].groups) == [
        "model.layers.1.mlp.down_proj", "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    assert rel_err(run(case, gm), run(case, peft_model)) <= TOL


def test_load_into_existing_adapter_or_refuse_a_different_one(cases, tmp_path):
    case, base = cases["llama"]
    peft_model = peft_directory(case, tmp_path, "llama")
    same = lfx.rewrite(copy.deepcopy(base), lfx.Spec(MODULES["llama"], method=lfx.LoRA(rank=4, alpha=8.0)))
    lfx.load_peft(same, tmp_path)
    assert rel_err(run(case, same), run(case, peft_model)) <= TOL

    other = lfx.rewrite(copy.deepcopy(base), lfx.Spec(MODULES["llama"], method=lfx.LoRA(rank=2, alpha=8.0)))
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(lfx.AdapterFileError, match="rank=4 in the file, 2 in the graph"):
        lfx.load_peft(other, tmp_path)
    assert all(torch.equal(v, before[k]) for k, v in other.state_dict().items())


def test_adapter_of_another_model_is_refused(cases, tmp_path):
    llama_case, _ = cases["llama"]
    peft_directory(llama_case, tmp_path, "llama")
    _, gpt2 = cases["gpt2"]
    graph = copy.deepcopy(gpt2)
    with pytest.raises(lfx.AdapterFileError, match="targets not in this graph: model.layers.0"):
        lfx.load_peft(graph, tmp_path)
    assert not graph.meta["lowrank_fx"].adapters


def _edit_config(tmp_path, **changes):
    path = tmp_path / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


@pytest.mark.parametrize("setting, value", [
    ("use_dora", True),
    ("bias", "vera_only"),
    ("init_lora_weights", "corda"),  # PiSSA and OLoRA load now (test_lora_init.py)
    ("lora_bias", True),
    ("layer_replication", [[0, 2], [1, 2]]),
    ("some_future_option", {"on": True}),
])
def test_unsupported_settings_are_named(cases, tmp_path, setting, value):
    case, base = cases["llama"]
    peft_directory(case, tmp_path, "llama")
    _edit_config(tmp_path, **{setting: value})
    graph = copy.deepcopy(base)
    with pytest.raises(lfx.AdapterFileError, match=f"{setting}={value!r}".replace("[", r"\[")):
        lfx.load_peft(graph, tmp_path)
    assert not graph.meta["lowrank_fx"].adapters


def test_other_peft_methods_are_refused(cases, tmp_path):
    case, base = cases["llama"]
    peft_directory(case, tmp_path, "llama")
    _edit_config(tmp_path, peft_type="LOHA")
    with pytest.raises(lfx.AdapterFileError, match="peft_type='LOHA' is not supported"):
        lfx.load_peft(copy.deepcopy(base), tmp_path)


def test_broken_directories(cases, tmp_path):
    case, base = cases["llama"]
    peft_directory(case, tmp_path, "llama")
    weights = tmp_path / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-7])
    with pytest.raises(lfx.AdapterFileError, match="truncated"):
        lfx.load_peft(copy.deepcopy(base), tmp_path)
    weights.rename(tmp_path / "adapter_model.bin")
    with pytest.raises(lfx.AdapterFileError, match="pickle, which lowrank_fx never loads"):
        lfx.load_peft(copy.deepcopy(base), tmp_path)
    with pytest.raises(lfx.AdapterFileError, match="no adapter_config.json"):
        lfx.load_peft(copy.deepcopy(base), tmp_path / "missing")


def test_rank_that_contradicts_the_config_is_refused(cases, tmp_path):
    case, base = cases["llama"]
    peft_directory(case, tmp_path, "llama")
    _edit_config(tmp_path, r=8)
    with pytest.raises(lfx.AdapterFileError, match="do not have the rank 8 that the config gives it"):
        lfx.load_peft(copy.deepcopy(base), tmp_path)


def test_export_refuses_what_peft_cannot_hold(cases, tmp_path):
    _, base = cases["llama"]
    gm = lfx.rewrite(copy.deepcopy(base), lfx.Spec(["q_proj"], method=lfx.LoRA(rank=2)), adapter="one")
    lfx.rewrite(gm, lfx.Spec(["v_proj"], method=lfx.LoRA(rank=2)), adapter="two")
    with pytest.raises(lfx.AdapterFileError, match="one adapter.*pass adapter="):
        lfx.save_peft(gm, tmp_path)
    mixed = lfx.rewrite(copy.deepcopy(base), lfx.Spec({"q_proj": lfx.LoRA(rank=2, rslora=True),
                                                       "v_proj": lfx.LoRA(rank=2)}))
    with pytest.raises(lfx.AdapterFileError, match="one rslora per adapter"):
        lfx.save_peft(mixed, tmp_path)
    lorta = lfx.rewrite(copy.deepcopy(base), lfx.Spec(["q_proj"], method=lfx.LoRTA(rank=2)))
    with pytest.raises(lfx.AdapterFileError, match="uses lorta; PEFT export supports"):
        lfx.save_peft(lorta, tmp_path)
