"""PEFT's own custom-model matrix (the LoraConfig rows of its TEST_CASES), against PEFT itself.

Each row adapts one of PEFT's small models (peft_matrix_models.py) with the row's settings.
Both directions run with identical weights, fp32, relative error 1e-5:
  - ours -> PEFT: our adapter (random non-zero factors, DoRA magnitudes perturbed) saved with
    `save_peft` and loaded by `PeftModel.from_pretrained` gives the same outputs; `merge` and
    `merged_state_dict` (loaded into a fresh model) give them too, as does PEFT's
    `merge_and_unload` (PEFT cannot merge grouped convs, so those rows skip only that);
  - PEFT -> ours: a PEFT adapter with random factors (`init_lora_weights=False`) loaded with
    `load_peft` gives PEFT's outputs. On grouped convs PEFT's factor mixes input channels across
    groups: it loads as LoRA(mixed_groups=True), runs unmerged with PEFT's outputs, and `merge`
    refuses it (as PEFT does); PEFT's grouped DoRA is refused (see below why it is not DoRA).
Where PEFT does not compute the method, the oracle is `hand_merged`: the original model with
each adapted weight written in by hand from PEFT's own tensors (W + s · B A; DoRA's
m ⊙ V / ‖V‖), run through the model's own forward:
  - MultiheadAttention: PEFT (0.21.2 and its main branch) adds the out_proj update twice when it
    merges an MHA (its MHA layer merges out_proj by hand, then calls out_proj's own merge), in the
    forward as in merge_and_unload. Ours is checked against the oracle (in_proj and out_proj
    updated once, through F.multi_head_attention_forward); PEFT's output equals the oracle with
    out_proj's update doubled, which the rows assert to pin down what PEFT computes;
  - DoRA on grouped convs: PEFT computes DoRA's norm from `B.view(-1, r) @ A.view(r, -1)`, which
    is not the update of a grouped factor pair, so its outputs are not DoRA's; the oracle is the
    grouped kernel's DoRA weight, with the norm of each output channel over (in/g, k, k), run by
    the model's F.conv2d(groups=g).
Research variants of LoraConfig (VeLoRA, KaSA, MiCA, MonteCLoRA, BD-LoRA) are refused with a clear error.
"""

from __future__ import annotations

import copy

import peft
import peft_matrix_models as pm
import pytest
import torch

import lowrank_fx as lfx

# (row id, model, LoraConfig settings) in the order of PEFT's TEST_CASES.
ROWS = [
    ("Vanilla MLP 1 LoRA", "MLP", {"target_modules": "lin0"}),
    ("Vanilla MLP 2 LoRA", "MLP", {"target_modules": ["lin0"]}),
    ("Vanilla MLP 3 LoRA", "MLP", {"target_modules": ["lin1"]}),
    ("Vanilla MLP 4 LoRA", "MLP", {"target_modules": ["lin0", "lin1"]}),
    ("Vanilla MLP 5 LoRA", "MLP", {"target_modules": ["lin0"], "modules_to_save": ["lin1"]}),
    ("Vanilla MLP 6 LoRA", "MLP", {"target_modules": ["lin0"], "lora_alpha": 4, "lora_dropout": 0.1}),
    ("Vanilla MLP 7 LoRA with DoRA", "MLP", {"target_modules": ["lin0"], "use_dora": True}),
    ("Vanilla MLP 8 LoRA with DoRA", "MLP", {"target_modules": ["lin0", "lin1"], "use_dora": True}),
    ("Vanilla MLP 9 LoRA with DoRA", "MLP", {"target_modules": "lin1", "use_dora": True, "lora_alpha": 32}),
    ("Embedding + transformers Conv1D 1 LoRA", "EmbConv1D", {"target_modules": ["conv1d"]}),
    ("Embedding + transformers Conv1D 2 LoRA", "EmbConv1D", {"target_modules": ["emb"]}),
    ("Embedding + transformers Conv1D 3 LoRA", "EmbConv1D", {"target_modules": ["emb", "conv1d"]}),
    ("Embedding + transformers Conv1D 1 DoRA", "EmbConv1D", {"target_modules": ["conv1d"], "use_dora": True}),
    ("Embedding + transformers Conv1D 2 DoRA", "EmbConv1D", {"target_modules": ["emb"], "use_dora": True}),
    ("Embedding + transformers Conv1D 3 DoRA", "EmbConv1D", {"target_modules": ["emb", "conv1d"], "use_dora": True}),
    ("Embedding + transformers Conv1D 1 LoRA trainable_tokens", "EmbConv1D",
     {"target_modules": ["conv1d"], "trainable_token_indices": {"emb": [0, 10]}}),
    ("Conv1d LoRA", "Conv1d", {"target_modules": ["conv1d"]}),
    ("Conv1d LoRA with DoRA", "Conv1d", {"target_modules": ["conv1d"], "use_dora": True}),
    ("Conv2d 1 LoRA", "Conv2d", {"target_modules": ["conv2d"]}),
    ("Conv2d 2 LoRA", "Conv2d", {"target_modules": ["conv2d", "lin0"]}),
    ("Conv2d 1 LoRA with DoRA", "Conv2d", {"target_modules": ["conv2d"], "use_dora": True}),
    ("Conv2d 2 LoRA with DoRA", "Conv2d", {"target_modules": ["conv2d", "lin0"], "use_dora": True}),
    ("Conv2d Groups LoRA", "Conv2dGroups", {"target_modules": ["conv2d"]}),
    ("Conv2d Groups2 LoRA", "Conv2dGroups2", {"target_modules": ["conv2d"]}),
    ("Conv2d Groups LoRA with DoRA", "Conv2dGroups", {"target_modules": ["conv2d"], "use_dora": True}),
    ("Conv2d Groups2 LoRA with DoRA", "Conv2dGroups2", {"target_modules": ["conv2d"], "use_dora": True}),
    ("Conv3d 1 LoRA", "Conv3d", {"target_modules": ["conv3d"]}),
    ("Conv3d 2 LoRA", "Conv3d", {"target_modules": ["conv3d", "lin0"]}),
    ("Conv3d 1 LoRA with DoRA", "Conv3d", {"target_modules": ["conv3d"], "use_dora": True}),
    ("Conv3d 2 LoRA with DoRA", "Conv3d", {"target_modules": ["conv3d", "lin0"], "use_dora": True}),
    ("Vanilla MLP 1 LoRA with lora_b bias", "MLP", {"target_modules": ["lin0", "lin1"], "lora_bias": True, "lora_alpha": 32}),
    ("Conv2d 1 LoRA with lora_b bias", "Conv2d", {"target_modules": ["conv2d"], "lora_bias": True, "lora_alpha": 32}),
    ("Conv3d 1 LoRA with lora_b bias", "Conv3d", {"target_modules": ["conv3d"], "lora_bias": True, "lora_alpha": 32}),
    ("MHA 1 LoRA", "MHA", {"target_modules": ["mha"]}),
    ("MHA 2 LoRA", "MHA", {"target_modules": ["mha", "lin0"]}),
    ("MLP 1 using nn.Parameter LoRA", "MlpUsingParameters", {"target_parameters": ["lin0.weight"]}),
    ("MLP 2 using nn.Parameter LoRA", "MLP", {"target_modules": ["lin0"], "target_parameters": ["lin1.weight"]}),
]
GROUPED = {"Conv2dGroups", "Conv2dGroups2"}
# PEFT adapts nn.MultiheadAttention as one module: our targets are its two projections.
MODULE_TARGETS = {"mha": ["mha.in_proj", "mha.out_proj"]}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max())


def our_spec(settings: dict) -> lfx.Spec:
    modules = settings.get("target_modules", [])
    modules = [modules] if isinstance(modules, str) else modules
    targets = [t for m in modules for t in MODULE_TARGETS.get(m, [m])] + settings.get("target_parameters", [])
    method = lfx.LoRA(rank=settings.get("r", 8), alpha=float(settings.get("lora_alpha", 8)),
                      dropout=settings.get("lora_dropout", 0.0), dora=settings.get("use_dora", False),
                      bias=settings.get("lora_bias", False), init="nonzero")
    tokens = settings.get("trainable_token_indices", {})
    return lfx.Spec(targets={**{t: method for t in targets},
                             **{m: lfx.TrainableTokens(indices=i) for m, i in tokens.items()}},
                    train=settings.get("modules_to_save", ()))


def as_peft_computes(gm, model_name: str):
    """`gm`, or for the MHA rows a copy with out_proj's B doubled (PEFT's double merge, above)."""
    if model_name != "MHA" or not hasattr(gm.lowrank_fx.default.lora.units, "mha-out_proj"):
        return gm
    gm = copy.deepcopy(gm)
    with torch.no_grad():
        gm.lowrank_fx.default.lora.units["mha-out_proj"].lora_B.mul_(2)
    return gm


def peft_update(layer, shape: torch.Size) -> torch.Tensor:
    """s · B A of one PEFT LoRA layer, from its own tensors, in the base weight's `shape`. On a conv
    with groups g PEFT's A (r, in, k…) spans every input channel and B (out, r/g) is grouped: output
    channel o of group j gets Σ_l B[o, l] A[j·r/g + l], whose input channels outside group j must be
    zero for the update to be a grouped kernel."""
    a, b, s = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.scaling["default"]
    out, r = b.shape[0], a.shape[0]
    g = getattr(layer.get_base_layer(), "groups", 1)
    full = (b.reshape(g, out // g, r // g) @ a.reshape(g, r // g, -1)).reshape(out, g, -1)  # (out, g, in/g · k…)
    rows, own = torch.arange(out), torch.arange(out) // (out // g)
    outside = torch.ones(out, g, dtype=torch.bool)
    outside[rows, own] = False
    assert not full[outside].any(), "the update mixes input channels across groups"
    return s * full[rows, own].reshape(shape)


def hand_merged(model, peft_model, out_proj_times: int = 1):
    """`model` with each weight PEFT adapts written in by hand from PEFT's tensors: V = W + s · B A,
    for DoRA m ⊙ V / ‖V‖ with ‖V‖ the norm of each output channel's row (every dim but the first).
    out_proj's update counts `out_proj_times` (2: what PEFT computes for an MHA, module docstring)."""
    merged = copy.deepcopy(model)
    with torch.no_grad():
        for name, layer in peft_model.base_model.model.named_modules():
            if not isinstance(layer, peft.tuners.lora.LoraLayer):
                continue
            name = name.replace(".base_layer", "")
            target = merged.get_submodule(name)
            weight = target.in_proj_weight if isinstance(target, torch.nn.MultiheadAttention) else target.weight
            v = weight + peft_update(layer, weight.shape) * (out_proj_times if name.endswith("out_proj") else 1)
            if layer.use_dora["default"]:
                m = layer.lora_magnitude_vector["default"].weight.reshape(-1, *(1,) * (v.dim() - 1))
                v = m * v / v.flatten(1).norm(dim=1).reshape(m.shape)
            weight.copy_(v)
    return merged


def _perturb_magnitudes(gm) -> None:
    with torch.no_grad():
        for name, param in gm.lowrank_fx.named_parameters():
            if name.endswith("lora_magnitude"):
                param.mul_(1 + 0.2 * torch.randn_like(param))
            if name.endswith("lora_B_bias"):
                param.uniform_(-0.5, 0.5)
            if name.endswith(".rows") or ".trained." in name:  # token rows and trained modules start as the base
                param.add_(torch.randn_like(param))


@pytest.mark.parametrize("row,model_name,settings", ROWS, ids=[r[0] for r in ROWS])
def test_ours_to_peft(row, model_name, settings, tmp_path):
    model, x = pm.build(model_name), pm.INPUTS[model_name]()
    gm = lfx.rewrite(copy.deepcopy(model), our_spec(settings), example_inputs=(x,))
    _perturb_magnitudes(gm)
    gm.eval()
    ours = gm(x)
    lfx.save_peft(gm, tmp_path / "peft")
    theirs_model = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "peft").eval()
    with torch.no_grad():
        theirs = expected = theirs_model(x)
        if model_name == "MHA":  # PEFT doubles out_proj's update (module docstring): the oracle is by hand
            assert rel(theirs, hand_merged(model, theirs_model, out_proj_times=2)(x)) < 1e-5
            expected = hand_merged(model, theirs_model)(x)
        if model_name in GROUPED and settings.get("use_dora"):  # PEFT's grouped DoRA is not DoRA (above)
            expected = hand_merged(model, theirs_model)(x)
    assert rel(ours, expected) < 1e-5
    assert rel(lfx.merge(gm)(x), expected) < 1e-5
    fresh = pm.build(model_name, seed=1)
    fresh.load_state_dict(lfx.merged_state_dict(gm))
    with torch.no_grad():
        assert rel(fresh(x), expected) < 1e-5
        if model_name not in GROUPED:  # PEFT raises NotImplementedError merging grouped convs
            assert rel(theirs_model.merge_and_unload()(x), theirs) < 1e-5  # PEFT's merge: PEFT's forward


@pytest.mark.parametrize("row,model_name,settings", ROWS, ids=[r[0] for r in ROWS])
def test_peft_to_ours(row, model_name, settings, tmp_path):
    model, x = pm.build(model_name), pm.INPUTS[model_name]()
    peft_model = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(init_lora_weights=False, **settings)).eval()
    peft_model.save_pretrained(tmp_path / "peft")
    if model_name in GROUPED and settings.get("use_dora"):
        with pytest.raises(lfx.AdapterFileError, match="dora=True, mixed_groups=True"):
            lfx.load_peft(copy.deepcopy(model), tmp_path / "peft", example_inputs=(x,))
        return
    gm = lfx.load_peft(copy.deepcopy(model), tmp_path / "peft", example_inputs=(x,)).eval()
    with torch.no_grad():
        assert rel(as_peft_computes(gm, model_name)(x), peft_model(x)) < 1e-5
        if model_name == "MHA":
            assert rel(gm(x), hand_merged(model, peft_model)(x)) < 1e-5
    if model_name in GROUPED:
        assert gm.meta["lowrank_fx"].adapters["default"].spec.method.mixed_groups
        with pytest.raises(lfx.MergeError, match="mixes channels of the others"):
            lfx.merge(gm)


VARIANTS = [
    ("Vanilla MLP 1 LoRA with KaSA", {"target_modules": ["lin0"], "kasa_config": peft.KasaConfig(), "r": 4}, "kasa_config"),
    ("Vanilla MLP 1 LoRA with MiCA", {"target_modules": ["lin0"], "init_lora_weights": "mica", "r": 4}, "init_lora_weights"),
    ("Vanilla MLP 10 LoRA with VeLoRA random",
     {"target_modules": ["lin0"], "velora_config": peft.VeloraConfig(num_groups=2, init_type="random")}, "velora_config"),
    ("Vanilla MLP 11 LoRA with VeLoRA batch_average",
     {"target_modules": ["lin0", "lin1"], "velora_config": peft.VeloraConfig(num_groups=2, init_type="batch_average")},
     "velora_config"),
    ("Vanilla MLP 12 LoRA with VeLoRA batch_average_once",
     {"target_modules": ["lin0"], "velora_config": peft.VeloraConfig(num_groups=2, init_type="batch_average_once")},
     "velora_config"),
    ("Vanilla MLP 1 LoRA with Monteclora",
     {"target_modules": ["lin0"], "monteclora_config": peft.MontecloraConfig(num_samples=2)}, "monteclora_config"),
    ("BD-LoRA A only", {"target_modules": ["lin0", "lin1"],
                        "use_bdlora": peft.BdLoraConfig(target_modules_bd_a=["lin0"], match_strict=False)}, "use_bdlora"),
    ("BD-LoRA B only", {"target_modules": ["lin0", "lin1"],
                        "use_bdlora": peft.BdLoraConfig(target_modules_bd_b=["lin1"], nblocks=2, match_strict=False)},
     "use_bdlora"),
    ("BD-LoRA both A and B", {"target_modules": ["lin0", "lin1"], "use_bdlora": peft.BdLoraConfig(
        target_modules_bd_a=["lin0"], target_modules_bd_b=["lin1"], nblocks=2)}, "use_bdlora"),
]


@pytest.mark.parametrize("row,settings,setting", VARIANTS, ids=[v[0] for v in VARIANTS])
def test_research_variants_are_refused_by_name(row, settings, setting, tmp_path):
    model, x = pm.build("MLP"), pm.INPUTS["MLP"]()
    peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**settings)).save_pretrained(tmp_path / "peft")
    with pytest.raises(lfx.AdapterFileError, match=f"{setting}.*(research LoRA variant|MiCA)"):
        lfx.load_peft(copy.deepcopy(model), tmp_path / "peft", example_inputs=(x,))
