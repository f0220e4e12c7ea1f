"""Layer blocks (passes/layers.py): a structured graph computes exactly what the flat one does,
owns each block's weights and adapters in the block, and shows the user the same names."""

import models
import numpy as np
import pytest
import safetensors
import safetensors.torch
import torch
from torch import nn

import lowrank_fx as lfx
from lowrank_fx.passes.layers import blocks, flat_view

METHODS = {"lora": lambda: lfx.LoRA(rank=2, init="nonzero"), "lorta": lambda: lfx.LoRTA(rank=2),
           "randlora": lambda: lfx.RandLoRA(rank=8)}


def _randomise(gm):
    """Non-zero adapters (B = 0 would hide most of the update); the same values for the same names."""
    with torch.no_grad():
        for i, (_, param) in enumerate(sorted(gm.lowrank_fx.named_parameters())):
            param.copy_(torch.randn(param.shape, generator=torch.Generator().manual_seed(i)) * 0.1)


def _pair(case, spec):
    flat = lfx.rewrite(case.model, spec, example_inputs=case.args, example_kwargs=case.kwargs)
    structured = lfx.rewrite(case.model, spec, example_inputs=case.args, example_kwargs=case.kwargs, layers="auto")
    _randomise(flat)
    _randomise(structured)
    return flat, structured


@pytest.fixture(scope="module")
def llama():
    return models.build("llama")


@pytest.fixture(scope="module", params=list(METHODS))
def pair(request, llama):
    torch.manual_seed(0)
    return request.param, *_pair(llama, lfx.Spec(targets="all-linear", method=METHODS[request.param]()))


def _run(gm, case):
    for param in gm.parameters():
        param.grad = None
    out = case.output(gm(*case.args, **case.kwargs))
    out.square().mean().backward()
    grads = {name: param.grad for name, param in gm.lowrank_fx.named_parameters() if param.grad is not None}
    return out.detach(), grads


def test_outputs_and_gradients_are_exactly_the_flat_graphs(pair, llama):
    _, flat, structured = pair
    assert blocks(structured) == ["model.layers.0", "model.layers.1"] and not blocks(flat)
    want, want_grads = _run(flat, llama)
    got, got_grads = _run(structured, llama)
    assert torch.equal(got, want)
    assert got_grads.keys() == want_grads.keys() and want_grads
    assert all(torch.equal(got_grads[name], want_grads[name]) for name in want_grads)


def test_the_block_owns_its_weights_and_adapters(pair):
    method, flat, structured = pair
    block = structured.get_submodule("model.layers.1")
    assert isinstance(block, torch.fx.GraphModule) and type(block).__name__ == "LlamaDecoderLayerBlock"
    own = {id(p) for p in block.parameters()}
    assert id(structured.get_parameter("model.layers.1.self_attn.q_proj.weight")) in own
    units = structured.lowrank_fx.default
    def in_units(layer):
        return [p for name, p in units.named_parameters() if f".units.model-layers-{layer}-" in name]
    if method != "lorta":  # a LoRTA unit has no parameters of its own
        assert in_units(1) and all(id(p) in own for p in in_units(1))  # its adapters' parameters live in it
    assert not any(id(p) in own for p in in_units(0))
    shared = [p for name, p in units.named_parameters() if ".units." not in name]  # factors every layer shares
    assert not any(id(p) in own for p in shared)
    assert sum(p.numel() for p in structured.parameters()) == sum(p.numel() for p in flat.parameters())


def test_targets_and_base_weight_names_are_unchanged(pair):
    _, flat, structured = pair
    assert structured.meta["lowrank_fx"].adapters["default"].groups == flat.meta["lowrank_fx"].adapters["default"].groups
    def base(gm):
        return {n for n, p in gm.named_parameters() if not p.requires_grad}
    assert base(structured) == base(flat)
    assert lfx.plan(structured, lfx.Spec(targets="all-linear", method=lfx.LoRA(rank=2))).rows == \
        lfx.plan(flat, lfx.Spec(targets="all-linear", method=lfx.LoRA(rank=2))).rows


def test_merge_and_merged_state_dict_equal_the_flat_graphs(pair, llama):
    _, flat, structured = pair
    with torch.no_grad():
        want = llama.output(lfx.merge(flat)(*llama.args, **llama.kwargs))
        got = llama.output(lfx.merge(structured)(*llama.args, **llama.kwargs))
    assert torch.equal(got, want)
    state, flat_state = lfx.merged_state_dict(structured), lfx.merged_state_dict(flat)
    assert list(state) == list(flat_state) and all(torch.equal(state[k], flat_state[k]) for k in state)


def _file(path):
    with safetensors.safe_open(str(path), "pt") as f:
        return f.metadata()["lowrank_fx"], safetensors.torch.load_file(str(path))


def test_adapter_files_are_identical_and_load_back(pair, llama, tmp_path):
    method, flat, structured = pair
    lfx.save_adapters(flat, tmp_path / "flat.safetensors")
    lfx.save_adapters(structured, tmp_path / "structured.safetensors")
    (meta, tensors), (flat_meta, flat_tensors) = _file(tmp_path / "structured.safetensors"), _file(tmp_path / "flat.safetensors")
    assert meta == flat_meta and tensors.keys() == flat_tensors.keys()
    assert all(torch.equal(tensors[k], flat_tensors[k]) for k in tensors)
    fresh = lfx.rewrite(llama.model, lfx.Spec(targets="all-linear", method=METHODS[method]()),
                        example_inputs=llama.args, example_kwargs=llama.kwargs, layers="auto")
    lfx.load_adapters(fresh, tmp_path / "structured.safetensors")
    with torch.no_grad():
        assert torch.equal(llama.output(fresh(*llama.args, **llama.kwargs)), llama.output(flat(*llama.args, **llama.kwargs)))
    loaded = lfx.load_adapters(llama.model, tmp_path / "structured.safetensors", example_inputs=llama.args,
                               example_kwargs=llama.kwargs)
    assert not blocks(loaded)  # a file holds no structure: loading captures flat


def test_peft_directories_are_identical(llama, tmp_path):
    flat, structured = _pair(llama, lfx.Spec(targets="all-linear", method=lfx.LoRA(rank=2)))
    lfx.save_peft(flat, tmp_path / "flat")
    lfx.save_peft(structured, tmp_path / "structured")
    for name in ("adapter_config.json",):
        assert (tmp_path / "flat" / name).read_text() == (tmp_path / "structured" / name).read_text()
    a = safetensors.torch.load_file(str(tmp_path / "flat" / "adapter_model.safetensors"))
    b = safetensors.torch.load_file(str(tmp_path / "structured" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    again = lfx.rewrite(llama.model, lfx.Spec(targets="all-linear", method=lfx.LoRA(rank=2)),
                        example_inputs=llama.args, example_kwargs=llama.kwargs, layers="auto")
    lfx.load_peft(again, tmp_path / "structured")
    with torch.no_grad():
        assert torch.equal(llama.output(again(*llama.args, **llama.kwargs)), llama.output(flat(*llama.args, **llama.kwargs)))


def test_onnx_export_equals_the_flat_graphs(llama, tmp_path):
    flat, structured = _pair(llama, lfx.Spec(targets=["*.q_proj", "*.v_proj"], method=lfx.LoRA(rank=2)))
    results = [lfx.export_onnx(gm, tmp_path / f"{i}.onnx", example_inputs=llama.args, example_kwargs=llama.kwargs,
                               mode="adapters", optimize=False)
               for i, gm in enumerate((flat, structured))]
    assert results[0].inputs == results[1].inputs and results[0].adapter_inputs == results[1].adapter_inputs
    ids = llama.other_args[0]
    outs = [np.asarray(r.session().run({"input_ids": ids}, adapter="default")["logits"]) for r in results]
    assert np.array_equal(outs[0], outs[1])
    with torch.no_grad():
        want = flat(ids, use_cache=False).logits.numpy()
    assert np.abs(outs[1] - want).max() <= 1e-4 * np.abs(want).max()


def test_a_second_adapter_and_gates(llama):
    spec = lfx.Spec(targets=["*.q_proj"], method=lfx.LoRA(rank=2, init="nonzero"))
    flat, structured = _pair(llama, spec)
    for gm in (flat, structured):
        torch.manual_seed(1)
        lfx.rewrite(gm, lfx.Spec(targets=["*.v_proj"], method=lfx.LoRA(rank=2, init="nonzero")), adapter="second")
    assert blocks(structured) == ["model.layers.0", "model.layers.1"]
    assert lfx.active_adapters(structured) == ["default", "second"]
    for active in (["default", "second"], "second", []):
        lfx.set_active_adapters(flat, active)
        lfx.set_active_adapters(structured, active)
        with torch.no_grad():
            assert torch.equal(llama.output(structured(*llama.args, **llama.kwargs)),
                               llama.output(flat(*llama.args, **llama.kwargs)))


@pytest.mark.parametrize("family, expected", [
    ("bert", ["encoder.layer.0", "encoder.layer.1"]), ("gpt2", ["transformer.h.0", "transformer.h.1"]),
    ("vit", ["layers.0", "layers.1"]),
    ("t5", ["encoder.block.0", "encoder.block.1", "decoder.block.0", "decoder.block.1"])])
def test_other_families(family, expected):
    case = models.build(family)
    flat, structured = _pair(case, lfx.Spec(targets="all-linear", method=lfx.LoRA(rank=2)))
    assert blocks(structured) == expected
    with torch.no_grad():
        assert torch.equal(case.output(structured(*case.args, **case.kwargs)), case.output(flat(*case.args, **case.kwargs)))
        assert torch.equal(case.output(structured(*case.other_args, **case.other_kwargs)),
                           case.output(flat(*case.other_args, **case.other_kwargs)))


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        return self.head(self.encoder(x))


def test_transformer_encoder_layers_and_patterns():
    model = Encoder().eval()
    x = torch.randn(2, 5, 16)
    spec = lfx.Spec(targets=["*.linear1", "*.linear2"], method=lfx.LoRA(rank=2, init="nonzero"))
    flat = lfx.rewrite(model, spec, example_inputs=(x,))
    named = lfx.rewrite(model, spec, example_inputs=(x,), layers=["encoder.layers.1"])
    auto = lfx.rewrite(model, spec, example_inputs=(x,), layers="auto")
    for gm in (flat, named, auto):
        _randomise(gm)
    assert blocks(named) == ["encoder.layers.1"] and blocks(auto) == ["encoder.layers.0", "encoder.layers.1"]
    with torch.no_grad():
        assert torch.equal(named(x), flat(x)) and torch.equal(auto(x), flat(x))
    plan = lfx.plan(model, spec, example_inputs=(x,), layers="auto")
    assert plan.layers == {"encoder.layers.0": "TransformerEncoderLayer", "encoder.layers.1": "TransformerEncoderLayer"}
    assert "layer blocks (2, TransformerEncoderLayer)" in str(plan)


def test_flat_view_shares_everything(pair):
    _, _, structured = pair
    view = flat_view(structured)
    assert not blocks(view) and view.lowrank_fx is structured.lowrank_fx
    assert view.get_parameter("model.layers.0.mlp.up_proj.weight") is structured.get_parameter("model.layers.0.mlp.up_proj.weight")


def test_bad_layers_are_refused_before_anything_changes(llama):
    spec = lfx.Spec(targets=["*.q_proj"], method=lfx.LoRA(rank=2))
    with pytest.raises(lfx.SpecError, match="layers='auto' finds model.layers.0, model.layers.1"):
        lfx.rewrite(llama.model, spec, example_inputs=llama.args, example_kwargs=llama.kwargs, layers=["decoder.*"])
    with pytest.raises(lfx.SpecError, match="glob patterns"):
        lfx.rewrite(llama.model, spec, example_inputs=llama.args, example_kwargs=llama.kwargs, layers=[3])
    gm = lfx.rewrite(llama.model, spec, example_inputs=llama.args, example_kwargs=llama.kwargs)
    with pytest.raises(lfx.SpecError, match="decoder"):
        lfx.rewrite(gm, lfx.Spec(targets=["*.v_proj"], method=lfx.LoRA(rank=2)), adapter="b", layers=["decoder.*"])
    assert list(gm.meta["lowrank_fx"].adapters) == ["default"]


@pytest.mark.parametrize("form", ["dora", "trained module", "int8 base"])
def test_other_adapter_forms_inside_blocks(form):
    case = models.build("llama")
    method = lfx.LoRA(rank=2, init="nonzero", dora=form == "dora")
    spec = lfx.Spec(targets=["*.q_proj", "*.down_proj"], method=method,
                    train=["model.layers.1.input_layernorm"] if form == "trained module" else ())
    if form == "int8 base":
        lfx.quantize_base(case.model, "int8")
    flat, structured = _pair(case, spec)
    assert blocks(structured) == ["model.layers.0", "model.layers.1"]
    want, want_grads = _run(flat, case)
    got, got_grads = _run(structured, case)
    assert torch.equal(got, want) and got_grads.keys() == want_grads.keys()
    assert all(torch.equal(got_grads[name], want_grads[name]) for name in want_grads)
    state, flat_state = lfx.merged_state_dict(structured), lfx.merged_state_dict(flat)
    assert list(state) == list(flat_state) and all(torch.equal(state[k], flat_state[k]) for k in state)
