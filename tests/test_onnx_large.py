"""Models above protobuf's 2 GiB limit: weights go to external data, ONNX Runtime loads them.

One wide MLP, 4096 -> 70000 -> 4096 in fp32 (2.29 GB of weights, each Linear 1.15 GB), with
LoRA on both layers. Exported merged and with adapters; ONNX Runtime's logits match
PyTorch's at 1e-5 relative. Peak memory stays near two copies of the weights (the model and
ONNX Runtime's session): export streams every weight to disk.
"""

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

import lowrank_fx as lfx

IN, HIDDEN = 4096, 70000


def rel_err(got, want) -> float:
    return float(np.abs(np.asarray(got) - want).max() / np.abs(want).max())


@pytest.fixture(scope="module")
def wide():
    """(adapted graph, example input): weights above 2 GiB, filled fast with seeded normals."""
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(IN, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, IN))
    model = model.to_empty(device="cpu").eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, parameter.shape[-1] ** -0.5, generator=generator)
    assert sum(p.numel() * p.element_size() for p in model.parameters()) > 2**31
    x = torch.randn(2, IN, generator=generator)
    gm = lfx.rewrite(model, lfx.Spec(["0", "2"], lfx.LoRA(rank=4, init="nonzero")), example_inputs=(x,))
    return gm, x


def _run(path, x, adapter=None):
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    run_options = None
    if adapter is not None:
        run_options = ort.RunOptions()
        loaded = ort.LoraAdapter()
        loaded.Load(str(adapter))
        run_options.add_active_adapter(loaded)
    return session.run(None, {"input": x.numpy()}, run_options)[0]


@pytest.mark.parametrize("mode", ["merged", "adapters"])
def test_above_two_gb_writes_external_data_and_runs(wide, mode, tmp_path):
    gm, x = wide
    result = lfx.export_onnx(gm, tmp_path / "wide.onnx", example_inputs=(x,), mode=mode)
    data = tmp_path / "wide.onnx.data"
    assert data in result.files and data.stat().st_size > 2**31
    assert (tmp_path / "wide.onnx").stat().st_size < 2**20  # the graph only
    with torch.no_grad():
        want = gm(x).numpy()
    other = torch.randn(3, IN, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want_other = gm(other).numpy()
    adapter = result.adapters.get("default")
    assert rel_err(_run(result.path, x, adapter), want) < 1e-5
    assert rel_err(_run(result.path, other, adapter), want_other) < 1e-5
