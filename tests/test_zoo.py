"""Every method with its default options on every family of the zoo, with "all-linear".

For each family (tests/zoo.py) and method (LoRA(), LoRTA(), RandLoRA()):
  - defaults: the default method rewrites every target "all-linear" picks (and nothing
    else), and starts equal to the base model (zero update);
  - fold: with a non-zero update, the graph differs from the base model, and the original
    model loaded with the folded weights (`lfx.load_merged`) reproduces the graph at input
    shapes other than the capture's, as does `lfx.merge`;
  - compile: `torch.compile(gm, fullgraph=True, backend="aot_eager")` reproduces eager;
  - ONNX: the merged export (`mode="merged"`, which folds) run by ONNX Runtime reproduces the
    graph at other shapes. Exporting costs 1-12 s per family here, so each family is exported
    with one method, the methods taking turns (ONNX_METHOD): every family and every method
    reach ONNX Runtime, not every pair.

Non-zero updates: LoRA(init="nonzero"), LoRTA(init="nonzero"), RandLoRA(init="nonzero",
alpha=32.0); RandLoRA's default alpha = 640 (s = 20) with λ drawn non-zero makes ΔW many times
W, which pushes fp32 comparisons to ~1e-4, so the non-zero run uses s = 1.
One capture per family (module-scoped), deep-copied for each rewrite.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import zoo

import lowrank_fx as lfx
from lowrank_fx.adapt.capture import capture
from lowrank_fx.graph.record import tagged

TOL = 1e-5
ORT_TOL = 1e-5
DEFAULTS = {"lora": lfx.LoRA, "lorta": lfx.LoRTA, "randlora": lfx.RandLoRA}
NONZERO = {"lora": lambda: lfx.LoRA(init="nonzero"), "lorta": lambda: lfx.LoRTA(init="nonzero"),
           "randlora": lambda: lfx.RandLoRA(init="nonzero", alpha=32.0)}
METHODS = list(DEFAULTS)
ONNX_METHOD = {family: METHODS[i % 3] for i, family in enumerate(zoo.FAMILIES)}


def rel_err(ours, ref) -> float:
    ours, ref = torch.as_tensor(np.asarray(ours)), torch.as_tensor(np.asarray(ref))
    return ((ours - ref).abs().max() / ref.abs().max()).item()


def run(module, case, other=True):
    args, kwargs = (case.other_args, case.other_kwargs) if other else (case.args, case.kwargs)
    with torch.no_grad():
        return case.output(module(*args, **kwargs))


@pytest.fixture(scope="module", params=zoo.FAMILIES)
def family(request):
    """(family, case, captured base graph, base output at other shapes), built once per family."""
    case = zoo.build(request.param)
    base = capture(case.model, case.args, case.kwargs)
    return request.param, case, base, run(case.model, case)


@pytest.fixture(scope="module", params=METHODS)
def adapted(request, family):
    """(family, case, graph adapted with a non-zero update of `method`, base output, method)."""
    name, case, base, expected = family
    torch.manual_seed(1)
    gm = lfx.rewrite(copy.deepcopy(base), lfx.Spec("all-linear", method=NONZERO[request.param]()))
    return name, case, gm, expected, request.param


@pytest.mark.parametrize("method", METHODS)
def test_defaults_rewrite_every_all_linear_target(family, method):
    _name, case, base, expected = family
    plan = lfx.plan(base, lfx.Spec("all-linear", method=DEFAULTS[method]()))
    gm = lfx.rewrite(copy.deepcopy(base), lfx.Spec("all-linear", method=DEFAULTS[method]()))
    adapted = sorted(t for group in gm.lowrank_fx.default.values() for t in group.target_names)
    assert adapted == sorted(r.target for r in plan.rows) and adapted
    assert not set(adapted) & set(plan.left_out)
    deltas = {n.meta["lowrank_fx"]["target"] for n in tagged(gm, "delta")}
    assert deltas == set(adapted)  # every target got its adapter call
    assert rel_err(run(gm, case), expected) <= 1e-6  # zero update: the base model


def test_fold_through_the_original_model(adapted):
    _name, case, gm, expected, _method = adapted
    ours = run(gm, case)
    assert rel_err(ours, expected) > 1e-3  # the update is not zero
    model = copy.deepcopy(case.model)
    lfx.load_merged(model, gm)
    assert rel_err(run(model, case), ours) <= TOL
    assert rel_err(run(model, case, other=False), run(gm, case, other=False)) <= TOL
    assert rel_err(run(lfx.merge(gm), case), ours) <= TOL


def test_compiles_as_one_graph(adapted):
    _name, case, gm, _expected, _method = adapted
    compiled = torch.compile(gm, fullgraph=True, backend="aot_eager")
    assert rel_err(run(compiled, case), run(gm, case)) <= TOL


def test_merged_onnx_matches(adapted, tmp_path):
    name, case, gm, _expected, method = adapted
    if method != ONNX_METHOD[name]:
        pytest.skip(f"{name} is exported with {ONNX_METHOD[name]} (module docstring)")
    result = lfx.export_onnx(gm, tmp_path / f"{name}.onnx", example_inputs=case.args, example_kwargs=case.kwargs,
                             mode="merged", optimize=False)
    assert result.mode == "merged" and not result.adapter_inputs
    feeds = dict(zip(result.inputs, case.other_args))
    feeds.update({k: v for k, v in case.other_kwargs.items() if isinstance(v, torch.Tensor)})
    assert sorted(feeds) == sorted(result.inputs)
    output = "logits" if "logits" in result.outputs else result.outputs[0]
    got = result.session().run(feeds)[output]
    assert rel_err(got, run(gm, case)) <= ORT_TOL
