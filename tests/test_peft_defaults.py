"""PEFT files as PEFT saves them by default, against PEFT itself (fp32, relative error 1e-5).

  - An embedding LoRA saved with the default save_embedding_layers="auto" stores the base
    table beside the factors; it loads when the table is the model's and is refused, with the
    difference, when it is not. A resized vocabulary (whole tables stored) likewise.
  - A grouped-conv LoRA trained by PEFT mixes input channels across groups: it loads as
    LoRA(mixed_groups=True), runs unmerged with PEFT's outputs (also through ONNX Runtime),
    goes back to PEFT unchanged, and merging is refused with the reason.
  - bias="lora_only" / "all": the biases load as trained copies; outputs, merge (against PEFT's
    merge_and_unload) and save_peft back into PEFT all match.
"""

from __future__ import annotations

import copy
import json

import models
import peft
import peft_matrix_models as pm
import pytest
import safetensors
import torch

import lowrank_fx as lfx
from lowrank_fx.adapt.capture import capture

TOL = 1e-5


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach() - b.detach()).abs().max() / b.detach().abs().max())


def keys(directory) -> list[str]:
    with safetensors.safe_open(str(directory / "adapter_model.safetensors"), "pt") as file:
        return sorted(file.keys())


# --- embedding tables stored by save_embedding_layers -------------------------------------


@pytest.fixture(scope="module")
def llama():
    case = models.build("llama")
    return case, capture(case.model, case.args, case.kwargs)


def logits(case, module) -> torch.Tensor:
    with torch.no_grad():
        return case.output(module(*case.args, **case.kwargs))


def test_embedding_lora_with_its_stored_base_table(llama, tmp_path):
    case, base = llama
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"], init_lora_weights=False)
    theirs = peft.get_peft_model(copy.deepcopy(case.model), config).eval()
    theirs.save_pretrained(tmp_path)  # save_embedding_layers="auto": the embedding is targeted
    assert "base_model.model.model.embed_tokens.base_layer.weight" in keys(tmp_path)
    gm = lfx.load_peft(copy.deepcopy(base), tmp_path)
    ours = logits(case, gm)
    assert rel(ours, logits(case, base)) > 1e-3
    assert rel(ours, logits(case, theirs)) <= TOL
    assert gm.meta["lowrank_fx"].adapters["default"].groups.keys() >= {"model.embed_tokens"}

    other = models.build("llama", seed=1)  # same shapes, other weights
    graph = capture(other.model, other.args, other.kwargs)
    with pytest.raises(lfx.AdapterFileError, match=r"model\.embed_tokens\.weight: differs from the model's by up to "
                                                   r"[0-9.e-]+(.|\n)*resize this model the same way"):
        lfx.load_peft(graph, tmp_path)
    assert not graph.meta["lowrank_fx"].adapters


def test_resized_vocabulary_tables(llama, tmp_path):
    case, base = llama
    resized = copy.deepcopy(case.model)
    resized.resize_token_embeddings(models.VOCAB + 4)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights=False)
    theirs = peft.get_peft_model(copy.deepcopy(resized), config).eval()
    theirs.save_pretrained(tmp_path, save_embedding_layers=True)  # whole tables: embed_tokens and lm_head
    assert {"base_model.model.model.embed_tokens.weight", "base_model.model.lm_head.weight"} <= set(keys(tmp_path))
    gm = lfx.load_peft(copy.deepcopy(resized), tmp_path, example_inputs=case.args, example_kwargs=case.kwargs)
    assert rel(logits(case, gm), logits(case, theirs)) <= TOL
    with pytest.raises(lfx.AdapterFileError, match=rf"model\.embed_tokens\.weight: stored \({models.VOCAB + 4}, 32\), "
                                                   rf"the model's is \({models.VOCAB}, 32\)"):
        lfx.load_peft(copy.deepcopy(base), tmp_path)


# --- grouped convs: PEFT's factors mix the groups -------------------------------------------


@pytest.fixture(scope="module")
def grouped(tmp_path_factory):
    """PEFT's LoRA on the grouped conv (16 -> 32 channels, groups=2, padded 3x3), saved, and its graph."""
    directory = tmp_path_factory.mktemp("grouped")
    model, x = pm.build("Conv2dGroups2"), pm.INPUTS["Conv2dGroups2"]()
    config = peft.LoraConfig(target_modules=["conv2d"], r=4, lora_alpha=8, init_lora_weights=False)
    theirs = peft.get_peft_model(copy.deepcopy(model), config).eval()
    theirs.save_pretrained(directory)
    gm = lfx.load_peft(copy.deepcopy(model), directory, example_inputs=(x,)).eval()
    return model, x, theirs, gm


def test_grouped_conv_runs_unmerged_as_peft(grouped, tmp_path):
    model, x, theirs, gm = grouped
    assert gm.meta["lowrank_fx"].adapters["default"].spec.method == lfx.LoRA(rank=4, alpha=8.0, mixed_groups=True)
    a = gm.lowrank_fx.default.lora.units["conv2d"].lora_A
    assert a.shape == (4, 16, 3, 3) and a[:2, 8:].abs().max() > 0  # rows of group 0 read group 1's channels
    with torch.no_grad():
        ours, expected = gm(x), theirs(x)
        assert rel(ours, model(x)) > 1e-3
        assert rel(ours, expected) <= TOL
    for fold in (lfx.merge, lfx.merged_state_dict, lambda g: lfx.merge(g, inplace=True)):
        with pytest.raises(lfx.MergeError, match="cannot fold adapter 'default' into conv2d: .*mixed_groups=True"
                                                 ".*no grouped kernel holds"):
            fold(gm)
    with torch.no_grad():
        assert rel(gm(x), expected) <= TOL  # nothing changed

    lfx.save_peft(gm, tmp_path / "back")  # PEFT's layout goes back as it came
    again = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "back").eval()
    with torch.no_grad():
        assert rel(again(x), expected) <= TOL


def test_grouped_conv_exports_with_its_adapter(grouped, tmp_path):
    _, x, theirs, gm = grouped
    with pytest.raises(lfx.MergeError, match="mixed_groups=True"):
        lfx.export_onnx(gm, tmp_path / "merged.onnx", example_inputs=(x,), mode="merged")
    export = lfx.export_onnx(gm, tmp_path / "m.onnx", example_inputs=(x,), mode="adapters")
    out = export.session().run({export.inputs[0]: x.numpy()}, adapter="default")
    with torch.no_grad():
        assert rel(torch.from_numpy(out[export.outputs[0]]), theirs(x)) <= TOL


def test_our_mixed_groups_lora_trains_and_loads_in_peft(tmp_path):
    model, x = pm.build("Conv2dGroups2"), pm.INPUTS["Conv2dGroups2"]()
    gm = lfx.rewrite(copy.deepcopy(model), lfx.Spec(["conv2d"], method=lfx.LoRA(rank=4, mixed_groups=True,
                                                                               init="nonzero")), example_inputs=(x,))
    gm(x).sum().backward()
    unit = gm.lowrank_fx.default.lora.units["conv2d"]
    assert unit.lora_A.grad.abs().max() > 0 and unit.lora_B.grad.abs().max() > 0
    gm.eval()
    lfx.save_peft(gm, tmp_path)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path).eval()
    with torch.no_grad():
        assert rel(gm(x), theirs(x)) <= TOL


def test_block_diagonal_peft_factors_load_as_a_foldable_grouped_lora(tmp_path):
    """Our grouped LoRA, saved for PEFT (A zero outside the groups), comes back grouped, and folds."""
    model, x = pm.build("Conv2dGroups2"), pm.INPUTS["Conv2dGroups2"]()
    gm = lfx.rewrite(copy.deepcopy(model), lfx.Spec(["conv2d"], method=lfx.LoRA(rank=4, init="nonzero")),
                     example_inputs=(x,)).eval()
    lfx.save_peft(gm, tmp_path)
    back = lfx.load_peft(copy.deepcopy(model), tmp_path, example_inputs=(x,)).eval()
    assert back.meta["lowrank_fx"].adapters["default"].spec.method == lfx.LoRA(rank=4, alpha=16.0)
    with torch.no_grad():
        assert rel(back(x), gm(x)) <= TOL
        assert rel(lfx.merge(back)(x), gm(x)) <= TOL


def test_mixed_groups_with_dora_is_refused():
    with pytest.raises(lfx.SpecError, match=r"LoRA\(dora=True, mixed_groups=True\).*use mixed_groups=False"):
        lfx.LoRA(dora=True, mixed_groups=True)


# --- trained biases: bias="lora_only" / "all" -----------------------------------------------

BIAS_ROWS = [
    ("MLP", {"target_modules": ["lin0"], "bias": "lora_only"}),
    ("MLP", {"target_modules": ["lin0"], "bias": "all"}),
    ("MLP", {"target_modules": ["lin0", "lin1"], "bias": "all", "use_dora": True}),
    ("Conv2d", {"target_modules": ["conv2d"], "bias": "lora_only"}),
    ("Conv2d", {"target_modules": ["conv2d"], "bias": "all"}),
]


def peft_with_trained_biases(model, settings):
    """A PEFT model with random factors and every bias it trains moved off the base."""
    theirs = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(init_lora_weights=False, **settings))
    with torch.no_grad():
        for name, param in theirs.named_parameters():
            if name.endswith(".bias") and param.requires_grad:
                param.add_(torch.randn_like(param))
    return theirs.eval()


@pytest.mark.parametrize("model_name,settings", BIAS_ROWS, ids=[f"{m}-{s['bias']}-{len(s)}" for m, s in BIAS_ROWS])
def test_trained_biases_load_merge_and_save(model_name, settings, tmp_path):
    model, x = pm.build(model_name), pm.INPUTS[model_name]()
    theirs = peft_with_trained_biases(model, settings)
    theirs.save_pretrained(tmp_path / "peft")
    gm = lfx.load_peft(copy.deepcopy(model), tmp_path / "peft", example_inputs=(x,)).eval()
    trained = gm.lowrank_fx.default.trained.copies()
    expected_biases = {f"{m}.bias" for m in settings["target_modules"]}
    if settings["bias"] == "all":
        expected_biases = {n for n, _ in model.named_parameters() if n.endswith(".bias")}
    assert set(trained) == expected_biases
    assert all(p.requires_grad and not torch.equal(p, model.get_parameter(n)) for n, p in trained.items())
    with torch.no_grad():
        expected = theirs(x)
        ours = gm(x)
        assert rel(ours, model(x)) > 1e-3
        assert rel(ours, expected) <= TOL
        merged = lfx.merge(gm)(x)
        assert rel(merged, expected) <= TOL
        assert rel(merged, copy.deepcopy(theirs).merge_and_unload()(x)) <= TOL  # PEFT's own merge
    lfx.save_peft(gm, tmp_path / "back")
    config = json.loads((tmp_path / "back" / "adapter_config.json").read_text())
    assert config["bias"] == settings["bias"]
    assert set(keys(tmp_path / "back")) == set(keys(tmp_path / "peft"))
    again = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "back").eval()
    with torch.no_grad():
        assert rel(again(x), expected) <= TOL


def test_our_trained_biases_pick_the_peft_setting(tmp_path):
    model, x = pm.build("MLP"), pm.INPUTS["MLP"]()
    method = lfx.LoRA(rank=4, init="nonzero")
    for train, setting in ((["lin0.bias"], "lora_only"), (["*.bias"], "all"), (["lin1.bias"], "all")):
        gm = lfx.rewrite(copy.deepcopy(model), lfx.Spec(["lin0"], method=method, train=train), example_inputs=(x,))
        with torch.no_grad():
            for param in gm.lowrank_fx.default.trained.parameters():
                param.add_(torch.randn_like(param))
        gm.eval()
        lfx.save_peft(gm, tmp_path / setting)
        assert json.loads((tmp_path / setting / "adapter_config.json").read_text())["bias"] == setting
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / setting).eval()
        with torch.no_grad():
            assert rel(theirs(x), gm(x)) <= TOL


def test_trained_bias_conflicts_and_non_bias_parameters(tmp_path):
    model, x = pm.build("MLP"), pm.INPUTS["MLP"]()
    with pytest.raises(lfx.SpecError, match=r"trains the bias of lin0, which LoRA\(bias=True\) also updates"):
        lfx.rewrite(copy.deepcopy(model), lfx.Spec(["lin0"], method=lfx.LoRA(bias=True), train=["*.bias"]),
                    example_inputs=(x,))
    theirs = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(target_modules=["lin0"], bias="lora_only",
                                                                       lora_bias=True))
    theirs.save_pretrained(tmp_path / "both")
    with pytest.raises(lfx.AdapterFileError, match=r"LoRA\(bias=True\) also updates"):
        lfx.load_peft(copy.deepcopy(model), tmp_path / "both", example_inputs=(x,))
    gm = lfx.rewrite(copy.deepcopy(model), lfx.Spec(["lin0"], method=lfx.LoRA(), train=[r"re:^lin1\.weight$"]),
                     example_inputs=(x,))
    with pytest.raises(lfx.AdapterFileError, match=r"not biases \(lin1\.weight\); PEFT trains single parameters only"):
        lfx.save_peft(gm, tmp_path / "weight")


def test_all_biases_beside_a_saved_module(tmp_path):
    """bias="all" with modules_to_save: PEFT also stores the wrapper's biases (the copy's, and the
    original module's, which must be the model's)."""
    model, x = pm.build("MLP"), pm.INPUTS["MLP"]()
    theirs = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(
        target_modules=["lin0"], modules_to_save=["lin1"], bias="all", init_lora_weights=False))
    with torch.no_grad():
        for name, param in theirs.named_parameters():
            if param.requires_grad and "lora_" not in name and "original_module" not in name:
                param.add_(torch.randn_like(param))
    theirs.eval().save_pretrained(tmp_path / "peft")
    assert {"base_model.model.lin1.modules_to_save.bias", "base_model.model.lin1.original_module.bias"} <= set(
        keys(tmp_path / "peft"))
    gm = lfx.load_peft(copy.deepcopy(model), tmp_path / "peft", example_inputs=(x,)).eval()
    with torch.no_grad():
        expected = theirs(x)
        assert rel(gm(x), model(x)) > 1e-3
        assert rel(gm(x), expected) <= TOL
    lfx.save_peft(gm, tmp_path / "back")
    assert json.loads((tmp_path / "back" / "adapter_config.json").read_text())["bias"] == "all"
    again = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "back").eval()
    with torch.no_grad():
        assert rel(again(x), expected) <= TOL

    with torch.no_grad():
        theirs.base_model.model.lin1.original_module.bias.add_(0.5)
    theirs.save_pretrained(tmp_path / "moved")
    with pytest.raises(lfx.AdapterFileError, match=r"lin1\.bias: differs from the model's by up to 0\.5"):
        lfx.load_peft(copy.deepcopy(model), tmp_path / "moved", example_inputs=(x,))
