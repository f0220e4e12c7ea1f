"""Per-row ONNX export: every batch row picks its adapter by `adapter_ids` (-1: none)."""

import json

import models
import numpy as np
import pytest
import torch

import lowrank_fx as lfx
from lowrank_fx.export.adapter_graph import copy_graph


def rel_err(got, want) -> float:
    want = np.asarray(want)
    return float(np.abs(np.asarray(got) - want).max() / np.abs(want).max())


def row_reference(gm, case, adapter, ids):
    """PyTorch output for one row (batch of 1 row, repeated to 2: capture fixed size-1 dims)."""
    only, _ = copy_graph(gm, [adapter] if adapter else [])
    only.eval()
    with torch.no_grad():
        return case.output(only(ids[None].repeat(2, 1), **case.other_kwargs))[0].numpy()


def _export(tmp_path_factory, family, specs, optimize=True):
    case = models.build(family)
    gm = None
    for adapter, spec in specs.items():
        gm = lfx.rewrite(gm if gm is not None else case.model, spec, example_inputs=case.args,
                         example_kwargs=case.kwargs, adapter=adapter)
    path = tmp_path_factory.mktemp(family) / f"{family}_rows.onnx"
    result = lfx.export_onnx(gm, path, example_inputs=case.args, example_kwargs=case.kwargs, mode="per_row",
                             optimize=optimize)
    return case, gm, result, result.session()


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """Three methods in one per-row graph."""
    return _export(tmp_path_factory, "llama", {
        "a": lfx.Spec(targets=["*.q_proj", "*.v_proj"], method=lfx.LoRA(rank=4, init="nonzero")),
        "b": lfx.Spec(targets=["*.q_proj", "*.v_proj"], method=lfx.RandLoRA(rank=8, init="nonzero")),
        "c": lfx.Spec(targets=["*.q_proj", "*.o_proj"], method=lfx.LoRTA(rank=4, init="nonzero")),
    })


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    """Conv1D sites run addmm on (batch·seq, in): row weights are repeated per token."""
    return _export(tmp_path_factory, "gpt2", {
        "a": lfx.Spec(targets=["*.c_attn", "*.c_fc"], method=lfx.LoRA(rank=4, init="nonzero")),
        "b": lfx.Spec(targets=["*.c_attn"], method=lfx.LoRA(rank=8, alpha=4.0, init="nonzero")),
    }, optimize=False)  # the optimizer costs seconds per export


@pytest.fixture(params=["llama", "gpt2"])
def exported(request):
    return request.getfixturevalue(request.param)


def test_each_row_matches_pytorch_with_its_adapter(exported):
    case, gm, result, session = exported
    rows = [*result.row_adapters, None, result.row_adapters[0], None]
    ids = torch.randint(0, models.VOCAB, (len(rows), 9))
    got = session.run({"input_ids": ids}, rows=rows)[result.outputs[0]]
    for row, adapter in enumerate(rows):
        assert rel_err(got[row], row_reference(gm, case, adapter, ids[row])) <= 1e-4, (row, adapter)


def test_id_convention_and_sidecar(exported):
    case, gm, result, session = exported
    assert result.inputs == ["input_ids", "adapter_ids"]
    assert result.row_adapters == list(gm.meta["lowrank_fx"].adapters)
    sidecar = json.loads(result.path.with_name(result.path.stem + ".lowrank_fx.json").read_text())
    assert sidecar["row_adapters"] == result.row_adapters and sidecar["none_id"] == lfx.export.NONE_ID == -1
    ids = torch.randint(0, models.VOCAB, (3, 6))
    raw = session.session.run(None, {"input_ids": ids.numpy(), "adapter_ids": np.array([-1, 0, -1])})[0]
    by_name = session.run({"input_ids": ids}, rows=[None, result.row_adapters[0], None])[result.outputs[0]]
    np.testing.assert_array_equal(raw, by_name)
    with torch.no_grad():
        base = case.output(case.model(ids, use_cache=False)).numpy()
    assert rel_err(raw[0], base[0]) <= 1e-4 and rel_err(raw[2], base[2]) <= 1e-4


def test_one_adapter_for_the_whole_batch(exported):
    case, gm, result, session = exported
    name = result.row_adapters[-1]
    ids = case.other_args[0]
    got = session.run({"input_ids": ids}, adapter=name)[result.outputs[0]]
    for row in range(ids.shape[0]):
        assert rel_err(got[row], row_reference(gm, case, name, ids[row])) <= 1e-4


def test_bad_rows_are_rejected(llama):
    case, _gm, result, session = llama
    ids = case.other_args[0]
    with pytest.raises(lfx.AdapterFileError, match=r"unknown adapter 'd'; did you mean"):
        session.run({"input_ids": ids}, rows=["a", "d", None])
    with pytest.raises(ValueError, match="rows has 2 entries for a batch of 3"):
        session.run({"input_ids": ids}, rows=["a", None])
    with pytest.raises(lfx.AdapterFileError, match="per-row export"):
        session.add_adapter("x", result.path)


class _SequenceFirst(torch.nn.Module):
    """Runs its projection on (seq, batch, d), as nn.MultiheadAttention(batch_first=False) does."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(8, 8)

    def forward(self, x):
        return self.proj(x.transpose(0, 1)).transpose(0, 1)


def test_activation_without_leading_batch_is_refused(tmp_path):
    x = torch.randn(2, 3, 8)
    gm = lfx.rewrite(_SequenceFirst(), lfx.Spec(targets=["proj"], method=lfx.LoRA(rank=2)), example_inputs=(x,))
    with pytest.raises(lfx.ExportError, match=r"per-row adapters need the batch as the first dimension.*proj"):
        lfx.export_onnx(gm, tmp_path / "x.onnx", example_inputs=(x,), mode="per_row")
