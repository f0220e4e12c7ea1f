"""Quantized layers at capture: check each base, refuse the ones whose weight or gradient is
wrong, and make every one a layer call that saves no dense weight.

Adapters before a quantized layer learn through that layer's input gradient dL/dx = dL/dy · W.
Left as they are, a region's nodes (graph/quantized.py) would make autograd keep each layer's
dequantized fp32 weight from forward to backward (the input of the matmul), as much memory as
the fp32 model. Every quantized region becomes one call node, `quantized_linear_call(x, weights,
key, out)`, marked `node.meta[QUANTIZED_MARK] = key` (passes find it by the mark, not by its
target). Its forward runs the region's own nodes; it keeps only x and the quantized tensors.
Eager calls run it as an autograd.Function (`_QuantizedLinear`); under torch.compile and
torch.export it is the custom op `lowrank_fx::quantized_linear` (backward:
`lowrank_fx::quantized_linear_backward`), opaque to the compiler, so that no compiler pass can
keep the dense weight, and one graph serves every shape. The op's Autograd kernel is the same
Function, told to run both passes through the ops (`op=True`); eager calls run the ops'
implementations (`_forward`, `_input_grad`) directly, and only the op pays torch.library's
dispatch. The backward is, by what
the layer's format offers:

  - dL/dy · W with W rebuilt by the format's own dequantize (torchao's `dequantize()` on the
    tensor rebuilt from its inner tensors; packed int4 on the CPU, which has none, unpacked in
    the format's own pack order, graph/quant_int4.py; a swapped bitsandbytes layer's
    `dense_weight`): one elementwise pass over the weight. At capture that W is checked against
    the layer on a few random rows (graph/quant_check.py `dequantize_check`, within the
    floating-point bound of a dot product); a mismatch raises `QuantizedBaseError` naming the layer.
  - without a dequantize: the region recomputed and differentiated (`torch.func.vjp`), after a
    gradient check at capture (`gradient_check`: <dL/dx, v> = <dL/dy, y(v) - y(0)> on random
    rows); or, where the kernel has no backward either, dL/dy · W with W probed on the identity
    (y(I) - y(0)): in rows through the layer per step. A black box x -> x Wᵀ gives W only from
    in independent rows; no fewer rows determine it.

Every check at capture costs O(weights) per layer: one call of the layer on a few rows (its own
dequantize included), the format's dequantize, and x W_dᵀ for those rows. Layers of one kind
(same ops, sizes, format and tensor shapes: every layer's q_proj in a decoder) run the same code
path, so the check runs on the first of each kind and its verdict serves the others.

A layer that quantizes its activation (dynamic activation schemes: the activation is rounded to
int8 inside the layer, so autograd sees no path, or a rounded one) is refused with the measured
relative error of its gradient and output against the dense layer. Use a weight-only scheme for
training. Eager and under torch.compile (the ops are opaque to it).

The registry of wrapped regions lives in this process: a graph with a wrapped region runs
wherever this process runs it (deep copies share it), not after pickling to another process.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import torch
from torch import fx

from ..errors import QuantizedBaseError
from ..graph.quant_check import ROWS, dequantize_check, gradient_check, random_rows
from ..graph.quant_int4 import unpack_slow_kernels
from ..graph.quantized import (
    Region,
    activation_dtype,
    dequantize_region,
    find_regions,
    region_device,
    region_function,
    region_scheme,
    run_rows,
    weight_dequantizer,
    weight_values,
)
from ..progress import steps

# key -> (f(x, *weights), region, W(weights) or None)
_WRAPPED: dict[str, tuple[fx.GraphModule, Region, Callable[..., Any] | None]] = {}
QUANTIZED_MARK = "lowrank_fx_quantized"  # node.meta[QUANTIZED_MARK]: the key of a wrapped quantized linear


def _wrapped(key: str) -> tuple[fx.GraphModule, Region, Callable[..., Any] | None]:
    try:
        return _WRAPPED[key]
    except KeyError:
        raise QuantizedBaseError(
            f"quantized layer {key!r} was wrapped in another process; capture the model again in this one "
            "(lfx.rewrite(...)) and load the adapters into it (lfx.load_adapters)"
        ) from None


def _forward(x: torch.Tensor, weights, key: str) -> torch.Tensor:
    """y of a wrapped quantized linear, computed by its own region (autograd off)."""
    with torch.no_grad():
        return _wrapped(key)[0].forward(x, *weights)


def _input_grad(x: torch.Tensor, grad: torch.Tensor, weights, key: str) -> torch.Tensor:
    """dL/dx of a wrapped quantized linear: dL/dy · W with W rebuilt from the weights, or the
    region recomputed and differentiated (module docstring)."""
    function, _, dense_weight = _wrapped(key)
    if dense_weight is None:  # autograd is off inside a custom op; torch.func's own transform is not
        pullback = torch.func.vjp(lambda v: function(v, *weights), x)[1]
        return pullback(grad)[0]
    factors = getattr(dense_weight, "row_scaled", None)
    if factors is not None:  # W = s · q (per-row int8): dL/dy · W = (dL/dy ⊙ sᵀ) · q
        codes, scale = factors(weights)
        return ((grad * scale.reshape(-1).to(grad.dtype)) @ codes.to(grad.dtype)).to(x.dtype)
    return (grad @ dense_weight(weights).to(grad.dtype)).to(x.dtype)


# The ops are defined on a bare `torch.library.Library` (schema, one kernel for every device, a
# fake kernel, an Autograd kernel) rather than by `torch.library.custom_op`, whose wrappers cost
# more per call: measured on the CPU, a forward call with grad off 10 µs against 14 µs, a
# backward call about 15 µs less (28 layers, forward and backward, per step).
_LIBRARY = torch.library.Library("lowrank_fx", "FRAGMENT")
_LIBRARY.define("quantized_linear(Tensor x, Tensor[] weights, str key, SymInt out_features) -> Tensor")
_LIBRARY.define("quantized_linear_backward(Tensor x, Tensor grad, Tensor[] weights, str key) -> Tensor")


def _linear_kernel(x: torch.Tensor, weights: list[torch.Tensor], key: str, out_features: int) -> torch.Tensor:
    """y of a quantized linear, computed by its own region (the op's calls). An op's output may
    not share its inputs' storage: copied only where the region returns a view of one."""
    y = _forward(x, weights, key)
    shared = {t.untyped_storage().data_ptr() for t in (x, *weights)}
    return y.clone() if y.untyped_storage().data_ptr() in shared else y


class _QuantizedLinear(torch.autograd.Function):
    """A wrapped quantized linear's autograd: saves x and the quantized tensors (no dense
    weight) and differentiates by `_input_grad`. `op` says how the two passes run: through the
    custom ops below autograd (`op=True`: the op's own Autograd kernel) or by their
    implementations directly (`op=False`: eager calls)."""

    @staticmethod
    def forward(ctx, x, key, out_features, op, *weights):
        ctx.save_for_backward(x, *weights)
        ctx.key, ctx.op = key, op
        if not op:
            return _forward(x, weights, key)
        with torch._C._AutoDispatchBelowAutograd():
            return torch.ops.lowrank_fx.quantized_linear.default(x, list(weights), key, out_features)

    @staticmethod
    def backward(ctx, grad):
        x, *weights = ctx.saved_tensors
        found = None
        if ctx.needs_input_grad[0]:
            found = torch.ops.lowrank_fx.quantized_linear_backward.default(x, grad.contiguous(), weights, ctx.key) \
                if ctx.op else _input_grad(x, grad, weights, ctx.key)
        return (found, None, None, None) + (None,) * len(weights)


_LIBRARY.impl("quantized_linear", _linear_kernel, "CompositeExplicitAutograd")
_LIBRARY.impl("quantized_linear_backward", _input_grad, "CompositeExplicitAutograd")


def _linear_autograd(x: torch.Tensor, weights: list[torch.Tensor], key: str, out_features: int) -> torch.Tensor:
    """The op at its Autograd key: through `_QuantizedLinear` only where a gradient is taken;
    a compiled graph's runtime calls (grad mode off) go straight below autograd."""
    if torch.is_grad_enabled() and x.requires_grad:
        return _QuantizedLinear.apply(x, key, out_features, True, *weights)
    with torch._C._AutoDispatchBelowAutograd():
        return torch.ops.lowrank_fx.quantized_linear.default(x, weights, key, out_features)


_LIBRARY.impl("quantized_linear", _linear_autograd, "Autograd")


@torch.library.register_fake("lowrank_fx::quantized_linear", lib=_LIBRARY)
def _(x, weights, key, out_features):
    return x.new_empty((*x.shape[:-1], out_features))


@torch.library.register_fake("lowrank_fx::quantized_linear_backward", lib=_LIBRARY)
def _(x, grad, weights, key):
    return torch.empty_like(x)


def quantized_linear_call(x: torch.Tensor, weights: list[torch.Tensor], key: str, out_features: int) -> torch.Tensor:
    """A wrapped quantized linear, as the graph calls it: the custom op under torch.compile and
    torch.export (opaque to them: no dense weight kept, one graph), else `_QuantizedLinear`
    directly, which spares eager calls the op's Python dispatch (0.2-0.4 ms a call)."""
    if torch.compiler.is_compiling():
        return torch.ops.lowrank_fx.quantized_linear.default(x, weights, key, out_features)
    return _QuantizedLinear.apply(x, key, out_features, False, *weights)


def is_quantized_call(node: fx.Node) -> bool:
    """Whether `node` is a wrapped quantized linear (found by its marker, whatever its target)."""
    return node.op == "call_function" and QUANTIZED_MARK in node.meta


def _dense(dequantizer, region: Region, weights: list[torch.Tensor]):
    """W (out, in) by the format's own `dequantizer`, or None when it has none (or not of that shape)."""
    with torch.no_grad():
        dense = dequantizer(weights) if dequantizer is not None else None
    shape = (region.out_features, region.in_features)
    return dense if isinstance(dense, torch.Tensor) and dense.shape == shape else None


def _refusal(gm: fx.GraphModule, region: Region, layer, weights: list[torch.Tensor], detail: str) -> QuantizedBaseError:
    """The error for a region whose gradient is wrong, with the full measured errors (W by the
    format's dequantize, else probed on the identity: once, for the layer refused)."""
    dtype, device = activation_dtype(gm, region), region_device(gm, region)
    weight = _dense(weight_dequantizer(gm, region), region, weights)
    weight = dequantize_region(layer, region, dtype, device)[0] if weight is None else weight.to(dtype)
    x = random_rows(region, 8, 1, dtype, device).requires_grad_(True)
    y = run_rows(layer, region, x)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    grad = torch.autograd.grad(y, x, g)[0] if y.requires_grad else torch.zeros_like(x)
    with torch.no_grad():
        dense = x @ weight.t() + run_rows(layer, region, torch.zeros_like(x[:1]))
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


def _mismatch(gm: fx.GraphModule, region: Region, worst: float, relative: float) -> QuantizedBaseError:
    """The error for a layer whose format's dequantize is not the weight it computes with."""
    return QuantizedBaseError(
        f"{region.path} ({region_scheme(gm, region)}): the format's own dequantize does not give the weight "
        f"this layer computes with. On {2 * ROWS} probe rows x, the layer's output differs from x·Wᵀ + b "
        f"(W by the dequantize) by up to {relative:.2e} of the largest output, {worst:.3g} times the "
        "floating-point rounding bound. The tensor is inconsistent (or lowrank_fx rebuilds it wrongly from its "
        "inner tensors), and the gradient through this layer would be computed with that W. Keep this layer "
        "dense (lfx.quantize_base(model, scheme, exclude=[...]) or leave it out of your own quantization), or "
        "quantize it with another scheme."
    )


def _backward_weight(gm: fx.GraphModule, region: Region, function, weights: list[torch.Tensor], verdict: str | None):
    """(W(weights) for the backward, the verdict): the format's dequantize, checked on this layer
    (a mismatch raises), verdict "dense"; else None to recompute the region ("recompute"), or the
    identity probe where it has no backward ("probe"; the gradient checked first: a wrong one
    raises). A `verdict` already reached on a layer of the same kind is taken without checking."""
    dtype, device = activation_dtype(gm, region), region_device(gm, region)
    layer = lambda v: function(v, *weights)  # noqa: E731
    dequantizer = weight_dequantizer(gm, region)
    if verdict is None:
        dense = _dense(dequantizer, region, weights)
        if dense is not None:
            ok, worst, relative = dequantize_check(layer, region, dense, dtype, device)
            if not ok:
                raise _mismatch(gm, region, worst, relative)
            verdict = "dense"
        else:
            status, _, detail = gradient_check(layer, region, dtype, device)
            if status == "wrong":
                raise _refusal(gm, region, layer, weights, detail)
            verdict = "recompute" if status == "ok" else "probe"
    if verdict == "dense":
        return dequantizer, verdict
    if verdict == "recompute":
        return None, verdict
    return (lambda ws: dequantize_region(lambda v: function(v, *ws), region, dtype, device)[0]), verdict


def _kind(gm: fx.GraphModule, nodes: dict[str, fx.Node], region: Region, weights: list[torch.Tensor]) -> tuple:
    """What a layer's check depends on: its ops, sizes, activation dtype and the type, shape and
    dtype of every tensor it reads (a format's block sizes show in its scales' shapes). The check
    is of the format's code path on such a layer, which another layer's values do not change."""
    return (tuple(str(nodes[name].target) for name in region.nodes), region.in_features, region.out_features,
            str(activation_dtype(gm, region)), region.module_type,
            tuple((type(w).__qualname__, tuple(w.shape), str(w.dtype)) for w in weights))


def _lean(function: fx.GraphModule) -> fx.GraphModule:
    """`function` without the nodes that compute nothing (export's dtype assertions on values
    the capture already fixed, and casts to the dtype a value has: each costs a Python call per
    layer per step), and with torchao's packed int4 CPU kernel replaced by its unpacked weight
    and a dense product (graph/quant_int4.py): the same W, checked at capture, 15-50x faster."""
    for node in list(function.graph.nodes):
        if node.target is torch.ops.aten._assert_tensor_metadata.default and not node.users:
            function.graph.erase_node(node)
        elif node.target is torch.ops.aten.to.dtype and len(node.args) == 2 and not node.kwargs:
            source, value = node.args[0].meta.get("val"), node.meta.get("val")
            if isinstance(source, torch.Tensor) and isinstance(value, torch.Tensor) and source.dtype == node.args[1]:
                node.replace_all_uses_with(node.args[0])
                function.graph.erase_node(node)
    unpack_slow_kernels(function.graph)
    function.recompile()
    return function


def _wrap(gm: fx.GraphModule, region: Region, function: fx.GraphModule, dense_weight) -> None:
    """Replace the region by one `quantized_linear` call running `function` (f(x, *weights))."""
    function = _lean(function)
    nodes = {n.name: n for n in gm.graph.nodes}
    key = f"{region.path}#{uuid.uuid4().hex[:12]}"
    _WRAPPED[key] = (function, region, dense_weight)
    output = nodes[region.output]
    weights = [nodes[name] for name in region.weight_inputs]
    with gm.graph.inserting_before(output):
        call = gm.graph.call_function(quantized_linear_call,
                                      (nodes[region.activation], weights, key, region.out_features))
    kept = ("val", "nn_module_stack", "stack_trace", "source_fn_stack")
    call.meta.update({k: v for k, v in output.meta.items() if k in kept})
    call.meta[QUANTIZED_MARK] = key
    output.replace_all_uses_with(call)
    for name in reversed(region.nodes):
        node = nodes[name]
        if not node.users:
            gm.graph.erase_node(node)


def prepare_quantized(gm: fx.GraphModule) -> list[str]:
    """Check the quantized regions (a wrong one raises before the graph changes), then make
    each one a custom op (its backward: module docstring). Returns the wrapped layers' paths.
    Layers of one kind (`_kind`: the 24 q_proj of a decoder) are checked once, on the first."""
    checked: list[tuple[Region, fx.GraphModule, Callable[..., Any] | None]] = []
    verdicts: dict[tuple, str | None] = {}
    regions = find_regions(gm)
    nodes = {n.name: n for n in gm.graph.nodes}
    for region in steps(regions, "checking quantized layers", len(regions)):
        function = region_function(gm, region, weights_as_inputs=True)
        weights = weight_values(gm, region)
        if region.quantizes_activation:
            raise _refusal(gm, region, lambda v, f=function, w=weights: f(v, *w), weights, "")
        kind = _kind(gm, nodes, region, weights)
        dense_weight, verdicts[kind] = _backward_weight(gm, region, function, weights, verdicts.get(kind))
        checked.append((region, function, dense_weight))
    for region, function, dense_weight in checked:
        _wrap(gm, region, function, dense_weight)
    if checked:
        gm.graph.lint()
        gm.recompile()
    return [region.path for region, _, _ in checked]
