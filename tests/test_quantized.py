"""Quantized bases (QLoRA-style): targets through quantized weights, training against a dense
twin, torch.compile, folding, and the refusals.

The oracle is always the *dense twin*: the same Llama whose quantized weights are replaced by
their dequantized values, computed by the quantization library's own API (torchao's
`dequantize()` / `get_original_weight()`, the packed int4 kernel applied to the identity,
bitsandbytes' `dequantize_4bit` / CB·SCB/127), never by lowrank_fx. Adapters are fp32 with
non-zero initial values, so every gradient is a real one.
"""

from __future__ import annotations

import copy
import warnings

import bitsandbytes as bnb
import peft
import pytest
import torch
import torch.nn.functional as F
import transformers
from torchao.quantization import (
    Int8DynamicActivationInt8WeightConfig,
    Int8WeightOnlyConfig,
    IntxWeightOnlyConfig,
    quantize_,
    to_nf4,
)
from torchao.quantization.granularity import PerGroup

import lowrank_fx as lfx
from lowrank_fx.adapt.capture import capture
from lowrank_fx.errors import QuantizedBaseError
from lowrank_fx.graph.targets import find_targets
from lowrank_fx.passes.quantized_base import is_quantized_call

VOCAB = 128
TORCHAO_SCHEMES = ["int8", "nf4", "int4", "int4-packed"]
BNB_SCHEMES = ["bnb-nf4", "bnb-int8"]
METHODS = {
    "lora": lfx.LoRA(rank=4, init="nonzero"),
    "lorta": lfx.LoRTA(rank=4, init="nonzero"),
    "randlora": lfx.RandLoRA(rank=4, alpha=80.0, init="nonzero"),
}
# one graph carries all three methods: LoRA on q/k, LoRTA on the MLP, RandLoRA on v/o
SPEC = lfx.Spec(targets={"*.q_proj": METHODS["lora"], "*.k_proj": METHODS["lora"], "*.mlp.*": METHODS["lorta"],
                         "*.v_proj": METHODS["randlora"], "*.o_proj": METHODS["randlora"]})
METHOD_OF_GROUP = {"AdapterGroup": "lora", "LoRTAGroup": "lorta", "RandLoRAGroup": "randlora"}
LINEARS = [f"model.layers.{i}.{m}" for i in range(2) for m in
           ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
            "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
PARITY: dict[tuple[str, str], float] = {}  # (scheme, method) -> max relative gradient error, for the report


def _llama(seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(config).eval()


def _not_head(module, fqn):
    return isinstance(module, torch.nn.Linear) and "lm_head" not in fqn


MIXED = ["int8", "nf4", "int4", "int4-packed", "bnb-nf4"]  # the mixed model: layer i gets MIXED[i % 5]


def _quantized(scheme: str):
    """A tiny random Llama whose linear layers (not lm_head) torchao or bitsandbytes quantized;
    "mixed": each linear layer in turn gets the next of MIXED."""
    model = _llama()
    names = [n for n, m in model.named_modules() if _not_head(m, n)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i, name in enumerate(names):
            _quantize_layer(model, name, MIXED[i % len(MIXED)] if scheme == "mixed" else scheme)
    return model


def _quantize_layer(model, name, scheme):
    module = model.get_submodule(name)
    only = lambda m, fqn: m is module  # noqa: E731
    if scheme == "int8":
        quantize_(module, Int8WeightOnlyConfig(), filter_fn=only)
    elif scheme == "int4":
        quantize_(module, IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32)), filter_fn=only)
    elif scheme == "int4-packed":
        from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig
        quantize_(module, PrototypeInt4WeightOnlyConfig(group_size=32, set_inductor_config=False), filter_fn=only)
    elif scheme == "nf4":
        module.weight = torch.nn.Parameter(to_nf4(module.weight.detach(), 64, 8), requires_grad=False)
    elif scheme == "dynamic":
        quantize_(module, Int8DynamicActivationInt8WeightConfig(), filter_fn=only)
    else:
        _bitsandbytes(model, name, scheme)


def _bitsandbytes(model, name, scheme):
    module = model.get_submodule(name)
    parent_name, _, leaf = name.rpartition(".")
    if scheme == "bnb-int8":
        layer = bnb.nn.Linear8bitLt(module.in_features, module.out_features, bias=module.bias is not None,
                                    has_fp16_weights=False)
        layer.weight = bnb.nn.Int8Params(module.weight.data.clone(), requires_grad=False, has_fp16_weights=False)
    else:
        layer = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=module.bias is not None,
                                  quant_type="nf4")
        layer.weight = bnb.nn.Params4bit(module.weight.data.clone(), requires_grad=False, quant_type="nf4")
    setattr(model.get_submodule(parent_name), leaf, layer.to("cpu"))  # bitsandbytes quantizes on .to()


def _library_dense(module) -> torch.Tensor:
    """The weight a quantized layer computes with, by its library's own API."""
    weight = module.weight
    kind = type(weight).__name__
    if kind == "NF4Tensor":
        return weight.get_original_weight()
    if kind in ("Int8Tensor", "IntxUnpackedToInt8Tensor"):
        return weight.dequantize()
    if kind == "Int4OpaqueTensor":  # no dequantize(): the packed kernel applied to the identity
        return F.linear(torch.eye(weight.shape[1]), weight).t().contiguous()
    if kind == "Params4bit":
        import bitsandbytes.functional as bnbf
        return bnbf.dequantize_4bit(weight.data, weight.quant_state).float()
    if kind == "Int8Params":
        return weight.data.float() * weight.SCB.float()[:, None] / 127.0
    return weight.detach()


def _twin(quantized):
    """The dense twin: a plain Llama holding the dequantized weights (lm_head, norms, embeddings equal)."""
    twin = _llama(seed=1)
    state = {}
    for name, module in quantized.named_modules():
        if name in LINEARS:
            state[f"{name}.weight"] = _library_dense(module).float()
    for key, value in quantized.state_dict().items():
        if key not in state and key in twin.state_dict():
            state.setdefault(key, value)
    twin.load_state_dict(state)
    return twin


_CASES: dict[str, tuple] = {}


def _case(scheme):
    if scheme not in _CASES:
        quantized = _quantized(scheme)
        _CASES[scheme] = (quantized, _twin(quantized))
    return _CASES[scheme]


def _ids(batch=2, seq=6, seed=0):
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _rewrite(model, spec=SPEC):
    return lfx.rewrite(model, spec, example_inputs=(_ids(),), example_kwargs={"use_cache": False})


_GRAPHS: dict[str, tuple] = {}


def _capture(model):
    return capture(model, (_ids(),), {"use_cache": False})


def _graphs(scheme):
    """(quantized model, twin, rewritten quantized graph, rewritten twin graph with the same adapters,
    the all-linear plan of the quantized model, the twin's). One capture of each model."""
    if scheme not in _GRAPHS:
        quantized, twin = _case(scheme)
        gm, dense = _capture(quantized), _capture(twin)
        plans = lfx.plan(gm, lfx.Spec("all-linear")), lfx.plan(dense, lfx.Spec("all-linear"))
        lfx.rewrite(gm, SPEC), lfx.rewrite(dense, SPEC)
        dense.lowrank_fx.load_state_dict(gm.lowrank_fx.state_dict())
        _GRAPHS[scheme] = (quantized, twin, gm, dense, *plans)
    return _GRAPHS[scheme]


def _grads(gm, ids, probe):
    gm.zero_grad(set_to_none=True)
    logits = gm(ids).logits
    (logits * probe).sum().backward()
    return logits.detach(), {name.removeprefix("_orig_mod."): p.grad.clone()
                             for name, p in gm.named_parameters() if p.requires_grad}


def _rel(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


# --- step 1: targets --------------------------------------------------------------------------

@pytest.mark.parametrize("scheme", TORCHAO_SCHEMES + BNB_SCHEMES)
def test_all_linear_finds_every_quantized_layer_by_its_module_name(scheme):
    *_, plan, dense_plan = _graphs(scheme)
    assert [r.target for r in plan.rows] == [r.target for r in dense_plan.rows] == LINEARS
    assert [r.shape for r in plan.rows] == [r.shape for r in dense_plan.rows]
    assert [r.trainable for r in plan.rows] == [r.trainable for r in dense_plan.rows]
    assert set(plan.left_out) == {"model.embed_tokens", "lm_head"}
    expected = {"int8": "int8", "nf4": "nf4", "int4": "int4", "int4-packed": "int4 packed",
                "bnb-nf4": "bnb-4bit", "bnb-int8": "bnb-int8"}[scheme]
    assert {r.scheme for r in plan.rows} == {expected}
    text = str(plan)
    assert expected in text and "bytes as stored" in text
    # torchao's packed int4 CPU kernel is slow, and the plan says so; no other scheme is named
    assert list(plan.slow_kernels) == (["int4 packed on cpu"] if scheme == "int4-packed" else [])
    assert ("slow kernel: int4 packed on cpu: torchao has no fast CPU kernel" in text) == (scheme == "int4-packed")
    for row in plan.rows:  # a quantized layer stores fewer bytes than its fp32 weight
        assert 0 < row.base_bytes < 4 * row.shape[0] * row.shape[1]


def test_base_bytes_are_the_tensors_the_layer_reads():
    quantized, *_, plan, _ = _graphs("int8")
    row = plan.rows[0]
    weight = quantized.model.layers[0].self_attn.q_proj.weight
    # int8 rows (out x in bytes), one fp32 scale and one int8 zero point per row
    assert row.base_bytes == weight.qdata.numel() + 4 * weight.scale.numel() + weight.zero_point.numel()


def test_quantized_targets_have_a_quantized_kind_with_the_matrix_view():
    gm = _graphs("nf4")[2]
    targets = find_targets(gm)
    t = targets["model.layers.0.mlp.down_proj"]
    assert t.quantized and t.kind.scheme == "nf4" and t.shape == (32, 64)
    delta = torch.randn(32, 64)
    x = torch.randn(3, 64)
    assert torch.allclose(t.kind.apply(x, delta), x @ delta.t())


def test_dynamic_activation_schemes_are_refused_with_the_measured_gradient_error():
    model = _quantized("dynamic")
    with pytest.raises(QuantizedBaseError) as info:
        _rewrite(model, lfx.Spec("all-linear"))
    text = str(info.value)
    assert "model.layers.0.self_attn.q_proj" in text and "int8 dynamic activation" in text
    assert "quantizes the activation" in text and "weight-only" in text
    assert "the gradient reaching the layer's input is off by" in text
    measured = float(text.split("is off by ")[1].split("%")[0])
    assert measured > 10.0  # the real error: tens of percent, not rounding


# --- steps 2 and 3: training against the dense twin -------------------------------------------

@pytest.mark.parametrize("scheme", TORCHAO_SCHEMES + BNB_SCHEMES)
def test_gradients_and_outputs_equal_the_dense_twin(scheme):
    _, _, gm, dense, *_ = _graphs(scheme)
    gm.train(), dense.train()
    ids = _ids(3, 7, seed=3)
    probe = torch.randn(3, 7, VOCAB, generator=torch.Generator().manual_seed(4))
    logits, grads = _grads(gm, ids, probe)
    ref_logits, ref_grads = _grads(dense, ids, probe)
    assert _rel(logits, ref_logits) < 1e-5
    assert set(grads) == set(ref_grads) and grads
    groups = dict(gm.lowrank_fx.default.items())
    worst: dict[str, float] = {}
    for name, grad in grads.items():
        group = name.split(".")[2]
        method = METHOD_OF_GROUP[type(groups[group]).__name__]
        assert ref_grads[name].norm() > 0, name
        worst[method] = max(worst.get(method, 0.0), _rel(grad, ref_grads[name]))
    assert set(worst) == {"lora", "lorta", "randlora"}
    for method, error in worst.items():
        PARITY[(scheme, method)] = error
        assert error < 1e-5, (scheme, method, error)


@pytest.mark.parametrize("scheme", TORCHAO_SCHEMES + BNB_SCHEMES)
def test_adapters_are_fp32_and_base_weights_frozen_and_shared(scheme):
    quantized, _, gm, *_ = _graphs(scheme)
    assert all(p.dtype == torch.float32 for p in gm.lowrank_fx.parameters())
    trainable = {n for n, p in gm.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("lowrank_fx.") for n in trainable)
    ours = {id(t) for t in list(gm.parameters()) + list(gm.buffers())}
    layer = quantized.model.layers[0].self_attn.q_proj
    if scheme.startswith("bnb"):  # the swapped layer holds bitsandbytes' own packed bytes
        assert any(t.data_ptr() == layer.weight.data.data_ptr() for t in gm.parameters())
    else:
        assert id(layer.weight) in ours


def test_packed_int4_backward_unpacks_the_codes_instead_of_probing_the_kernel(monkeypatch):
    """The packed int4 kernel has no derivative; the backward's W comes from the format's own
    pack order (graph/quant_int4.py), equal to what the kernel computes with on the identity,
    and no step runs the layer on the identity."""
    import lowrank_fx.passes.quantized_base as quantized_base
    from lowrank_fx.graph.quant_int4 import int4_opaque_dense

    quantized, _, gm, dense, *_ = _graphs("int4-packed")
    assert sum(is_quantized_call(n) for n in gm.graph.nodes) == len(LINEARS)
    weight = quantized.model.layers[0].mlp.down_proj.weight
    x = torch.randn(3, 64, requires_grad=True)
    with pytest.raises(RuntimeError, match="not implemented"):
        F.linear(x, weight).sum().backward()
    with torch.no_grad():
        probed = F.linear(torch.eye(weight.shape[1]), weight).t()
    unpacked = int4_opaque_dense(weight.qdata, weight.scale_and_zero, weight.shape, int(weight.block_size[1]))
    assert _rel(unpacked, probed) < 1e-6

    def refuse(*args):
        raise AssertionError("identity probe in a step")

    monkeypatch.setattr(quantized_base, "dequantize_region", refuse)
    ids, probe = _ids(2, 6, seed=21), torch.randn(2, 6, VOCAB, generator=torch.Generator().manual_seed(22))
    (logits, grads), (twin_logits, twin_grads) = _grads(gm, ids, probe), _grads(dense, ids, probe)
    assert _rel(logits, twin_logits) < 1e-5
    assert max(_rel(grads[name], twin_grads[name]) for name in twin_grads) < 1e-4


def test_eager_calls_skip_the_custom_op_and_compiled_calls_use_it(monkeypatch):
    """Eager steps run the layer through an autograd.Function (no op dispatch); under
    torch.compile the graph holds the custom op, opaque to the compiler."""
    import lowrank_fx.passes.quantized_base as quantized_base

    _, _, gm, *_ = _graphs("int8")
    calls = []
    real = quantized_base._forward
    monkeypatch.setattr(quantized_base, "_forward", lambda *args: calls.append(torch.compiler.is_compiling()) or real(*args))
    ops = []

    def backend(graph, inputs):
        ops.extend(n.target for n in graph.graph.nodes if n.op == "call_function")
        return graph.forward

    ids = _ids(2, 6, seed=5)
    gm(ids).logits.sum().backward()
    assert calls == [False] * len(LINEARS)
    torch._dynamo.reset()
    torch.compile(gm, backend=backend, fullgraph=True)(ids)
    torch._dynamo.reset()
    assert sum(op is torch.ops.lowrank_fx.quantized_linear.default for op in ops) == len(LINEARS)


def _saved_bytes(gm, ids):
    """Bytes of the unique storages autograd keeps from forward to backward, leaving out the
    graph's own tensors (parameters, buffers, and a quantized tensor's inner tensors)."""
    from lowrank_fx.graph.quant_formats import inner_tensors
    own = {t.untyped_storage().data_ptr() for p in [*gm.parameters(), *gm.buffers()] for t in inner_tensors(p)}
    saved = {}

    def pack(tensor):
        for t in inner_tensors(tensor):
            storage = t.untyped_storage()
            if storage.data_ptr() not in own:
                saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    gm.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = gm(ids).logits
    logits.sum().backward()
    gm.zero_grad(set_to_none=True)
    return sum(saved.values())


@pytest.mark.parametrize("scheme", TORCHAO_SCHEMES + BNB_SCHEMES)
def test_no_dense_weight_is_kept_for_backward(scheme):
    """Every quantized layer is one custom op that keeps x and its quantized tensors only: what
    autograd saves is what the dense twin saves (whose weights are parameters), not that plus a
    dequantized fp32 copy of every weight (which the region's own ops would keep)."""
    quantized, _, gm, dense, *_ = _graphs(scheme)
    regions = [n for n in gm.graph.nodes if is_quantized_call(n)]
    assert len(regions) == len(LINEARS)
    ids = _ids(2, 6, seed=13)
    ours, twins = _saved_bytes(gm, ids), _saved_bytes(dense, ids)
    dense_weights = sum(4 * quantized.get_submodule(n).out_features * quantized.get_submodule(n).in_features
                        for n in LINEARS)
    assert ours <= twins + dense_weights // 10, (ours, twins, dense_weights)


def test_bitsandbytes_layers_through_the_swap_equal_their_own_forward():
    for scheme in BNB_SCHEMES:
        quantized, _, gm, *_ = _graphs(scheme)
        ids = _ids(2, 5, seed=7)
        with torch.no_grad():
            base = quantized(ids, use_cache=False).logits
            lfx.set_active_adapters(gm, [])  # the graph's base alone
            try:
                ours = gm(ids).logits
            finally:
                lfx.set_active_adapters(gm, ["default"])
        assert _rel(ours, base) < 1e-5, scheme
        # the model keeps its bitsandbytes layers: the swap lasts only while exporting
        assert type(quantized.model.layers[0].self_attn.q_proj).__module__.startswith("bitsandbytes")


def test_compiled_equals_eager_without_recompiles():
    """One graph over every supported base (layer i quantized with MIXED[i % 5]) and all three
    methods: fullgraph, one frame across three shapes, eager's outputs and gradients."""
    from torch._dynamo.testing import CompileCounterWithBackend
    from torch._dynamo.utils import counters
    _, _, gm, dense, *_ = _graphs("mixed")
    schemes = {t.kind.scheme for t in find_targets(gm).values() if t.quantized}
    assert schemes == {"int8", "nf4", "int4", "int4 packed", "bnb-4bit"}
    gm.train()
    torch._dynamo.reset()
    counters.clear()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(gm, backend=counter, fullgraph=True, dynamic=True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for batch, seq in [(2, 5), (3, 9), (4, 6)]:
            ids = _ids(batch, seq, seed=batch)
            probe = torch.randn(batch, seq, VOCAB, generator=torch.Generator().manual_seed(seq))
            logits, grads = _grads(compiled, ids, probe)
            ref_logits, ref_grads = _grads(dense.train(), ids, probe)  # the dense twin, eager
            assert _rel(logits, ref_logits) < 1e-5
            assert all(_rel(grads[n], ref_grads[n]) < 1e-5 for n in grads)
    assert counter.frame_count == 1
    assert not counters["graph_break"]
    torch._dynamo.reset()


def test_a_training_step_moves_only_adapters():
    quantized, _, gm, *_ = _graphs("nf4")
    gm.train()
    saved = copy.deepcopy(gm.lowrank_fx.state_dict())
    before = {n: t.detach().clone() for n, t in gm.lowrank_fx.named_parameters()}
    base = quantized.model.layers[0].self_attn.q_proj.weight
    base_bytes = base.quantized_data.clone()
    optimizer = torch.optim.AdamW([p for p in gm.parameters() if p.requires_grad], lr=1e-2)
    ids = _ids(2, 6, seed=11)
    loss = F.cross_entropy(gm(ids).logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    moved = all(not torch.equal(before[n], t) for n, t in gm.lowrank_fx.named_parameters())
    gm.lowrank_fx.load_state_dict(saved)
    assert moved
    assert torch.equal(base.quantized_data, base_bytes)


# --- step 4: folding ---------------------------------------------------------------------------

def _examples_output(module, ids):
    """Logits without dropout (the tiny Llama has none; graphs are put in eval mode). A model is
    left in its mode: bitsandbytes' 4-bit layers repack their weights in eval mode on CPU."""
    if isinstance(module, torch.fx.GraphModule):
        module.eval()
    with torch.no_grad():
        out = module(ids, use_cache=False) if not isinstance(module, torch.fx.GraphModule) else module(ids)
    return out.logits


@pytest.mark.parametrize("scheme", TORCHAO_SCHEMES + BNB_SCHEMES)
def test_merge_folds_to_dense_weights_exactly(scheme):
    """Dequantized W + ΔW in fp32: the folded graph is the dense twin's folded graph, and the
    merged state dict is the twin's, loadable into a plain Llama."""
    _, _, gm, dense, *_ = _graphs(scheme)
    ids = _ids(2, 6, seed=5)
    merged, twin_merged = lfx.merge(gm), lfx.merge(dense)
    assert not any("lowrank_fx" in str(n.target) or "access_subclass" in str(n.target) for n in merged.graph.nodes)
    assert not any(isinstance(t, torch.Tensor) and type(t).__name__ not in ("Parameter", "Tensor")
                   for t in [*merged.parameters(), *merged.buffers()])
    weight = merged.get_parameter("model.layers.0.self_attn.q_proj.weight")
    assert type(weight) is torch.nn.Parameter and weight.dtype == torch.float32 and weight.shape == (32, 32)
    assert _rel(_examples_output(merged, ids), _examples_output(twin_merged, ids)) < 1e-6
    assert _rel(_examples_output(merged, ids), _examples_output(gm, ids)) < 1e-5
    state, twin_state = lfx.merged_state_dict(gm), lfx.merged_state_dict(dense)
    assert set(state) == set(twin_state) == set(_llama().state_dict())
    assert all(torch.allclose(state[k], twin_state[k], rtol=1e-6, atol=1e-7) for k in state)
    plain = _llama(seed=2)
    plain.load_state_dict(state)
    assert _rel(_examples_output(plain, ids), _examples_output(gm, ids)) < 1e-5


def test_merge_shares_frozen_weights_instead_of_copying_them():
    """NF4 tensors cannot be deep-copied; lowrank_fx's copies share every frozen tensor."""
    quantized, _, gm, *_ = _graphs("nf4")
    with pytest.raises(Exception):
        copy.deepcopy(quantized.model.layers[0].self_attn.q_proj.weight)
    merged = lfx.merge(gm, requantize=True, tolerance=1.0)
    assert merged.get_parameter("lm_head.weight") is gm.get_parameter("lm_head.weight")
    assert merged.get_parameter("model.embed_tokens.weight") is gm.get_parameter("model.embed_tokens.weight")
    dense = lfx.merge(gm)
    assert dense.get_parameter("model.norm.weight") is gm.get_parameter("model.norm.weight")


@pytest.mark.parametrize("scheme", TORCHAO_SCHEMES + BNB_SCHEMES)
def test_merge_requantize_keeps_the_format_and_reports_the_measured_error(scheme):
    from lowrank_fx.passes.quantized_fold import RequantizeWarning
    _, _, gm, *_ = _graphs(scheme)
    with pytest.warns(RequantizeWarning, match="output error"):
        merged = lfx.merge(gm, requantize=True, tolerance=0.0)
    report = merged.requantize_report
    base_weight = gm.get_parameter("model.layers.0.mlp.up_proj.weight")
    new_weight = merged.get_parameter("model.layers.0.mlp.up_proj.weight")
    assert type(new_weight.data if scheme.startswith("bnb") else new_weight) is \
        type(base_weight.data if scheme.startswith("bnb") else base_weight)
    assert new_weight.dtype == base_weight.dtype and new_weight.shape == base_weight.shape
    assert new_weight is not base_weight
    assert report.targets == len(LINEARS)
    # the report is the error one measures oneself, on the capture's examples
    ids = _ids()
    exact = _examples_output(gm, ids)
    measured = _rel(_examples_output(merged, ids), exact)
    assert report.output_error == pytest.approx(measured, rel=1e-4)
    assert 0 < report.output_error < 1.0 and 0 < report.update_lost < 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("error", RequantizeWarning)
        lfx.merge(gm, requantize=True, tolerance=1.0)  # under the tolerance: no warning


@pytest.mark.parametrize("scheme", ["int8", "nf4", "int4-packed", "bnb-nf4", "bnb-int8"])
def test_load_merged_into_the_quantized_model_requantizes_with_the_same_report(scheme):
    _, _, gm, *_ = _graphs(scheme)
    model = _quantized(scheme)  # the original quantized model, built again (same seed)
    kind = type(model.model.layers[1].mlp.down_proj.weight)
    old = model.model.layers[1].mlp.down_proj.weight
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged = lfx.merge(gm, requantize=True)
        lfx.load_merged(model, gm)
    assert type(model.model.layers[1].mlp.down_proj.weight) is kind
    assert model.model.layers[1].mlp.down_proj.weight is not old
    ids = _ids()
    ours = _examples_output(model, ids)
    assert _rel(ours, _examples_output(merged, ids)) < 1e-5  # the same requantized weights as merge's
    report = model.lowrank_fx_requantize_report
    assert report.output_error == pytest.approx(merged.requantize_report.output_error, rel=1e-3)
    assert report.output_error == pytest.approx(_rel(ours, _examples_output(gm, ids)), rel=1e-4)


def test_quantize_base_quantizes_linears_but_not_the_head_or_embeddings():
    from torchao.prototype.quantization.int4 import Int4OpaqueTensor
    from torchao.quantization import Int8Tensor, NF4Tensor
    for scheme, kind in [("int8", Int8Tensor), ("nf4", NF4Tensor), ("int4", Int4OpaqueTensor)]:
        model = _llama()
        returned = lfx.quantize_base(model, scheme, exclude=["*.layers.1.mlp.down_proj"])
        assert returned is model  # in place
        for name in LINEARS:
            weight = model.get_submodule(name).weight
            if name == "model.layers.1.mlp.down_proj":
                assert type(weight) is torch.nn.Parameter
            else:
                assert isinstance(weight, kind) and not weight.requires_grad, (scheme, name)
        assert type(model.lm_head.weight) is torch.nn.Parameter
        assert type(model.model.embed_tokens.weight) is torch.nn.Parameter
        assert model.lowrank_fx_quantized["scheme"] == scheme and len(model.lowrank_fx_quantized["layers"]) == 13
    with pytest.raises(lfx.SpecError, match="one of"):
        lfx.quantize_base(_llama(), "int3")


def test_quantize_base_inplace_false_quantizes_a_copy():
    from torchao.quantization import Int8Tensor
    model = _llama()
    before = {name: value.clone() for name, value in model.state_dict().items()}
    copy_ = lfx.quantize_base(model, "int8", inplace=False)
    assert copy_ is not model and not hasattr(model, "lowrank_fx_quantized")
    assert all(type(model.get_submodule(name).weight) is torch.nn.Parameter for name in LINEARS)
    assert all(torch.equal(value, before[name]) for name, value in model.state_dict().items())
    assert all(isinstance(copy_.get_submodule(name).weight, Int8Tensor) for name in LINEARS)
    ids = _ids()
    with torch.no_grad():  # the copy is the quantized model: close to the float one, not equal
        dense, quantized = model(ids).logits, copy_(ids).logits
    assert 0 < _rel(quantized, dense) < 5e-2
    with pytest.raises(lfx.SpecError, match="inplace must be True or False"):
        lfx.quantize_base(model, "int8", inplace=None)


@pytest.mark.parametrize("scheme", ["int4-packed", "bnb-nf4"])
def test_trainer_steps_equal_the_dense_twins(scheme):
    """lfx.Trainer (eager, LoRA+ groups, AdamW) for three steps over the quantized base and over
    the dense twin from the same adapters: the same adapters after, the base untouched."""
    _, _, gm, dense, *_ = _graphs(scheme)
    saved = copy.deepcopy(gm.lowrank_fx.state_dict())
    base = {n: t for n, t in gm.named_parameters() if not n.startswith("lowrank_fx.")}
    before = {n: t.detach().clone() for n, t in base.items() if type(t) is torch.nn.Parameter}

    def loss_fn(model, ids):
        logits = model(ids).logits
        return F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))

    batches = [_ids(2, 6, seed=20 + i) for i in range(3)]
    try:
        for graph in (gm, dense):
            graph.train()
            lfx.Trainer(graph, loss_fn, lr=1e-2, compile=False, progress=False, warmup_steps=0).fit(batches, steps=3)
        trained = dict(gm.lowrank_fx.named_parameters())
        assert any(not torch.equal(trained[n], saved[n]) for n in saved if n in trained)
        for name, value in dense.lowrank_fx.named_parameters():
            assert _rel(trained[name].detach(), value.detach()) < 1e-4, name
        assert all(torch.equal(base[n], before[n]) for n in before)
    finally:
        gm.lowrank_fx.load_state_dict(saved)
        dense.lowrank_fx.load_state_dict(saved)


def test_inductor_trainer_over_every_base_takes_the_dense_twins_steps():
    """lfx.Trainer with its default compile (inductor, fullgraph, dynamic) on the graph whose layers
    use every supported base in turn: two steps at two shapes, no fallback to eager, and the
    adapters end where the eager Trainer over the dense twin puts them."""
    _, _, gm, dense, *_ = _graphs("mixed")
    saved = copy.deepcopy(gm.lowrank_fx.state_dict())

    def loss_fn(model, ids):
        logits = model(ids).logits
        return F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))

    batches = [_ids(2, 6, seed=30), _ids(3, 5, seed=31)]
    torch._dynamo.reset()
    try:
        gm.train(), dense.train()
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)  # a compile failure would warn and fall back
            compiled = lfx.Trainer(gm, loss_fn, lr=1e-2, progress=False, warmup_steps=0)
            compiled.fit(batches, steps=2)
        assert compiled.compiled
        lfx.Trainer(dense, loss_fn, lr=1e-2, compile=False, progress=False, warmup_steps=0).fit(batches, steps=2)
        trained = dict(gm.lowrank_fx.named_parameters())
        assert any(not torch.equal(trained[n], saved[n]) for n in saved if n in trained)
        for name, value in dense.lowrank_fx.named_parameters():
            assert _rel(trained[name].detach(), value.detach()) < 1e-4, name
    finally:
        torch._dynamo.reset()
        gm.lowrank_fx.load_state_dict(saved)
        dense.lowrank_fx.load_state_dict(saved)


@pytest.mark.parametrize("scheme", ["int8", "bnb-nf4"])
def test_a_peft_lora_trained_on_the_quantized_base_loads_and_computes_what_peft_computes(scheme, tmp_path):
    """PEFT's LoRA on a torchao int8 / bitsandbytes nf4 base (its own quantized layers) -> save_pretrained
    -> lfx.load_peft into a graph of the same quantized model: PEFT's outputs; and back (save_peft)."""
    peft_base = _quantized(scheme)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = peft.get_peft_model(peft_base, config)
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.2)  # a trained adapter: B is no longer zero
    peft_model.save_pretrained(tmp_path)
    ids = _ids(2, 6, seed=9)
    with torch.no_grad():
        expected = peft_model(input_ids=ids, use_cache=False).logits
    ours = _capture(_quantized(scheme))
    lfx.load_peft(ours, tmp_path)
    assert ours.get_parameter("lowrank_fx.default.lora.units.model-layers-0-self_attn-q_proj.lora_A").dtype == torch.float32
    assert _rel(_examples_output(ours, ids), expected) < 1e-5
    lfx.save_peft(ours, tmp_path / "back")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = peft.PeftModel.from_pretrained(_quantized(scheme), tmp_path / "back")
    again.train()  # no dropout here; in eval mode bitsandbytes repacks 4-bit weights for its CPU kernel,
    # which fails on layers narrower than its 64-value blocks
    with torch.no_grad():
        assert _rel(again(input_ids=ids, use_cache=False).logits, expected) < 1e-5


def test_quantized_models_need_export_capture():
    quantized, _ = _case("nf4")
    with pytest.raises(lfx.CaptureError, match="example_inputs"):
        lfx.rewrite(quantized, lfx.Spec("all-linear"))
