"""LoftQ over layers the user quantized with bitsandbytes (PEFT's replace_lora_weights_loftq):
`LoRA(init="loftq", loftq_weights=<float model's safetensors>)` keeps the 4-bit base and takes
A, B from the SVD of W − dequantize_4bit(Q). PEFT's own function moves the weight to CUDA, so
the oracle is its decomposition (`_low_rank_decomposition`) applied to W − bitsandbytes'
`dequantize_4bit` of the layer, both computed outside lowrank_fx.
"""

from __future__ import annotations

import warnings

import bitsandbytes as bnb
import bitsandbytes.functional as bnbf
import pytest
import safetensors.torch
import torch
from peft.utils.loftq_utils import _low_rank_decomposition

import lowrank_fx as lfx

TOL = 1e-5


def err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def _float_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.ReLU(), torch.nn.Linear(96, 64)).eval()


def _bnb(model, double_quant: bool):
    """The model with its linear layers in bitsandbytes' NF4 Linear4bit (quantized on .to())."""
    for name in ("0", "2"):
        module = model.get_submodule(name)
        layer = bnb.nn.Linear4bit(module.in_features, module.out_features, quant_type="nf4",
                                  compress_statistics=double_quant)
        layer.weight = bnb.nn.Params4bit(module.weight.data.clone(), requires_grad=False, quant_type="nf4",
                                         compress_statistics=double_quant, blocksize=64)
        layer.bias = torch.nn.Parameter(module.bias.data.clone(), requires_grad=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            setattr(model, name, layer.to("cpu"))
    return model


@pytest.fixture(scope="module")
def float_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("loftq") / "model.safetensors"
    safetensors.torch.save_file(_float_model().state_dict(), str(path))
    return path


def _rewrite(model, method):
    return lfx.rewrite(model, lfx.Spec(targets=["0", "2"], method=method), example_inputs=(torch.randn(3, 64),))


def _units(gm):
    group = gm.lowrank_fx.default["lora"]
    return {t: group.unit(t) for t in ("0", "2")}


@pytest.mark.parametrize("double_quant,alpha", [(False, 4.0), (True, 16.0)])
def test_factors_equal_the_svd_of_what_quantizing_lost(float_file, double_quant, alpha):
    floats = _float_model()
    model = _bnb(_float_model(), double_quant)
    packed = {n: model.get_submodule(n).weight.data.clone() for n in ("0", "2")}
    gm = _rewrite(model, lfx.LoRA(rank=4, alpha=alpha, init="loftq", loftq_weights=float_file))
    scale = alpha / 4
    x = torch.randn(5, 64)
    for name, unit in _units(gm).items():
        layer = model.get_submodule(name)
        q = bnbf.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
        w = floats.get_submodule(name).weight.detach()
        oracle = _low_rank_decomposition(w - q, reduced_rank=4)
        # PEFT: A = R, B = L; lowrank_fx divides both by √s so that Q + s · B A is the same
        assert err(unit.lora_A * scale ** 0.5, oracle["R"]) <= TOL, name
        assert err(unit.lora_B * scale ** 0.5, oracle["L"]) <= TOL, name
        assert torch.equal(layer.weight.data, packed[name])  # the 4-bit base is kept as it is
        dense_q = (q + scale * unit.lora_B @ unit.lora_A).detach()
        assert (dense_q - w).norm() < (q - w).norm()
    # the graph computes the 4-bit base plus the factors: a dense model with Q + s · B A
    twin = _float_model()
    with torch.no_grad():
        for name, unit in _units(gm).items():
            layer = model.get_submodule(name)
            q = bnbf.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
            twin.get_submodule(name).weight.copy_(q + scale * unit.lora_B @ unit.lora_A)
        assert err(gm(x)[0] if isinstance(gm(x), tuple) else gm(x), twin(x)) <= TOL
    assert not any(p.requires_grad for n, p in gm.named_parameters() if "lowrank_fx" not in n)


def test_refusals(float_file, tmp_path):
    with pytest.raises(lfx.SpecError, match="init='loftq' only"):
        lfx.LoRA(init="pissa", loftq_weights=float_file)
    with pytest.raises(lfx.SpecError, match="path of a safetensors file"):
        lfx.LoRA(init="loftq", loftq_weights=_float_model().state_dict())
    with pytest.raises(lfx.SpecError, match="is a float layer"):
        _rewrite(_float_model(), lfx.LoRA(rank=4, init="loftq", loftq_weights=float_file))
    torchao_nf4 = lfx.quantize_base(_float_model(), "nf4")
    with pytest.raises(lfx.SpecError, match="torchao's nf4 quantizes the block scales again"):
        _rewrite(torchao_nf4, lfx.LoRA(rank=4, init="loftq", loftq_weights=float_file))
    other = tmp_path / "other.safetensors"
    safetensors.torch.save_file({"0.weight": torch.zeros(96, 64)}, str(other))
    with pytest.raises(lfx.SpecError, match="no tensor '2.weight'"):
        _rewrite(_bnb(_float_model(), False), lfx.LoRA(rank=4, init="loftq", loftq_weights=other))
    with pytest.raises(lfx.SpecError, match="already quantized"):
        _rewrite(_bnb(_float_model(), False), lfx.LoRA(rank=4, init="loftq"))


def test_saved_adapter_loads_without_the_float_weights(float_file, tmp_path):
    """The base is the user's own 4-bit one, so the values saved are all there is: load_adapters
    and load_peft need neither the float file nor LoftQ again (PEFT's config: a plain LoRA)."""
    import json
    import shutil

    copy = tmp_path / "float.safetensors"
    shutil.copy(float_file, copy)
    gm = _rewrite(_bnb(_float_model(), False), lfx.LoRA(rank=4, alpha=8.0, init="loftq", loftq_weights=copy))
    lfx.save_adapters(gm, tmp_path / "a.safetensors")
    lfx.save_peft(gm, tmp_path / "peft")
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["init_lora_weights"] is True
    copy.unlink()
    x = torch.randn(5, 64)
    expected = gm(x)
    loaded = lfx.load_adapters(_bnb(_float_model(), False), tmp_path / "a.safetensors", example_inputs=(x,))
    from_peft = lfx.load_peft(_bnb(_float_model(), False), tmp_path / "peft", example_inputs=(x,))
    for graph in (loaded, from_peft):
        out = graph(x)
        assert err(out[0] if isinstance(out, tuple) else out, expected[0] if isinstance(expected, tuple) else expected) <= TOL
