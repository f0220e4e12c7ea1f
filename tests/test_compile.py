"""The compile contract: every method compiles with fullgraph=True, without graph breaks, and
never recompiles across batch sizes, sequence lengths or a switch of the active adapter.

Most checks use the aot_eager backend (dynamo + AOTAutograd, what decides breaks and
recompiles); one test runs the real inductor backend end to end. Compiled outputs and every
trainable gradient equal eager's within 1e-5, norm-relative per tensor (oracles.py).
"""

import models
import pytest
import torch
from oracles import assert_grads_match, rel
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters

import lowrank_fx as lfx

METHODS = {
    "lora": lfx.LoRA(rank=4, init="nonzero"),
    "lorta": lfx.LoRTA(rank=4, init="nonzero"),
    "randlora": lfx.RandLoRA(rank=4, alpha=80.0, init="nonzero"),
}
SHAPES = [(2, 8), (3, 11), (5, 17)]  # three batch sizes, three sequence lengths


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    with torch._dynamo.config.patch(error_on_recompile=True):
        yield
    torch._dynamo.reset()


def _llama(spec, adapter="default", gm=None):
    case = models.build("llama")
    if gm is not None:
        return lfx.rewrite(gm, spec, adapter=adapter)
    return lfx.rewrite(case.model, spec, example_inputs=case.args, example_kwargs=case.kwargs, adapter=adapter)


def _step(module, gm, ids):
    """Forward and backward of `module` (gm or its compiled form); the logits and gm's trainable
    parameters' gradients by name."""
    gm.zero_grad(set_to_none=True)
    logits = module(ids, use_cache=False).logits
    logits.square().mean().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in gm.named_parameters() if p.requires_grad}


def test_fullgraph_without_breaks_or_recompiles():
    """All three methods in one graph (one compile keeps the test short), trained at three
    batch sizes and three sequence lengths: one frame, no graph break, eager's numbers."""
    gm = _llama(lfx.Spec(targets={"*.q_proj": METHODS["lora"], "*.k_proj": METHODS["lora"],
                                  "*.mlp.*": METHODS["lorta"], "*.v_proj": METHODS["randlora"],
                                  "*.o_proj": METHODS["randlora"]})).train()
    assert {type(m).__name__ for m in gm.lowrank_fx.default.values()} == {"AdapterGroup", "LoRTAGroup", "RandLoRAGroup"}
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(gm, backend=counter, fullgraph=True, dynamic=True)
    for batch, seq in SHAPES:
        ids = torch.randint(0, models.VOCAB, (batch, seq))
        logits, grads = _step(compiled, gm, ids)
        ref_logits, ref_grads = _step(gm, gm, ids)
        assert rel(logits, ref_logits) < 1e-5
        assert_grads_match(grads, ref_grads)
    assert counter.frame_count == 1
    assert not counters["graph_break"]


def test_grad_regions_become_plain_calls():
    """torch.export's no_grad / autocast higher-order ops are replaced, and still mean the same."""

    class Regions(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 4)

        def forward(self, x):
            with torch.autocast("cpu", enabled=False):
                y = x.float() * 2
            with torch.no_grad():
                z = y * 3  # no gradient flows back through z
            return self.proj(y) + z

    model = Regions()
    x = torch.randn(3, 4, requires_grad=True)
    gm = lfx.rewrite(model, lfx.Spec(targets=["proj"], method=lfx.LoRA(rank=2, init="nonzero")),
                     example_inputs=(x.detach(),))
    targets = {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}
    assert not any("wrap_with" in t for t in targets)
    (gm(x).sum()).backward()
    eager = x.grad.clone()
    x.grad = None
    compiled = torch.compile(gm, backend="aot_eager", fullgraph=True, dynamic=True)
    compiled(x).sum().backward()
    assert rel(x.grad, eager) < 1e-5
    unit = gm.lowrank_fx.default.lora.units.proj
    expected = 2 * (model.proj.weight + unit.scale * unit.lora_B @ unit.lora_A).sum(0)  # z contributes nothing
    assert rel(eager[0], expected) < 1e-5


def test_llama_rotary_no_grad_region_compiles():
    """HF Llama's rotary embedding runs under torch.no_grad(): its graph compiles fullgraph."""
    gm = _llama(lfx.Spec(targets=["*.q_proj"], method=lfx.LoRA(rank=2)))
    assert not any("wrap_with_set_grad_enabled" in str(n.target) for n in gm.graph.nodes)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(gm, backend=counter, fullgraph=True, dynamic=True)
    with torch.no_grad():
        for batch, seq in SHAPES[:2]:
            ids = torch.randint(0, models.VOCAB, (batch, seq))
            assert rel(compiled(ids, use_cache=False).logits, gm(ids, use_cache=False).logits) < 1e-5
    assert counter.frame_count == 1


def test_switching_adapters_does_not_recompile():
    first = lfx.Spec(targets=["*.q_proj", "*.v_proj"], method=lfx.LoRA(rank=4, init="nonzero"))
    second = lfx.Spec(targets=["*.q_proj", "*.mlp.*"], method=lfx.LoRTA(rank=4, init="nonzero"))
    gm = _llama(second, adapter="b", gm=_llama(first, adapter="a")).eval()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(gm, backend=counter, fullgraph=True, dynamic=True)
    ids = torch.randint(0, models.VOCAB, (2, 9))
    outputs = {}
    with torch.no_grad():
        for active in (["a"], ["b"], [], ["a", "b"], ["b"]):
            lfx.set_active_adapters(gm, active)
            assert lfx.active_adapters(gm) == active
            out = compiled(ids, use_cache=False).logits
            assert rel(out, gm(ids, use_cache=False).logits) < 1e-5
            outputs[tuple(active)] = out
        base = models.build("llama").model(ids, use_cache=False).logits
    assert counter.frame_count == 1
    assert rel(outputs[()], base) < 1e-5
    assert rel(outputs[("a",)], outputs[("b",)]) > 1e-3  # each adapter, and both, change the output
    assert rel(outputs[("a", "b")], outputs[("a",)]) > 1e-3 and rel(outputs[("a", "b")], outputs[("b",)]) > 1e-3


def test_inductor_trains_like_eager():
    """A real inductor compile of a training step (LoRA and RandLoRA's custom autograd Function
    on a small MLP, to keep the C++ build short): eager's loss and gradients, no recompile."""
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))
    spec = lfx.Spec(targets={"0": lfx.LoRA(rank=4, init="nonzero"),
                             "2": lfx.RandLoRA(rank=4, alpha=80.0, init="nonzero")})
    gm = lfx.rewrite(model, spec, example_inputs=(torch.randn(4, 16),)).train()
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(gm, backend=counter, fullgraph=True, dynamic=True)
    for batch in (3, 7):
        x = torch.randn(batch, 16)
        results = []
        for module in (compiled, gm):
            gm.zero_grad(set_to_none=True)
            out = module(x)
            out.square().mean().backward()
            results.append((out.detach(), {n: p.grad.clone() for n, p in gm.named_parameters() if p.requires_grad}))
        (out, grads), (ref_out, ref_grads) = results
        assert rel(out, ref_out) < 1e-5
        assert_grads_match(grads, ref_grads)
    assert counter.frame_count == 1
