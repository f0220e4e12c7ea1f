"""Streaming ONNX writes, lazy merged weights and the linear-time clean-up (issue 18)."""

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from torch import nn

import lowrank_fx as lfx
from lowrank_fx.errors import MergeError
from lowrank_fx.export.stream_save import save_streaming


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(16, 48)
        self.down = nn.Linear(48, 8)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


@pytest.fixture()
def adapted():
    torch.manual_seed(0)
    x = torch.randn(3, 16)
    gm = lfx.rewrite(Net().eval(), lfx.Spec(["up", "down"], lfx.LoRA(rank=2, init="nonzero")), example_inputs=(x,))
    return gm, x


def _run(path, x):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0]


@pytest.mark.parametrize("mode", ["merged", "adapters"])
def test_streamed_file_parses_as_onnx_irs_own_save(adapted, mode, tmp_path):
    gm, x = adapted
    result = lfx.export_onnx(gm, tmp_path / "m.onnx", example_inputs=(x,), mode=mode)
    streamed = onnx.load(result.path)
    model = ir.serde.deserialize_model(streamed)
    save_streaming(model, tmp_path / "again.onnx")
    ir.save(model, tmp_path / "reference.onnx")
    assert onnx.load(tmp_path / "again.onnx") == onnx.load(tmp_path / "reference.onnx")
    onnx.checker.check_model(streamed)


def test_merged_export_folds_lazily_and_matches_merge(adapted, tmp_path):
    gm, x = adapted
    result = lfx.export_onnx(gm, tmp_path / "m.onnx", example_inputs=(x,), mode="merged")
    with torch.no_grad():
        want = lfx.merge(gm)(x).numpy()
    got = _run(result.path, x)
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
    graph = onnx.load(result.path).graph
    weights = {t.name for t in graph.initializer}
    assert not any(n.op_type == "Transpose" and n.input[0] in weights for n in graph.node)  # folded at export


def test_merged_export_refuses_non_finite_weights_and_leaves_no_file(adapted, tmp_path):
    gm, x = adapted
    with torch.no_grad():
        next(p for n, p in gm.named_parameters() if n.endswith("lora_B")).fill_(float("inf"))
    with pytest.raises(MergeError, match="NaN or inf"):
        lfx.export_onnx(gm, tmp_path / "m.onnx", example_inputs=(x,), mode="merged")
    assert not list(tmp_path.iterdir())


def test_adapter_inputs_stay_overridable_after_clean_up(adapted, tmp_path):
    gm, x = adapted
    result = lfx.export_onnx(gm, tmp_path / "m.onnx", example_inputs=(x,), mode="adapters")
    session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    assert {i.name for i in session.get_overridable_initializers()} == set(result.adapter_inputs)
