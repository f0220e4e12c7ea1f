"""Unmerged ONNX export: swappable .onnx_adapter files in one ONNX Runtime session.

Exports (each costs seconds, so they are module-scoped and shared):
  llama: two LoRA adapters of different rank (1 and 8) and alpha in one graph;
  llama: LoRTA (its files hold the small shared CP factors);
  gpt2:  LoRA on Conv1D (addmm, (in, out) weights);
  bert:  one adapter mixing LoRA (query) and RandLoRA (value).
All but the first skip the onnxscript optimizer (optimize=False): it costs seconds per export.
The oracle is the trained graph itself in PyTorch (eval mode), with only the adapter under test
active, at shapes the export never saw; fp32, 1e-5 relative to the largest output.
"""

import re

import models
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import lowrank_fx as lfx


def rel_err(got, want) -> float:
    want = np.asarray(want)
    return float(np.abs(np.asarray(got) - want).max() / np.abs(want).max())


def reference(gm, case, adapter, args):
    """PyTorch output of `gm` itself in eval mode with only `adapter` active (None: the base model);
    its active adapters and mode are restored after."""
    active, training = lfx.active_adapters(gm), gm.training
    lfx.set_active_adapters(gm, [adapter] if adapter else [])
    gm.eval()
    try:
        with torch.no_grad():
            return case.output(gm(*args, **case.other_kwargs)).numpy()
    finally:
        lfx.set_active_adapters(gm, active)
        gm.train(training)


def _export(tmp_path_factory, family, specs, name, optimize=True):
    case = models.build(family)
    gm = None
    for adapter, spec in specs.items():
        gm = lfx.rewrite(gm if gm is not None else case.model, spec, example_inputs=case.args,
                         example_kwargs=case.kwargs, adapter=adapter)
    gm.train()
    path = tmp_path_factory.mktemp(name) / f"{name}.onnx"
    result = lfx.export_onnx(gm, path, example_inputs=case.args, example_kwargs=case.kwargs, optimize=optimize)
    return case, gm, result, result.session()


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    qv = ["*.q_proj", "*.v_proj"]
    return _export(tmp_path_factory, "llama", {
        "a": lfx.Spec(targets=qv, method=lfx.LoRA(rank=1, alpha=16.0, init="nonzero")),  # rank 1 defines the graph
        "b": lfx.Spec(targets=qv, method=lfx.LoRA(rank=8, alpha=4.0, init="nonzero")),
    }, "llama_lora")


@pytest.fixture(scope="module")
def lorta(tmp_path_factory):
    spec = lfx.Spec(targets=["*.q_proj", "*.o_proj"], method=lfx.LoRTA(rank=4, init="nonzero"))
    return _export(tmp_path_factory, "llama", {"default": spec}, "llama_lorta", optimize=False)


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    spec = lfx.Spec(targets=["*.c_attn", "*.c_fc"], method=lfx.LoRA(rank=4, init="nonzero"))
    return _export(tmp_path_factory, "gpt2", {"default": spec}, "gpt2_lora", optimize=False)


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    spec = lfx.Spec(targets={"*.query": lfx.LoRA(rank=4, init="nonzero"),
                             "*.value": lfx.RandLoRA(rank=8, init="nonzero")})
    return _export(tmp_path_factory, "bert", {"default": spec}, "bert_mixed", optimize=False)


@pytest.fixture(params=["llama", "lorta", "gpt2", "bert"])
def exported(request):
    return request.getfixturevalue(request.param)


def test_every_adapter_and_the_base_match_pytorch_in_one_session(exported):
    case, gm, result, session = exported
    assert set(session.adapters) == set(result.adapters) == set(gm.meta["lowrank_fx"].adapters)
    for args in (case.other_args, (torch.randint(0, models.VOCAB, (4, 5)),)):
        for adapter in [None, *session.adapters, None]:  # switch back and forth, no reload
            got = session.run({"input_ids": args[0]}, adapter=adapter)[result.outputs[0]]
            assert rel_err(got, reference(gm, case, adapter, args)) <= 1e-5, adapter


def test_adapters_change_the_output(exported):
    case, _gm, result, session = exported
    base = session.run(case.other_args, adapter=None)[result.outputs[0]]
    for adapter in session.adapters:
        assert rel_err(session.run(case.other_args, adapter=adapter)[result.outputs[0]], base) > 1e-3


def test_graph_mode_is_restored(exported):
    assert exported[1].training


def test_layout_defaults_mean_no_update(exported):
    """Inputs with a rank axis default to empty along it; the others (RandLoRA, scales) to zeros."""
    _case, _gm, result, _session = exported
    model = onnx.load(str(result.path))
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    inputs = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
    assert result.adapter_inputs and set(result.adapter_inputs) <= set(inputs)
    for name in result.adapter_inputs:
        default, dims = inits[name], inputs[name]
        ranked = [axis for axis, d in enumerate(dims) if isinstance(d, str) and d.endswith(".rank")]
        if ranked:
            assert [default.shape[a] for a in ranked] == [0], name
        else:
            assert not np.any(default), name
    if "bert" in str(result.path):
        assert "encoder.layer.0.attention.self.value.lam" in inits  # RandLoRA's Λ: an input
        assert not any("basis" in n for n in result.adapter_inputs)  # its bases are constants


def test_lora_inputs_are_named_after_targets(llama):
    result = llama[2]
    assert result.adapter_inputs[:3] == ["model.layers.0.self_attn.q_proj.lora_A",
                                         "model.layers.0.self_attn.q_proj.lora_B",
                                         "model.layers.0.self_attn.q_proj.scale"]


def test_lorta_files_are_tiny(lorta, llama):
    lorta_file = lorta[2].adapters["default"].stat().st_size
    params = sum(p.numel() for p in lorta[1].lowrank_fx.parameters())
    assert lorta_file < 4 * params + 2048
    assert lorta_file < llama[2].adapters["b"].stat().st_size


def test_adapter_trained_later_gets_a_file_for_the_same_model(llama, tmp_path):
    case, _gm, result, _session = llama
    spec = lfx.Spec(targets=["*.q_proj", "*.v_proj"], method=lfx.LoRA(rank=2, alpha=3.0, init="nonzero"))
    later = lfx.rewrite(case.model, spec, example_inputs=case.args, example_kwargs=case.kwargs, adapter="late")
    path = lfx.export_onnx_adapter(later, tmp_path / "late.onnx_adapter", adapter="late", model_path=result.path)
    fresh = lfx.AdapterSession(result.path, adapters={"late": path})
    got = fresh.run(case.other_args, adapter="late")[result.outputs[0]]
    assert rel_err(got, reference(later, case, "late", case.other_args)) <= 1e-5


def test_file_of_another_model_is_rejected_before_any_run(llama, gpt2):
    session, other = llama[3], gpt2[2].adapters["default"]
    with pytest.raises(lfx.AdapterFileError, match=r"for another model: none of its 12 tensors \(e.g. transformer.h.0"):
        session.add_adapter("gpt2", other)
    assert "gpt2" not in session.adapters


def _write(path, tensors):
    adapter = ort.AdapterFormat()
    adapter.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in tensors.items()})
    adapter.export_adapter(str(path))
    return path


def test_wrong_shapes_dtypes_and_partial_targets_are_rejected(llama, tmp_path):
    session = llama[3]
    name = "model.layers.0.self_attn.q_proj"
    a, b, s = (np.ones((4, 32), np.float32), np.ones((32, 4), np.float32), np.ones(1, np.float32))
    cases = {
        "shape": ({f"{name}.lora_A": np.ones((4, 31), np.float32), f"{name}.lora_B": b, f"{name}.scale": s},
                  "shape [4, 31]"),
        "dtype": ({f"{name}.lora_A": a.astype(np.float64), f"{name}.lora_B": b, f"{name}.scale": s}, "tensor(double)"),
        "rank": ({f"{name}.lora_A": a, f"{name}.lora_B": np.ones((32, 3), np.float32), f"{name}.scale": s},
                 "axis model.layers.0.self_attn.q_proj.rank is 3"),
        "partial": ({f"{name}.lora_A": a, f"{name}.lora_B": b}, "missing model.layers.0.self_attn.q_proj.scale"),
    }
    for label, (tensors, message) in cases.items():
        with pytest.raises(lfx.AdapterFileError, match=re.escape(message)):
            session.add_adapter(label, _write(tmp_path / f"{label}.onnx_adapter", tensors))
    session.add_adapter("q0", _write(tmp_path / "ok.onnx_adapter", {f"{name}.lora_A": a, f"{name}.lora_B": b,
                                                                      f"{name}.scale": s}))
    assert session.run(llama[0].other_args, adapter="q0")  # one target's update, the rest default


def test_unknown_adapter_name_and_bad_files(llama, tmp_path):
    session = llama[3]
    with pytest.raises(lfx.AdapterFileError, match=r"unknown adapter 'c'.*This session has: a, b"):
        session.run(llama[0].other_args, adapter="c")
    with pytest.raises(lfx.AdapterFileError, match="does not exist"):
        session.add_adapter("x", tmp_path / "missing.onnx_adapter")
    (tmp_path / "junk.onnx_adapter").write_bytes(b"not an adapter")
    with pytest.raises(lfx.AdapterFileError, match="not an ONNX Runtime adapter file"):
        session.add_adapter("x", tmp_path / "junk.onnx_adapter")


def test_adapters_of_another_structure_cannot_share_a_graph(tmp_path):
    x = torch.randn(2, 3, 8)
    mlp = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8))
    gm = lfx.rewrite(mlp, lfx.Spec(targets=["0"], method=lfx.LoRA(rank=4)), example_inputs=(x,), adapter="a")
    lfx.rewrite(gm, lfx.Spec(targets=["2"], method=lfx.LoRA(rank=4)), adapter="b")
    with pytest.raises(lfx.ExportError, match=r"adapter 'b' cannot share the ONNX graph of 'a'.*adapters=\['b'\]"):
        lfx.export_onnx(gm, tmp_path / "x.onnx", example_inputs=(x,))
    with pytest.raises(lfx.ExportError, match="no adapter named 'c'"):
        lfx.export_onnx(gm, tmp_path / "x.onnx", example_inputs=(x,), adapters=["c"])
