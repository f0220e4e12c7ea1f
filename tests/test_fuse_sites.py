"""The training form of LoRA sites (passes/fuse_sites.py): the same function and gradients as the
rewritten graph, on the graph's own adapters, with q/k/v (and gate/up) reading x once.

The oracle is the rewritten graph itself run eagerly in float64 (a twin with the same weights):
outputs and every adapter gradient. Against the float32 graph the fused form differs by up to 1.6e-5
in the second adapter's B gradients on some CPUs, while both are within 1e-5 of the float64 truth
(the fused one closer): the float32 graph is not an exact oracle for a re-associated sum. The fused
graph shares the graph's parameters, so each run's gradients are copied before the other runs.
"""

from __future__ import annotations

import pytest
import torch
from models import build
from oracles import assert_grads_match, rel

import lowrank_fx as lfx
from lowrank_fx.passes.fuse_sites import fuse_sites, lora_site, stacked_down

LORA = lfx.LoRA(rank=4, init="nonzero")


def _run(module, gm, case, args, kwargs):
    """Forward and backward of `module` (gm, or a fused form over gm's parameters): the output, and
    the gradients of gm's trainable parameters by name, copied before anything else runs."""
    gm.zero_grad(set_to_none=True)
    out = case.output(module(*args, **kwargs))
    (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
    grads = {n: p.grad.clone() for n, p in gm.named_parameters() if p.requires_grad and p.grad is not None}
    return out.detach(), grads


def _rewritten(case):
    spec = lfx.Spec(targets={"*.self_attn.[qkv]_proj": LORA, "*.mlp.gate_proj": LORA, "*.mlp.up_proj": LORA,
                             "*.layers.0.self_attn.o_proj": LORA, "*.mlp.down_proj": lfx.LoRTA(rank=4, init="nonzero"),
                             "*.layers.1.self_attn.o_proj": lfx.LoRA(rank=4, dropout=0.1, init="nonzero")})
    gm = lfx.rewrite(case.model, spec, example_inputs=case.args, example_kwargs=case.kwargs).train()
    lfx.rewrite(gm, lfx.Spec(["*.q_proj", "*.k_proj"], method=lfx.LoRA(rank=2, init="nonzero")), adapter="second")
    return gm


@pytest.fixture(scope="module")
def llama():
    case = build("llama")
    return case, _rewritten(case)


@pytest.fixture(scope="module")
def llama64(llama):
    """The same rewritten graph in float64, with the float32 graph's weights and adapters."""
    _case, gm = llama
    case64 = build("llama")
    case64.model.double()
    gm64 = _rewritten(case64)
    gm64.load_state_dict({k: v.double() if v.is_floating_point() else v for k, v in gm.state_dict().items()})
    return case64, gm64.eval()


def _oracle(llama64, index):
    """Output and gradients of the float64 graph on the case's first (0) or other (1) inputs."""
    case64, gm64 = llama64
    args, kwargs = ((case64.args, case64.kwargs), (case64.other_args, case64.other_kwargs))[index]
    return _run(gm64, gm64, case64, args, kwargs)


def test_sites_sharing_an_input_compute_their_first_factor_together(llama):
    _case, gm = llama
    before = gm.code
    fused = fuse_sites(gm)
    assert gm.code == before  # the rewritten graph is untouched
    stacks = sorted(len(n.args) - 1 for n in fused.graph.nodes if n.target is stacked_down)
    # per layer and adapter: default q/k/v (3), gate/up (2), o alone (layer 0; layer 1's has dropout);
    # second q/k (2); down is LoRTA and stays a unit
    assert stacks == sorted([3, 2, 1, 2, 3, 2, 2])
    assert sum(n.target is lora_site for n in fused.graph.nodes) == 2 * (3 + 2) + 1 + 2 * 2
    units = {type(gm.get_submodule(n.target)).__name__ for n in fused.graph.nodes if n.op == "call_module"}
    assert "LoRTAUnit" in units or any("lorta" in n.lower() for n in units)
    assert {id(p) for p in fused.parameters()} == {id(p) for p in gm.parameters()}


def test_outputs_and_gradients_equal_the_rewritten_graph(llama, llama64):
    case, gm = llama
    fused = fuse_sites(gm).eval()  # eval: dropout off in both, so the two runs are comparable
    gm.eval()
    try:
        for index, (args, kwargs) in enumerate(((case.args, case.kwargs), (case.other_args, case.other_kwargs))):
            expected, expected_grads = _oracle(llama64, index)
            got, grads = _run(fused, gm, case, args, kwargs)
            assert rel(got, expected) < 1e-6
            assert_grads_match(grads, expected_grads)
    finally:
        gm.train()


def test_gates_switch_the_fused_graph_too(llama):
    case, gm = llama
    fused = fuse_sites(gm).eval()
    gm.eval()
    try:
        with torch.no_grad():
            lfx.set_active_adapters(gm, [])
            base = case.output(gm(*case.args, **case.kwargs))
            assert torch.equal(case.output(fused(*case.args, **case.kwargs)), base)
            lfx.set_active_adapters(gm, ["second"])
            assert rel(case.output(fused(*case.args, **case.kwargs)), case.output(gm(*case.args, **case.kwargs))) < 1e-6
    finally:
        lfx.set_active_adapters(gm, ["default", "second"])
        gm.train()


def test_compiles_fullgraph_without_recompiles(llama, llama64):
    case, gm = llama
    fused = fuse_sites(gm).eval()
    gm.eval()
    torch._dynamo.reset()
    compiled = torch.compile(fused, backend="aot_eager", fullgraph=True, dynamic=True)
    try:
        with torch._dynamo.config.patch(error_on_recompile=True):
            for index, (args, kwargs) in enumerate(((case.args, case.kwargs), (case.other_args, case.other_kwargs))):
                expected, expected_grads = _oracle(llama64, index)
                got, grads = _run(compiled, gm, case, args, kwargs)
                assert rel(got, expected) < 1e-6
                assert_grads_match(grads, expected_grads)
    finally:
        torch._dynamo.reset()
        gm.train()


def test_multihead_attention_rows_keep_their_units():
    mha = torch.nn.MultiheadAttention(16, 4, batch_first=True)
    x = torch.randn(2, 5, 16)
    gm = lfx.rewrite(mha, lfx.Spec("all-linear", method=LORA), example_inputs=(x, x, x))
    fused = fuse_sites(gm)
    with torch.no_grad():
        assert rel(fused(x, x, x)[0], gm(x, x, x)[0]) < 1e-6


@pytest.mark.parametrize("checkpointed", [False, True])
def test_layer_blocks_are_fused_inside_and_the_structured_graph_is_untouched(checkpointed):
    case = build("llama")
    spec = lfx.Spec("all-linear", method=LORA)
    gm = lfx.rewrite(case.model, spec, example_inputs=case.args, example_kwargs=case.kwargs, layers="auto").eval()
    if checkpointed:
        lfx.checkpoint_layers(gm)
    block_code = gm.get_submodule("model.layers.0").code
    fused = fuse_sites(gm).eval()
    assert gm.get_submodule("model.layers.0").code == block_code
    block = fused.get_submodule("model.layers.0")
    assert sorted(len(n.args) - 1 for n in block.graph.nodes if n.target is stacked_down) == [1, 1, 2, 3]
    expected, expected_grads = _run(gm, gm, case, case.other_args, case.other_kwargs)
    got, grads = _run(fused, gm, case, case.other_args, case.other_kwargs)
    assert rel(got, expected) < 1e-6
    assert_grads_match(grads, expected_grads)
