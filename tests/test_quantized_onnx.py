"""Quantized bases in ONNX: unmerged exports keep the base integer (MatMulNBits / MatMulBnb4),
and ONNX Runtime's outputs match PyTorch's.

The oracle is the adapted quantized graph in PyTorch, run at shapes the export never saw. The
integer initializers are checked in the file itself: each quantized layer is one contrib op
whose uint8 codes are about the quantized bytes, and no float copy of its weight exists.
"""

from __future__ import annotations

import warnings

import bitsandbytes as bnb
import numpy as np
import onnx
import pytest
import torch
from test_quantized import BNB_SCHEMES, LINEARS, TORCHAO_SCHEMES, _ids, _quantized, _rel, _rewrite

import lowrank_fx as lfx
from lowrank_fx.errors import ExportError

SPEC = lfx.Spec(targets={"*_proj": lfx.LoRA(rank=4, init="nonzero")})
INTEGER_OPS = {"MatMulNBits", "MatMulBnb4"}
EXPECTED_OP = {"int8": "MatMulNBits", "int4": "MatMulNBits", "int4-packed": "MatMulNBits", "nf4": "MatMulBnb4",
               "bnb-nf4": "MatMulBnb4", "bnb-int8": "MatMulNBits"}
# ONNX Runtime decodes NF4 with bitsandbytes' table, which differs from torchao's by up to 5e-5
TOLERANCE = {"nf4": 1e-4}
KWARGS = {"use_cache": False}
OPTIMIZED = {"int8", "nf4"}  # one scheme per contrib op goes through the onnxscript optimizer (seconds each)


def _logits(gm, ids, adapter):
    active = lfx.active_adapters(gm)
    lfx.set_active_adapters(gm, [adapter] if adapter else [])
    gm.eval()
    try:
        with torch.no_grad():
            return gm(ids).logits.numpy()
    finally:
        lfx.set_active_adapters(gm, active)


_EXPORTS: dict[str, tuple] = {}


def _exported(scheme, tmp_path_factory):
    """(graph with two LoRA adapters, its "adapters" export, the loaded ONNX model), once per scheme."""
    if scheme not in _EXPORTS:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            gm = _rewrite(_quantized(scheme), SPEC)
            lfx.rewrite(gm, SPEC, adapter="second")
        path = tmp_path_factory.mktemp(scheme) / "model.onnx"
        export = lfx.export_onnx(gm, path, example_inputs=(_ids(),), example_kwargs=KWARGS, mode="adapters",
                                 optimize=scheme in OPTIMIZED)
        _EXPORTS[scheme] = (gm, export, onnx.load(str(path)))
    return _EXPORTS[scheme]


@pytest.mark.parametrize("scheme", TORCHAO_SCHEMES + BNB_SCHEMES)
def test_unmerged_export_runs_the_base_as_integer_matmuls(scheme, tmp_path_factory):
    gm, export, model = _exported(scheme, tmp_path_factory)
    ops = [node.op_type for node in model.graph.node]
    assert ops.count(EXPECTED_OP[scheme]) == len(LINEARS)
    assert "DequantizeLinear" not in ops
    session = export.session()
    ids = _ids(3, 5, seed=1)  # not the export's shape
    for adapter in (None, "default", "second"):
        got = session.run({"input_ids": ids.numpy()}, adapter=adapter)["logits"]
        assert _rel(torch.from_numpy(got), torch.from_numpy(_logits(gm, ids, adapter))) < TOLERANCE.get(scheme, 1e-5)


@pytest.mark.parametrize("scheme", TORCHAO_SCHEMES + BNB_SCHEMES)
def test_integer_initializers_are_in_the_file_at_the_quantized_size(scheme, tmp_path_factory):
    gm, _export, model = _exported(scheme, tmp_path_factory)
    inits = {init.name: init for init in model.graph.initializer}
    integer_bytes = float_bytes = 0
    for node in model.graph.node:
        if node.op_type not in INTEGER_OPS:
            continue
        codes = inits[node.input[1]]  # B: the packed codes, a uint8 initializer
        assert codes.data_type == onnx.TensorProto.UINT8
        n, k = (next(a.i for a in node.attribute if a.name == name) for name in ("N", "K"))
        bits = next((a.i for a in node.attribute if a.name == "bits"), 4)
        assert len(codes.raw_data) == pytest.approx(n * k * bits / 8, rel=0.25)  # K padded to whole blocks
        integer_bytes += len(codes.raw_data)
        float_bytes += 4 * n * k
    weight_shapes = {tuple(lfx.plan(gm, SPEC).rows[i].shape) for i in range(len(LINEARS))}
    for init in inits.values():  # the optimizer folded no integer weight back to floats
        if init.data_type == onnx.TensorProto.FLOAT:
            assert tuple(init.dims) not in weight_shapes | {s[::-1] for s in weight_shapes}, init.name
    assert integer_bytes / float_bytes <= (0.26 if "8" in scheme else 0.13)


def test_per_row_export_keeps_the_base_integer(tmp_path, tmp_path_factory):
    gm = _exported("int4", tmp_path_factory)[0]
    export = lfx.export_onnx(gm, tmp_path / "rows.onnx", example_inputs=(_ids(4, 6),), example_kwargs=KWARGS,
                             mode="per_row", optimize=False)
    ops = [node.op_type for node in onnx.load(str(export.path)).graph.node]
    assert ops.count("MatMulNBits") == len(LINEARS)
    ids = _ids(3, 5, seed=2)
    rows = ["second", None, "default"]
    got = export.session().run({"input_ids": ids.numpy()}, rows=rows)["logits"]
    expected = np.concatenate([_logits(gm, ids[i:i + 1], rows[i]) for i in range(3)])
    assert _rel(torch.from_numpy(got), torch.from_numpy(expected)) < 1e-5


def test_merged_export_is_dense_and_a_requantized_merge_stays_integer(tmp_path):
    gm = _rewrite(_quantized("int8"), SPEC)
    ids = _ids(3, 5, seed=3)
    dense = lfx.export_onnx(gm, tmp_path / "dense.onnx", example_inputs=(_ids(),), example_kwargs=KWARGS, mode="merged",
                            optimize=False)
    assert not INTEGER_OPS & {n.op_type for n in onnx.load(str(dense.path)).graph.node}
    expected = _logits(gm, ids, "default")
    got = dense.session().run({"input_ids": ids.numpy()})["logits"]
    assert _rel(torch.from_numpy(got), torch.from_numpy(expected)) < 1e-5
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        requantized = lfx.merge(gm, requantize=True)
    export = lfx.export_onnx(requantized, tmp_path / "requantized.onnx", example_inputs=(_ids(),),
                             example_kwargs=KWARGS, mode="merged", optimize=False)
    assert [n.op_type for n in onnx.load(str(export.path)).graph.node].count("MatMulNBits") == len(LINEARS)
    with torch.no_grad():
        reference = requantized.eval()(ids).logits.numpy()
    got = export.session().run({"input_ids": ids.numpy()})["logits"]
    assert _rel(torch.from_numpy(got), torch.from_numpy(reference)) < 1e-5


def test_a_format_without_an_integer_form_is_refused_naming_the_layer(tmp_path):
    model = _quantized("int8")
    layer = model.model.layers[0].self_attn.q_proj
    fp4 = bnb.nn.Linear4bit(32, 32, bias=False, quant_type="fp4")
    fp4.weight = bnb.nn.Params4bit(torch.randn(32, 32), requires_grad=False, quant_type="fp4")
    model.model.layers[0].self_attn.q_proj = fp4.to("cpu")
    del layer
    gm = _rewrite(model, SPEC)
    with pytest.raises(ExportError, match=r"model\.layers\.0\.self_attn\.q_proj .*fp4.*mode='merged'"):
        lfx.export_onnx(gm, tmp_path / "fp4.onnx", example_inputs=(_ids(),), example_kwargs=KWARGS, mode="adapters",
                        optimize=False)
    assert not (tmp_path / "fp4.onnx").exists()
