"""RandLoRA's compute forms (form="factored" | "dense" | "auto"): the same Δy and gradients as
plain autograd on x (W + ΔW)ᵀ, in fp32 and under bf16 autocast, eager and compiled; "auto"
switches form with the token count without recompiling (and no form recompiles); the option
round-trips through files.

Model: up (48 -> 96, tall) and down (96 -> 48, wide), rank 4, so for both D = 96, d = 48 and
R = N·r = 48. Break-evens (randlora_forms.py): forward T* = D·d·R / (R(D + d) − D·d) = 96 = D;
backward with dx: down (wide) the same 96; up (tall) never, as R(D + 2d) = 2·D·d; up without
dx (its input needs no gradient) 96 again. SMALL tokens sit below them, LARGE above.
"""

from __future__ import annotations

import functools
import inspect

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._dynamo.backends.common import aot_autograd
from torch._dynamo.testing import CompileCounterWithBackend

import lowrank_fx as lfx
from lowrank_fx.files.serial import method_from_json
from lowrank_fx.methods import randlora_forms

IN, OUT, R = 48, 96, 4
SMALL, LARGE = (2, 3), (4, 50)  # 6 and 200 tokens
TOL = 1e-5


class _MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(IN, OUT), nn.Linear(OUT, IN)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def rel_err(ours, ref) -> float:
    return ((ours - ref).abs().max() / ref.abs().max()).item()


@pytest.fixture(scope="module")
def adapted():
    """(base module, adapted graph) with non-trivial diagonals; s·λ of the size of W's entries."""
    torch.manual_seed(0)
    model = _MLP()
    gm = lfx.rewrite(model, lfx.Spec(targets=["up", "down"], method=lfx.RandLoRA(rank=R, init="nonzero")))
    with torch.no_grad():
        for unit in gm.lowrank_fx.default.randlora.units.values():
            unit.lam.mul_(0.05)
            unit.gamma.uniform_(0.0, 2.0 / unit.gamma.shape[1])
    return model, gm


def _set_form(gm, form: str) -> None:
    for unit in gm.lowrank_fx.default.randlora.units.values():
        unit.form = form


def _reference(model, gm, x):
    """Plain autograd on the folded weights: down(relu(up(x))) with W + ΔW (ΔW from λ, γ)."""
    group = gm.lowrank_fx.default.randlora
    h = F.linear(x, model.up.weight + group.delta_weight("up"), model.up.bias)
    return F.linear(torch.relu(h), model.down.weight + group.delta_weight("down"), model.down.bias)


def _step(module, gm, x, weights):
    """Output and the gradients of x and of every λ and γ for L = Σ out ⊙ weights."""
    gm.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_()
    out = module(x)
    (out.float() * weights).sum().backward()
    return [out.detach().float(), x.grad] + [p.grad.clone() for p in gm.parameters() if p.requires_grad]


def _recording(monkeypatch):
    """Which form each forward and backward pass of the op takes: lists of their `dense` flags."""
    seen = {"forward": [], "backward": []}
    for name in seen:
        original = getattr(randlora_forms, name)
        signature = inspect.signature(original)

        def record(*args, _original=original, _signature=signature, _name=name, **kwargs):
            seen[_name].append(_signature.bind(*args, **kwargs).arguments["dense"])
            return _original(*args, **kwargs)

        monkeypatch.setattr(randlora_forms, name, record)
    return seen


@pytest.mark.parametrize("tokens", [SMALL, LARGE], ids=["small", "large"])
def test_every_form_matches_plain_autograd(adapted, tokens):
    model, gm = adapted
    x = torch.randn(*tokens, IN)
    weights = torch.randn(*tokens, IN)
    reference = _step(functools.partial(_reference, model, gm), gm, x, weights)
    results = {}
    for form in ("factored", "dense", "auto"):
        _set_form(gm, form)
        results[form] = _step(gm, gm, x, weights)
        for got, want in zip(results[form], reference):
            assert rel_err(got, want) <= TOL, form
    for got, want in zip(results["dense"], results["factored"]):
        assert rel_err(got, want) <= TOL
    _set_form(gm, "auto")


def test_break_evens_are_the_documented_ones():
    """T* of randlora_forms.py: the first token count at which "auto" takes the dense form."""
    def first_dense(big, small, cols, tall, **kw):
        return next(t for t in range(1, 10_000) if randlora_forms.use_dense("auto", randlora_forms.pass_costs(
            t, big, small, cols, tall, **kw)))

    D, d, cols = 96, 48, 48
    assert first_dense(D, d, cols, True) == first_dense(D, d, cols, False) == D + 1  # forward: T* = D, ties stay factored
    assert first_dense(D, d, cols, False, backward=True) == D + 1
    assert first_dense(D, d, cols, True, backward=True, input_grad=False) == D + 1
    assert not any(randlora_forms.use_dense("auto", randlora_forms.pass_costs(t, D, d, cols, True, backward=True))
                   for t in (10, 10_000, 10**7))  # tall with dx, R(D + 2d) = 2·D·d: never
    assert first_dense(48, 48, 48, True) == 49 and first_dense(48, 48, 48, True, backward=True) == 97  # square: d, 2d
    big_rank = 3 * d  # R = 144: T* = ρ·R / (R − ρ), ρ = D·d / (D + d) = 32
    assert first_dense(D, d, big_rank, True) == 32 * big_rank // (big_rank - 32) + 1
    assert randlora_forms.use_dense("dense", (1, 10**9)) and not randlora_forms.use_dense("factored", (10**9, 1))


def test_auto_picks_per_pass(adapted, monkeypatch):
    """Forward dense past 96 tokens; backward: down dense, up factored with dx and dense without."""
    _, gm = adapted
    seen = _recording(monkeypatch)
    for tokens, needs_dx in ((SMALL, True), (LARGE, True), (LARGE, False)):
        seen["forward"].clear(), seen["backward"].clear()
        x = torch.randn(*tokens, IN, requires_grad=needs_dx)
        gm(x).square().sum().backward()
        large = tokens == LARGE
        assert seen["forward"] == [large, large]  # up, down
        assert seen["backward"] == [large, large and not needs_dx]  # down, then up


@pytest.mark.parametrize("form", ["auto", "factored", "dense"])
def test_compiled_never_recompiles_across_token_counts(adapted, form):
    """One frame for token counts on both sides of the break-even; "auto" holds both forms of each
    pass (a torch.cond on the symbolic token count: 2 sites, forward and backward), the fixed forms
    theirs only."""
    model, gm = adapted
    _set_form(gm, form)
    conds = []

    def count(graph, inputs):
        conds.append(sum(n.target is torch.ops.higher_order.cond for n in graph.graph.nodes))
        return graph.forward

    backend = aot_autograd(fw_compiler=count, bw_compiler=count)
    counter = CompileCounterWithBackend(backend)
    torch._dynamo.reset()
    compiled = torch.compile(gm, backend=counter, fullgraph=True, dynamic=True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for tokens in (SMALL, LARGE, (3, 7), (3, 70)):
            x = torch.randn(*tokens, IN)
            weights = torch.randn(*tokens, IN)
            for got, want in zip(_step(compiled, gm, x, weights), _step(functools.partial(_reference, model, gm), gm, x, weights)):
                assert rel_err(got, want) <= TOL, tokens
    assert counter.frame_count == 1
    assert conds == [2 if form == "auto" else 0] * 2  # one forward graph, one backward graph
    torch._dynamo.reset()
    _set_form(gm, "auto")


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_bf16_autocast_trains_in_every_form(adapted, compiled):
    """Products in bf16 (the op casts; autocast is off inside it), gradients back in fp32, and
    every output and gradient as close to fp32 as plain autograd under the same autocast."""
    model, gm = adapted
    x, weights = torch.randn(*LARGE, IN), torch.randn(*LARGE, IN)
    plain = functools.partial(_reference, model, gm)
    reference = _step(plain, gm, x, weights)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bounds = [max(2 * rel_err(got, want), 1e-2) for got, want in zip(_step(plain, gm, x, weights), reference)]
    torch._dynamo.reset()
    for form in ("factored", "dense", "auto"):
        _set_form(gm, form)
        run = torch.compile(gm, backend="aot_eager", fullgraph=True, dynamic=True) if compiled else gm
        with torch.autocast("cpu", dtype=torch.bfloat16):
            results = _step(run, gm, x, weights)
        assert all(p.grad.dtype == torch.float32 for p in gm.parameters() if p.requires_grad)
        for got, want, bound in zip(results, reference, bounds):
            assert rel_err(got, want) <= bound, form
        torch._dynamo.reset()
    _set_form(gm, "auto")


def test_export_holds_standard_ops_only(adapted):
    """torch.export (and so ONNX export) sees plain ops: the dense form for "dense", else factored."""
    _, gm = adapted
    x = torch.randn(*SMALL, IN)
    for form in ("auto", "dense"):
        _set_form(gm, form)
        with torch.no_grad():
            program = torch.export.export(gm, (x,), strict=False)
            targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
            assert not any("lowrank_fx" in t for t in targets), targets
            torch.testing.assert_close(program.module()(x), gm(x), rtol=TOL, atol=TOL)
    _set_form(gm, "auto")


def test_form_option_is_checked_stored_and_read_back(tmp_path):
    with pytest.raises(lfx.SpecError, match=r"form must be one of \('auto', 'factored', 'dense'\), got 'fast'"):
        lfx.RandLoRA(form="fast")
    assert lfx.RandLoRA().form == "auto"
    assert lfx.RandLoRA(form="dense").config()["form"] == "dense"
    assert method_from_json({"method": "randlora", "rank": 4}).form == "auto"  # files written before form=

    model = _MLP()
    gm = lfx.rewrite(model, lfx.Spec(targets=["up", "down"], method=lfx.RandLoRA(rank=R, init="nonzero", form="dense")))
    x = torch.randn(*SMALL, IN)
    path = lfx.save_adapters(gm, tmp_path / "a.safetensors")
    loaded = lfx.load_adapters(model, path)
    assert {u.form for u in loaded.lowrank_fx.default.randlora.units.values()} == {"dense"}
    torch.testing.assert_close(loaded(x), gm(x), rtol=0, atol=0)
    # PEFT has no such option: its directory reads back as "auto", and still loads into this graph
    lfx.save_peft(gm, tmp_path / "peft")
    again = lfx.load_peft(gm, tmp_path / "peft")
    assert {u.form for u in again.lowrank_fx.default.randlora.units.values()} == {"dense"}
    assert rel_err(again(x), loaded(x)) <= TOL
    fresh = lfx.load_peft(model, tmp_path / "peft")
    assert {u.form for u in fresh.lowrank_fx.default.randlora.units.values()} == {"auto"}
    assert rel_err(fresh(x), loaded(x)) <= TOL


