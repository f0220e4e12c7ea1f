"""The checks a quantized capture runs on each layer (graph/quant_check.py): O(weights), within
the floating-point bound of a dot product, and able to fail: a format whose dequantize is not the
weight its layer computes with, or a layer whose backward is wrong, is refused by name."""

from __future__ import annotations

import pytest
import torch
from test_quantized import _capture, _quantized

from lowrank_fx.errors import QuantizedBaseError
from lowrank_fx.graph.quant_check import dequantize_check, gradient_check, rounding_factor
from lowrank_fx.graph.quantized import Region


def _region(n_in: int, n_out: int) -> Region:
    return Region(key="layer", path="layer", module_type="torch.nn.modules.linear.Linear", nodes=[], activation="x",
                  output="y", weight_inputs=[], size_inputs=[], roots=[], quantized=[], in_features=n_in,
                  out_features=n_out, dtype=torch.float32, activation_rank=3, quantizes_activation=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_bound_holds_for_the_true_weight_and_catches_a_scaled_one(dtype):
    """n = 2048 inputs: the true W passes in both dtypes with a margin; in fp32, W scaled by 1.001
    (a tenth of a percent) and its transpose-like permutation fail."""
    weight = torch.randn(256, 2048, generator=torch.Generator().manual_seed(5)).to(dtype)
    bias = torch.randn(256, generator=torch.Generator().manual_seed(6)).to(dtype)
    layer = lambda x: torch.nn.functional.linear(x, weight, bias)  # noqa: E731
    ok, worst, _ = dequantize_check(layer, _region(2048, 256), weight, dtype, "cpu")
    assert ok and worst < 0.5, worst
    if dtype == torch.float32:
        for wrong in (weight * 1.001, weight.roll(1, dims=1)):
            ok, worst, relative = dequantize_check(layer, _region(2048, 256), wrong, dtype, "cpu")
            assert not ok and worst > 1 and relative > 5e-4


def test_rounding_factor_is_the_dot_product_bound():
    u = torch.finfo(torch.float32).eps / 2
    gamma = 100 * u / (1 - 100 * u)
    assert rounding_factor(torch.float32, 99) == pytest.approx((2 * gamma + 3 * u) / (1 - gamma))
    # 16-bit products are summed in fp32: the sums' part uses fp32's u, the roundings bf16's
    assert rounding_factor(torch.bfloat16, 99) == pytest.approx((2 * gamma + 3 * 2.0 ** -8) / (1 - gamma))
    assert rounding_factor(torch.float32, 1 << 25) == float("inf")


class _HalfGradient(torch.autograd.Function):
    """x Wᵀ forward, half the true input gradient backward."""

    @staticmethod
    def forward(ctx, x, weight):
        ctx.save_for_backward(weight)
        return x @ weight.t()

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        return 0.5 * grad @ weight, None


def test_gradient_check_tells_right_wrong_and_missing_backwards():
    weight = torch.randn(16, 32)
    region = _region(32, 16)
    assert gradient_check(lambda x: x @ weight.t(), region, torch.float32, "cpu")[0] == "ok"
    status, error, _ = gradient_check(lambda x: _HalfGradient.apply(x, weight), region, torch.float32, "cpu")
    assert status == "wrong" and error == pytest.approx(0.5, rel=1e-3)
    status, _, detail = gradient_check(lambda x: (x @ weight.t()).detach(), region, torch.float32, "cpu")
    assert status == "wrong" and "no gradient" in detail


@pytest.mark.parametrize("wrong", ["scaled", "transposed"])
def test_a_dequantize_that_is_not_the_layers_weight_is_refused_by_name(monkeypatch, wrong):
    """torchao's dequantize made 0.1 % too large, or transposed (the square q_proj is the first
    layer): capture raises naming that layer and the measured mismatch."""
    import lowrank_fx.graph.quantized as quantized

    real = quantized.torchao_dense

    def broken(*args):
        dense = real(*args)
        if wrong == "scaled":
            return dense * 1.001
        return dense.t().contiguous() if dense.shape[0] == dense.shape[1] else dense

    monkeypatch.setattr(quantized, "torchao_dense", broken)
    with pytest.raises(QuantizedBaseError) as info:
        _capture(_quantized("nf4"))
    text = str(info.value)
    assert "model.layers.0.self_attn.q_proj (nf4)" in text and "dequantize does not give the weight" in text
    assert "times the floating-point rounding bound" in text


def test_a_bitsandbytes_dequantize_that_is_not_the_layers_weight_is_refused_by_name(monkeypatch):
    from lowrank_fx.graph.quant_formats import BnbLinear4bit

    real = BnbLinear4bit.dense_weight
    monkeypatch.setattr(BnbLinear4bit, "dense_weight",  # the backward's W (given tensors) only, not the forward's
                        lambda self, tensors=None: real(self, tensors) * (1.001 if tensors else 1.0))
    with pytest.raises(QuantizedBaseError, match=r"model\.layers\.0\.self_attn\.q_proj \(bnb-4bit\)"):
        _capture(_quantized("bnb-nf4"))


@pytest.mark.parametrize("scheme", ["nf4", "int4-packed"])
def test_capture_never_probes_a_layer_on_the_identity(monkeypatch, scheme):
    """The checks at capture cost O(weights): no layer runs on the (in × in) identity, neither
    where its format has a dequantize (nf4) nor where its kernel has no backward (packed int4)."""
    import lowrank_fx.passes.quantized_base as quantized_base

    def refuse(*args):
        raise AssertionError("identity probe at capture")

    monkeypatch.setattr(quantized_base, "dequantize_region", refuse)
    gm = _capture(_quantized(scheme))
    assert sum(quantized_base.is_quantized_call(n) for n in gm.graph.nodes) == 14


def test_layers_of_one_kind_are_checked_once_and_a_layer_of_another_kind_on_its_own(monkeypatch):
    """The 2-layer Llama's 14 nf4 layers come in 4 kinds by shape ((32, 32): q, o; (16, 32): k, v;
    (64, 32): gate, up; (32, 64): down): 4 checks. A format broken for one of them is still caught."""
    import lowrank_fx.passes.quantized_base as quantized_base

    shapes = []
    real = quantized_base.dequantize_check

    def counted(layer, region, dense, *args):
        shapes.append((region.out_features, region.in_features))
        return real(layer, region, dense, *args)

    monkeypatch.setattr(quantized_base, "dequantize_check", counted)
    gm = _capture(_quantized("nf4"))
    assert sum(quantized_base.is_quantized_call(n) for n in gm.graph.nodes) == 14
    assert sorted(shapes) == sorted({(32, 32), (16, 32), (64, 32), (32, 64)})
    monkeypatch.setattr(quantized_base, "dequantize_check",
                        lambda layer, region, dense, *args: real(layer, region, dense * (1.001 if region.in_features == 64 else 1.0), *args))
    with pytest.raises(QuantizedBaseError, match=r"model\.layers\.0\.mlp\.down_proj"):
        _capture(_quantized("nf4"))
