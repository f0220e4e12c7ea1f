"""Merged ONNX export: ONNX Runtime matches PyTorch at shapes other than the export's."""

import models
import numpy as np
import onnx
import pytest
import torch

import lowrank_fx as lfx

FAMILIES = ["llama", "gpt2", "bert"]
ATTENTION = ["re:(q_proj|v_proj|c_attn|query|value)$"]


def rel_err(got, want) -> float:
    want = np.asarray(want)
    return float(np.abs(np.asarray(got) - want).max() / np.abs(want).max())


@pytest.fixture(scope="module", params=FAMILIES)
def exported(request, tmp_path_factory):
    """(case, merged graph, export result, exported graph still in train mode afterwards).

    GPT-2 exports the adapted graph with mode="merged"; BERT is written with external data."""
    case = models.build(request.param)
    spec = lfx.Spec(targets=ATTENTION, method=lfx.LoRA(rank=4, init="nonzero"))
    gm = lfx.rewrite(case.model, spec, example_inputs=case.args, example_kwargs=case.kwargs)
    lfx.rewrite(gm, spec, adapter="inactive")
    lfx.set_active_adapters(gm, "default")  # merging (and a merged export) folds the active ones
    merged = lfx.merge(gm)
    source = gm if request.param == "gpt2" else merged  # mode="merged" folds an adapted graph itself
    source.train()
    path = tmp_path_factory.mktemp("merged") / f"{request.param}.onnx"
    result = lfx.export_onnx(source, path, example_inputs=case.args, example_kwargs=case.kwargs, mode="merged",
                             external_data=request.param == "bert",
                             optimize=request.param == "llama")  # the optimizer costs seconds per export
    return case, merged, result, source.training


def test_parity_at_other_shapes(exported):
    case, merged, result, _ = exported
    session = result.session()
    merged.eval()
    for args in (case.other_args, (torch.randint(0, models.VOCAB, (1, 19)),)):
        with torch.no_grad():
            want = merged(*args, **case.other_kwargs)
        got = session.run({"input_ids": args[0]})
        for name in result.outputs:
            assert rel_err(got[name], getattr(want, name)) <= 1e-4, name


def test_readable_names_and_dynamic_axes(exported):
    case, _merged, result, _ = exported
    assert result.mode == "merged" and result.inputs == ["input_ids"] and not result.adapter_inputs
    assert result.outputs[0] == ("last_hidden_state" if "Bert" in type(case.model).__name__ else "logits")
    model = onnx.load(str(result.path), load_external_data=False)
    dims = [d.dim_param for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", "sequence"]
    assert [d.dim_param for d in model.graph.output[0].type.tensor_type.shape.dim][:2] == ["batch", "sequence"]


def test_exported_in_eval_mode_and_mode_restored(exported):
    _case, _merged, result, still_training = exported
    assert still_training  # the fixture set train mode before exporting; it is kept
    model = onnx.load(str(result.path), load_external_data=False)
    assert not any(node.op_type == "Dropout" for node in model.graph.node)


def test_external_data_when_asked(exported):
    case, _merged, result, _ = exported
    data = result.path.with_name(result.path.name + ".data")
    assert (data in result.files) == data.exists()
    if "Bert" in type(case.model).__name__:
        model = onnx.load(str(result.path), load_external_data=False)
        assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)


@torch.library.custom_op("lfx_onnx_test::twice", mutates_args=())
def _twice(x: torch.Tensor) -> torch.Tensor:
    return x * 2


@_twice.register_fake
def _(x):
    return torch.empty_like(x)


class _Custom(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(4, 4)

    def forward(self, x):
        return _twice(self.proj(x))


def test_op_without_onnx_translation_names_the_node_and_the_fix(tmp_path):
    with pytest.raises(lfx.ExportError) as info:
        lfx.export_onnx(_Custom(), tmp_path / "custom.onnx", example_inputs=(torch.randn(2, 3, 4),))
    message = str(info.value)
    assert "node twice" in message and "lfx_onnx_test.twice" in message
    assert "custom_translation_table" in message


def test_mode_needs_adapters(tmp_path):
    with pytest.raises(lfx.ExportError, match="mode='merged'"):
        lfx.export_onnx(_Custom(), tmp_path / "x.onnx", example_inputs=(torch.randn(2, 3, 4),), mode="adapters")


class _Checked(torch.nn.Module):
    """Checks a value as LLaVA checks its image-token count: torch._check_tensor_all, which
    torch.export records as _is_all_true -> item -> _assert_scalar (no ONNX translation)."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(4, 4)

    def forward(self, x, mask):
        torch._check_tensor_all(mask.sum() * x.shape[-1] == x.numel())
        return self.proj(x * mask[..., None])


def _assertions(gm):
    return [n for n in gm.graph.nodes
            if n.op == "call_function" and ("_assert_scalar" in str(n.target) or "_is_all_true" in str(n.target))]


def test_checks_on_values_are_left_out_of_the_onnx_model(tmp_path):
    """The graph's check nodes are dropped from the export's copy only: ONNX Runtime gives the
    merged graph's outputs, and the PyTorch graph still checks its inputs."""
    spec = lfx.Spec(targets=["proj"], method=lfx.LoRA(rank=2, init="nonzero"))
    x, mask = torch.randn(2, 3, 4), torch.ones(2, 3)
    gm = lfx.rewrite(_Checked(), spec, example_inputs=(x, mask)).eval()
    checks = len(_assertions(gm))
    assert checks >= 2
    result = lfx.export_onnx(gm, tmp_path / "checked.onnx", example_inputs=(x, mask), mode="merged")
    assert len(_assertions(gm)) == checks
    other_x, other_mask = torch.randn(5, 7, 4), torch.ones(5, 7)
    got = result.session().run({"x": other_x, "mask": other_mask})[result.outputs[0]]
    with torch.no_grad():
        want = lfx.merge(gm)(other_x, other_mask)
    assert rel_err(got, want) <= 1e-5
    with pytest.raises(Exception):  # the PyTorch graph still refuses a mask that fails the check
        gm(other_x, torch.zeros(5, 7))
