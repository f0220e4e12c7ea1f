"""LoRA on mixture-of-experts stacks: 3-D expert weights of transformers 5's own MoE modules.

Oracles (fp32, 1e-5 relative to the largest value):
  - PEFT's target_parameters LoRA on the same stacks with the same factors (outputs and gradients),
    and PEFT directories both ways;
  - a hand loop over every routed (token, expert) pair with W[e] + s · B[e] A[e];
  - the original model after folding in place, at a batch and length the capture never saw.
Graphs are captured once per family (module-scoped); only two small experts modules go to ONNX.
"""

import copy

import numpy as np
import pytest
import torch
import transformers as T
from peft import LoraConfig, PeftModel, get_peft_model

import lowrank_fx as lfx

STACKS = ["experts.gate_up_proj", "experts.down_proj"]
COMMON = dict(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)


def build(family: str):
    if family == "qwen3_moe":
        config = T.Qwen3MoeConfig(**{**COMMON, "num_hidden_layers": 2}, intermediate_size=48, moe_intermediate_size=24,
                                  head_dim=8, num_experts=4, num_experts_per_tok=2)
        model = T.Qwen3MoeForCausalLM(config)
    elif family == "mixtral":
        model = T.MixtralForCausalLM(T.MixtralConfig(**COMMON, intermediate_size=24, num_local_experts=4,
                                                     num_experts_per_tok=2))
    elif family == "olmoe":
        model = T.OlmoeForCausalLM(T.OlmoeConfig(**COMMON, intermediate_size=24, num_experts=4, num_experts_per_tok=2,
                                                 eos_token_id=1, pad_token_id=0))
    elif family == "gpt_oss":
        model = T.GptOssForCausalLM(T.GptOssConfig(**COMMON, intermediate_size=24, head_dim=8, num_local_experts=4,
                                                   num_experts_per_tok=2, layer_types=["full_attention"]))
    else:
        model = T.DeepseekV3ForCausalLM(T.DeepseekV3Config(
            **{**COMMON, "num_key_value_heads": 4}, intermediate_size=48, moe_intermediate_size=24, n_routed_experts=4,
            num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=0, n_group=1, topk_group=1,
            kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8))
    with torch.no_grad():  # random experts and router (some inits leave them at 0)
        for name, parameter in model.named_parameters():
            if parameter.dim() == 3 or name.endswith(("gate.weight", "router.weight")):
                parameter.normal_(0, 0.3)
    return model


def logits(output):
    return output.logits if hasattr(output, "logits") else output[0]


def rel(got, want) -> float:
    return float((got - want).detach().abs().max() / want.detach().abs().max())


def units(gm, adapter="default"):
    return {name.replace("-", "."): unit for name, unit in gm.lowrank_fx[adapter].lora.units.items()}


def copy_into_peft(gm, peft_model):
    """Our factors into PEFT's ParamWrappers (the first stack of a module is wrapped innermost)."""
    for name, unit in units(gm).items():
        module, _, param = name.rpartition(".")
        wrapped = "base_layer." if param == "gate_up_proj" else ""
        experts, rank, width = unit.lora_A.shape
        prefix = f"base_model.model.{module}.{wrapped}"
        with torch.no_grad():
            peft_model.get_parameter(prefix + "lora_A.default.weight").copy_(unit.lora_A.reshape(experts * rank, width))
            peft_model.get_parameter(prefix + "lora_B.default.weight").copy_(
                unit.lora_B.permute(1, 2, 0).reshape(unit.lora_B.shape[1], -1))


FAMILIES = ["qwen3_moe", "mixtral", "olmoe", "gpt_oss", "deepseek_v3"]


@pytest.fixture(scope="module", params=FAMILIES)
def adapted(request):
    torch.manual_seed(0)
    model = build(request.param)
    spec = lfx.Spec(targets=STACKS, method=lfx.LoRA(rank=4, alpha=8.0, init="nonzero"))
    gm = lfx.rewrite(model, spec, example_kwargs={"input_ids": torch.randint(0, 64, (2, 5)), "use_cache": False})
    return request.param, model, gm


def test_family_equals_peft_in_outputs_and_gradients_and_folds_into_the_model(adapted, tmp_path):
    _family, model, gm = adapted
    layers = len(model.model.layers)  # Qwen3-MoE has 2: the second layer's stacks are found in its traced copy
    assert {type(u.op_kind).__name__ for u in units(gm).values()} == {"ExpertsKind"} and len(units(gm)) == 2 * layers
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, lora_alpha=8, target_modules=[],
                                                                 target_parameters=STACKS))
    copy_into_peft(gm, peft_model)
    ids = torch.randint(0, 64, (3, 7))  # another batch and length than captured: another routing too
    ours, theirs = logits(gm(input_ids=ids)), logits(peft_model(input_ids=ids))
    assert rel(ours, theirs) <= 1e-5
    ours.square().mean().backward()
    theirs.square().mean().backward()
    for name, unit in units(gm).items():
        module, _, param = name.rpartition(".")
        prefix = f"base_model.model.{module}.{'base_layer.' if param == 'gate_up_proj' else ''}"
        grad_a = peft_model.get_parameter(prefix + "lora_A.default.weight").grad
        grad_b = peft_model.get_parameter(prefix + "lora_B.default.weight").grad
        assert rel(unit.lora_A.grad.reshape(grad_a.shape), grad_a) <= 1e-5, name
        assert rel(unit.lora_B.grad.permute(1, 2, 0).reshape(grad_b.shape), grad_b) <= 1e-5, name
    trainable = [n for n, p in gm.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)  # the router (and all the base) stays frozen
    # our directory in PEFT
    lfx.save_peft(gm, tmp_path / "ours")
    loaded = PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "ours")
    with torch.no_grad():
        assert rel(logits(loaded(input_ids=ids)), ours.detach()) <= 1e-5
    # a PEFT directory (its nested ParamWrapper names) into ours: the capture is the memoised one
    peft_other = get_peft_model(copy.deepcopy(model), LoraConfig(r=2, lora_alpha=4, target_modules=[],
                                                                 target_parameters=STACKS, init_lora_weights=False))
    peft_other.save_pretrained(tmp_path / "theirs")
    example = {"input_ids": torch.randint(0, 64, (2, 5)), "use_cache": False}
    from_peft = lfx.load_peft(model, tmp_path / "theirs", example_kwargs=example)
    assert {tuple(u.lora_A.shape[:2]) for u in units(from_peft).values()} == {(4, 2)}
    with torch.no_grad():
        assert rel(logits(from_peft(input_ids=ids)), logits(peft_other(input_ids=ids))) <= 1e-5
    # fold into the original model, run there at yet another batch and length
    other = torch.randint(0, 64, (4, 3))
    with torch.no_grad():
        want = logits(gm(input_ids=other))
        lfx.merge(gm, inplace=True)
        assert rel(logits(model(input_ids=other)), want) <= 1e-5


# --- one experts module, captured alone: a hand loop is the oracle, the routing an input ---

def experts_module(family: str):
    torch.manual_seed(2)
    model = build(family)
    return model.model.layers[0].mlp.experts


def routing(tokens: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    index = torch.stack([torch.randperm(4, generator=generator)[:2] for _ in range(tokens)])
    return torch.randn(tokens, 32, generator=generator), index, torch.rand(tokens, 2, generator=generator)


def hand_loop(module, adapted_units, hidden, index, weights):
    """Σ_k w_tk · expert_{e_tk}(x_t) with W[e] + ΔW[e], one pair at a time."""
    stacks = {}
    for name in ("gate_up_proj", "down_proj"):
        unit = adapted_units[name]
        delta = unit.lora_B @ unit.lora_A * unit.scale  # (E, out, in)
        stacks[name] = getattr(module, name) + (delta if not module.is_transposed else delta.transpose(-2, -1))
    rows = []
    for t in range(hidden.shape[0]):
        total = 0
        for k in range(index.shape[1]):
            e = int(index[t, k])
            gate_up = stacks["gate_up_proj"][e]
            up = hidden[t] @ gate_up if module.is_transposed else gate_up @ hidden[t]
            if module.has_bias:
                up = up + module.gate_up_proj_bias[e]
            h = module._apply_gate(up)
            down = h @ stacks["down_proj"][e] if module.is_transposed else stacks["down_proj"][e] @ h
            if module.has_bias:
                down = down + module.down_proj_bias[e]
            total = total + weights[t, k] * down
        rows.append(total)
    return torch.stack(rows)


@pytest.mark.parametrize("family,implementation", [("qwen3_moe", "batched_mm"), ("qwen3_moe", "grouped_mm"),
                                                   ("gpt_oss", "batched_mm"), ("gpt_oss", "grouped_mm")])
def test_hand_loop_over_experts_with_routing_unseen_at_capture(family, implementation):
    module = experts_module(family)
    spec = lfx.Spec(targets=["gate_up_proj", "down_proj"], method=lfx.LoRA(rank=3, init="nonzero"))
    with lfx.experts_implementation(implementation):
        gm = lfx.rewrite(module, spec, example_inputs=routing(6, seed=0))
    hidden, index, weights = routing(9, seed=1)  # other tokens, other experts hit
    hidden.requires_grad_(True)  # the base op's input gradient too
    ours = gm(hidden, index, weights)
    adapted_units = units(gm)
    want = hand_loop(module, adapted_units, hidden, index, weights)
    assert rel(ours, want) <= 1e-5
    ours.square().sum().backward()
    grads = [p.grad.clone() for u in adapted_units.values() for p in (u.lora_A, u.lora_B)] + [hidden.grad.clone()]
    for unit in adapted_units.values():
        unit.lora_A.grad = unit.lora_B.grad = None
    hidden.grad = None
    hand_loop(module, adapted_units, hidden, index, weights).square().sum().backward()
    again = [p.grad for u in adapted_units.values() for p in (u.lora_A, u.lora_B)] + [hidden.grad]
    assert all(rel(g, h) <= 1e-5 for g, h in zip(grads, again))


def test_implementation_is_part_of_the_capture_and_grouped_training_compiles(tmp_path):
    module = experts_module("qwen3_moe")
    own = module.config._experts_implementation
    spec = lfx.Spec(targets=["gate_up_proj", "down_proj"], method=lfx.LoRA(rank=3, init="nonzero"))
    batched = lfx.rewrite(module, spec, example_inputs=routing(6, seed=0))
    with lfx.experts_implementation("grouped_mm"):
        gm = lfx.rewrite(module, spec, example_inputs=routing(6, seed=0))  # same model and shapes: not the memo's
    grouped = [n for n in gm.graph.nodes if "grouped_mm" in str(n.target)]
    assert len(grouped) == 2 and not any("grouped_mm" in str(n.target) for n in batched.graph.nodes)
    assert {str(n.target) for n in grouped} == {"lowrank_fx.grouped_mm.default"}  # torch's kernel, not the loop
    assert module.config._experts_implementation == own  # the model's own setting is back
    hidden, index, weights = routing(11, seed=3)
    eager = gm(hidden, index, weights)
    compiled = torch.compile(gm, backend="aot_eager", dynamic=True)(hidden, index, weights)
    assert rel(compiled, eager) <= 1e-5
    # trained on the grouped capture, loaded into the batched one (the one ONNX takes)
    lfx.save_adapters(gm, tmp_path / "grouped.safetensors")
    lfx.load_adapters(batched, tmp_path / "grouped.safetensors")
    assert rel(batched(hidden, index, weights), eager) <= 1e-5


def test_shared_experts_is_one_update_for_every_expert(tmp_path):
    module = experts_module("qwen3_moe")
    example = routing(6, seed=0)
    shared = lfx.rewrite(module, lfx.Spec(targets=["gate_up_proj", "down_proj"],
                                          method=lfx.LoRA(rank=2, init="nonzero", shared_experts=True)),
                         example_inputs=example)
    per_expert = lfx.rewrite(module, lfx.Spec(targets=["gate_up_proj", "down_proj"], method=lfx.LoRA(rank=2)),
                             example_inputs=example)
    for name, unit in units(shared).items():
        assert unit.lora_A.dim() == 2
        with torch.no_grad():  # every expert gets the shared factors
            units(per_expert)[name].lora_A.copy_(unit.lora_A.expand_as(units(per_expert)[name].lora_A))
            units(per_expert)[name].lora_B.copy_(unit.lora_B.expand_as(units(per_expert)[name].lora_B))
    hidden, index, weights = routing(7, seed=4)
    want = per_expert(hidden, index, weights)
    assert rel(shared(hidden, index, weights), want) <= 1e-5
    assert rel(lfx.merge(shared)(hidden, index, weights), want) <= 1e-5
    lfx.save_adapters(shared, tmp_path / "shared.safetensors")
    loaded = lfx.load_adapters(module, tmp_path / "shared.safetensors", example_inputs=example)
    assert all(u.shared_experts for u in units(loaded).values())
    assert rel(loaded(hidden, index, weights), want) <= 1e-5


# --- ONNX: the experts module alone, routing as inputs ---

@pytest.fixture(scope="module")
def onnx_exports(tmp_path_factory):
    module = experts_module("gpt_oss")
    example = routing(6, seed=0)
    spec = lfx.Spec(targets=["gate_up_proj", "down_proj"], method=lfx.LoRA(rank=3, init="nonzero"))
    gm = lfx.rewrite(lfx.rewrite(module, spec, example_inputs=example), spec, adapter="b")
    gm.eval()
    folder = tmp_path_factory.mktemp("moe_onnx")
    # one token axis for the three inputs (every axis left free, the top-k axis too, ONNX Runtime
    # cannot tie the tokens of the routing to those of the hidden states)
    tokens = torch.export.Dim("tokens")
    shapes = {"hidden_states": {0: tokens}, "router_indices": {0: tokens}, "routing_weights": {0: tokens}}
    merged = lfx.export_onnx(gm, folder / "merged.onnx", example_inputs=example, mode="merged", optimize=False,
                             dynamic_shapes=shapes)
    swappable = lfx.export_onnx(gm, folder / "adapters.onnx", example_inputs=example, mode="adapters", optimize=False,
                                dynamic_shapes=shapes)
    return gm, merged, swappable


def test_onnx_merged_and_swappable_adapters_follow_the_routing(onnx_exports):
    gm, merged, swappable = onnx_exports
    hidden, index, weights = routing(9, seed=5)
    feeds = {name: value.numpy() for name, value in zip(merged.inputs, (hidden, index, weights))}
    with torch.no_grad():
        want = gm(hidden, index, weights).numpy()  # both adapters active
    got = merged.session().run(feeds)[merged.outputs[0]]
    assert np.abs(got - want).max() / np.abs(want).max() <= 1e-5
    session = swappable.session()
    for adapter in [None, "default", "b"]:
        lfx.set_active_adapters(gm, [adapter] if adapter else [])
        with torch.no_grad():
            want = gm(hidden, index, weights).numpy()
        got = session.run(feeds, adapter=adapter)[swappable.outputs[0]]
        assert np.abs(got - want).max() / np.abs(want).max() <= 1e-5, adapter
    lfx.set_active_adapters(gm, ["default", "b"])


# --- refusals ---

def test_grouped_capture_is_refused_for_onnx(tmp_path):
    module = experts_module("qwen3_moe")
    with lfx.experts_implementation("grouped_mm"):
        gm = lfx.rewrite(module, lfx.Spec(targets=["gate_up_proj"]), example_inputs=routing(6, seed=0))
    with pytest.raises(lfx.ExportError, match="grouped"):
        lfx.export_onnx(gm, tmp_path / "m.onnx", example_inputs=routing(6, seed=0))


@pytest.mark.parametrize("method,message", [
    (lfx.LoRA(dora=True), "DoRA"), (lfx.LoRA(bias=True), "bias"), (lfx.LoRA(rank=25), "rank 25"),
    (lfx.LoRTA(rank=2), "only LoRA"), (lfx.RandLoRA(rank=2), "only LoRA")])
def test_stack_refusals(method, message):
    module = experts_module("qwen3_moe")
    with pytest.raises(lfx.SpecError, match=message):
        lfx.rewrite(module, lfx.Spec(targets=["down_proj"], method=method), example_inputs=routing(6, seed=0))


def test_unknown_experts_implementation():
    with pytest.raises(lfx.SpecError, match="batched_mm"), lfx.experts_implementation("eager"):
        pass


@pytest.fixture(scope="module")
def mixtral():
    torch.manual_seed(3)
    return build("mixtral")  # captured once, by the first test (the capture is memoised per model)


def test_all_linear_leaves_routers_and_stacks_out_and_the_router_frozen(mixtral):
    model = mixtral
    kwargs = {"input_ids": torch.randint(0, 64, (2, 5)), "use_cache": False}
    left = lfx.plan(model, lfx.Spec(targets="all-linear"), example_kwargs=kwargs).left_out
    assert "router" in left["model.layers.0.mlp.gate"] and "experts" in left["model.layers.0.mlp.experts.down_proj"]
    gm = lfx.rewrite(model, lfx.Spec(targets=["all-linear", *STACKS]), example_kwargs=kwargs)
    adapted = set(gm.meta["lowrank_fx"].adapters["default"].groups)
    assert "model.layers.0.mlp.gate" not in adapted and "model.layers.0.mlp.experts.down_proj" in adapted
    logits(gm(input_ids=torch.randint(0, 64, (3, 4)))).sum().backward()
    assert model.model.layers[0].mlp.gate.weight.grad is None


def test_shared_update_saves_as_per_expert_copies_peft_loads(mixtral, tmp_path):
    model = mixtral
    spec = lfx.Spec(targets=STACKS, method=lfx.LoRA(rank=2, init="nonzero", shared_experts=True))
    gm = lfx.rewrite(model, spec, example_kwargs={"input_ids": torch.randint(0, 64, (2, 5)), "use_cache": False})
    lfx.save_peft(gm, tmp_path)
    loaded = PeftModel.from_pretrained(copy.deepcopy(model), tmp_path)
    ids = torch.randint(0, 64, (3, 6))
    with torch.no_grad():
        assert rel(logits(loaded(input_ids=ids)), logits(gm(input_ids=ids))) <= 1e-5
