"""Quantized layers at capture: check that gradients flow through each base, refuse the ones
whose gradient is wrong, and make every one a custom op that saves no dense weight.

Adapters before a quantized layer learn through that layer's input gradient dL/dx = dL/dy · W.
For every quantized region (graph/quantized.py) this pass runs the region's own function on a
small random input and compares the input gradient autograd gives with the one of the same
layer made dense (y(v) - y(0) is v Wᵀ for a weight-only layer, so <dL/dx, v> must equal
<dL/dy, y(v) - y(0)>):

  - a wrong gradient, as with dynamic activation quantization (the activation is rounded to
    int8 inside the layer, so autograd sees no path, or a rounded one): `QuantizedBaseError`,
    giving the measured relative error of the gradient and of the output against the dense
    layer. Use a weight-only scheme for training.
  - otherwise the region becomes one custom op, `lowrank_fx::quantized_linear(x, weights, key,
    out)`, whose forward runs the region's own nodes. Left as they are, those nodes would make
    autograd keep each layer's dequantized fp32 weight from forward to backward (the input of
    the matmul), as much memory as the fp32 model. The op keeps only x and the quantized
    tensors; its backward (`lowrank_fx::quantized_linear_backward`) recomputes the region and
    takes its input gradient, or, where the kernel has no backward (torchao's packed int4 CPU
    kernel), gives dL/dy · W with W dequantized by the region (y(I) - y(0)). Eager and under
    torch.compile (the ops are opaque to it).

The registry of wrapped regions lives in this process: a graph with a wrapped region runs
wherever this process runs it (deep copies share it), not after pickling to another process.
"""

from __future__ import annotations

import uuid

import torch
from torch import fx

from ..errors import QuantizedBaseError
from ..graph.quantized import (Region, activation_dtype, dequantize_region, find_regions, probe_input, region_device,
                               region_function, region_scheme, weight_dequantizer, weight_values)

_WRAPPED: dict[str, tuple[fx.GraphModule, Region, object]] = {}  # key -> (f(x, *weights), region, W(weights) or None)
GRADIENT_TOLERANCE = 1e-3


def _wrapped(key: str) -> tuple[fx.GraphModule, Region, object]:
    try:
        return _WRAPPED[key]
    except KeyError:
        raise QuantizedBaseError(
            f"quantized layer {key!r} was wrapped in another process; capture the model again in this one "
            "(lfx.rewrite(...)) and load the adapters into it (lfx.load_adapters)"
        ) from None


@torch.library.custom_op("lowrank_fx::quantized_linear", mutates_args=())
def quantized_linear(x: torch.Tensor, weights: list[torch.Tensor], key: str, out_features: int) -> torch.Tensor:
    """y of a quantized linear, computed by its own region."""
    function, _, _ = _wrapped(key)
    with torch.no_grad():
        return function(x, *weights).clone()


@quantized_linear.register_fake
def _(x, weights, key, out_features):
    return x.new_empty((*x.shape[:-1], out_features))


@torch.library.custom_op("lowrank_fx::quantized_linear_backward", mutates_args=())
def quantized_linear_backward(x: torch.Tensor, grad: torch.Tensor, weights: list[torch.Tensor], key: str) -> torch.Tensor:
    """dL/dx of a wrapped quantized linear: dL/dy · W with W rebuilt from the weights, or the
    region recomputed and differentiated (module docstring)."""
    function, _, dense_weight = _wrapped(key)
    if dense_weight is None:  # autograd is off inside a custom op; torch.func's own transform is not
        _, pullback = torch.func.vjp(lambda v: function(v, *weights), x)
        return pullback(grad)[0]
    return (grad @ dense_weight(weights).to(grad.dtype)).to(x.dtype)


@quantized_linear_backward.register_fake
def _(x, grad, weights, key):
    return torch.empty_like(x)


def _setup(ctx, inputs, output):
    x, weights, key, out_features = inputs
    ctx.save_for_backward(x, *weights)
    ctx.key, ctx.count = key, len(weights)


def _backward(ctx, grad):
    x, *weights = ctx.saved_tensors
    found = torch.ops.lowrank_fx.quantized_linear_backward(x, grad.contiguous(), list(weights), ctx.key)
    return found, [None] * ctx.count, None, None


quantized_linear.register_autograd(_backward, setup_context=_setup)


def gradient_check(gm: fx.GraphModule, region: Region, rows: int = 4) -> tuple[str, float, str]:
    """("ok" | "no backward" | "wrong", measured relative error of the input gradient, detail)."""
    function = region_function(gm, region)
    dtype, device = activation_dtype(gm, region), region_device(gm, region)
    generator = torch.Generator().manual_seed(0)
    x = probe_input(region, torch.randn(rows, region.in_features, generator=generator)).to(device, dtype)
    v = probe_input(region, torch.randn(rows, region.in_features, generator=generator)).to(device, dtype)
    x.requires_grad_(True)
    try:
        y = function(x)
        g = torch.randn(y.shape, generator=generator).to(device, dtype)
        if not y.requires_grad:
            return "wrong", 1.0, "no gradient reaches the layer's input: autograd sees no path through it"
        (grad,) = torch.autograd.grad(y, x, g)
    except (RuntimeError, NotImplementedError) as err:
        return "no backward", float("nan"), str(err).strip().splitlines()[0]
    with torch.no_grad():
        change = function(v) - function(torch.zeros_like(v))
        expected = (g * change).flatten(0, -2).sum(-1)
        got = (grad * v).flatten(0, -2).sum(-1)
        error = float((got - expected).norm() / expected.norm().clamp_min(1e-30))
    return ("ok" if error <= GRADIENT_TOLERANCE else "wrong"), error, ""


def _refusal(gm: fx.GraphModule, region: Region, error: float, detail: str) -> QuantizedBaseError:
    """The error for a region whose gradient is wrong, with the full measured errors."""
    function = region_function(gm, region)
    dtype, device = activation_dtype(gm, region), region_device(gm, region)
    weight, bias = dequantize_region(function, region, dtype, device)
    generator = torch.Generator().manual_seed(1)
    x = probe_input(region, torch.randn(8, region.in_features, generator=generator)).to(device, dtype).requires_grad_(True)
    y = function(x)
    g = torch.randn(y.shape, generator=generator).to(device, dtype)
    grad = torch.autograd.grad(y, x, g)[0] if y.requires_grad else torch.zeros_like(x)
    with torch.no_grad():
        dense = x @ weight.t() + bias
        grad_error = float((grad - g @ weight).norm() / (g @ weight).norm())
        out_error = float((y - dense).norm() / dense.norm())
    scheme = region_scheme(gm, region)
    why = "it quantizes the activation inside the layer (an integer value is computed from x)" \
        if region.quantizes_activation else "its backward does not match its forward"
    return QuantizedBaseError(
        f"{region.path} ({scheme}): gradients through this quantized base are wrong, {why}. "
        f"Measured against the same layer with its weights dequantized, on random inputs: the gradient "
        f"reaching the layer's input is off by {grad_error:.1%} (relative){' (' + detail + ')' if detail else ''}, "
        f"and its output by {out_error:.2%}. Adapters before this layer would learn from that gradient. "
        "Train over a weight-only scheme instead (lfx.quantize_base(model, 'int8' | 'nf4' | 'int4'), or "
        "torchao's Int8WeightOnlyConfig / IntxWeightOnlyConfig / to_nf4), and apply dynamic activation "
        "quantization after folding."
    )


def _backward_weight(gm: fx.GraphModule, region: Region, function, has_backward: bool):
    """W(weights) for the backward ("dense" or "probe"), or None to recompute (module docstring)."""
    dtype, device = activation_dtype(gm, region), region_device(gm, region)
    probe = lambda ws: dequantize_region(lambda v: function(v, *ws), region, dtype, device)[0]  # noqa: E731
    dequantizer = weight_dequantizer(gm, region)
    if dequantizer is not None:
        weights = weight_values(gm, region)
        with torch.no_grad():
            expected, found = probe(weights), dequantizer(weights)
        if isinstance(found, torch.Tensor) and found.shape == expected.shape and \
                float((found.to(dtype) - expected).abs().max()) <= 1e-6 * float(expected.abs().max().clamp_min(1e-30)):
            return dequantizer
    return None if has_backward else probe


def _wrap(gm: fx.GraphModule, region: Region, has_backward: bool) -> None:
    nodes = {n.name: n for n in gm.graph.nodes}
    key = f"{region.path}#{uuid.uuid4().hex[:12]}"
    function = region_function(gm, region, weights_as_inputs=True)
    _WRAPPED[key] = (function, region, _backward_weight(gm, region, function, has_backward))
    output = nodes[region.output]
    weights = [nodes[name] for name in region.weight_inputs]
    with gm.graph.inserting_before(output):
        call = gm.graph.call_function(torch.ops.lowrank_fx.quantized_linear.default,
                                      (nodes[region.activation], weights, key, region.out_features))
    call.meta.update({k: v for k, v in output.meta.items() if k in ("val", "nn_module_stack", "stack_trace", "source_fn_stack")})
    output.replace_all_uses_with(call)
    for name in reversed(region.nodes):
        node = nodes[name]
        if not node.users:
            gm.graph.erase_node(node)


def prepare_quantized(gm: fx.GraphModule) -> list[str]:
    """Check every quantized region, refuse wrong gradients, make each one a custom op (its
    backward: module docstring). Returns the wrapped layers' paths."""
    without_backward = []
    regions = find_regions(gm)
    for region in regions:
        status, error, detail = gradient_check(gm, region)
        if status == "wrong" or region.quantizes_activation:
            raise _refusal(gm, region, error, detail)
        if status == "no backward":
            without_backward.append(region.path)
    for region in regions:
        _wrap(gm, region, region.path not in without_backward)
    if regions:
        gm.graph.lint()
        gm.recompile()
    return [region.path for region in regions]
