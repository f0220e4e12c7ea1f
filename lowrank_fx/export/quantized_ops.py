"""Quantized bases in ONNX: each quantized layer becomes ONNX Runtime's integer matmul.

`integer_base(gm)` rewrites an export copy of a graph: every wrapped quantized linear
(passes/quantized_base.py, found by its marker) becomes

  - `lowrank_fx::matmul_nbits(x, B, scales, zero_points, K, N, bits, block)` for affine forms
    (int8, int4, bitsandbytes int8), exported as `com.microsoft.MatMulNBits`;
  - `lowrank_fx::matmul_bnb4(x, B, absmax, K, N, block, quant_type)` for NF4 / FP4, exported
    as `com.microsoft.MatMulBnb4`;

plus an `Add` of the bias when the layer has one. The integer form (graph/quant_integer.py)
is packed in ONNX Runtime's layouts, so the file holds the uint8 codes and the float scales
as initializers, about the quantized size, and the optimizer cannot fold them to floats (it
has no evaluator for these ops):

  MatMulNBits  B (N, K/block, block·bits/8): code k of a row in byte k·bits/8, low nibble first;
               scales (N·K/block,); zero points uint8 packed like B, one row of blocks per n,
               or float (N·K/block,).
  MatMulBnb4   B (N·K/2,): the row-major codes two per byte, high nibble first; absmax (N·K/block,).

The adapters are untouched: they read the same activation and add to the op's output. The
torch ops compute x Wᵀ from the packed codes, and each rewritten layer is checked against
its region (the oracle) before export.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx

from ..errors import ExportError
from ..graph.fx_args import arg_node, target_name
from ..graph.quant_integer import RUNTIME_NF4, TABLE_DRIFT, IntegerWeight, integer_form
from ..graph.quantized import (
    SWAPPED_LAYERS,
    dequantize_region,
    find_regions,
    module_attr,
    probe_input,
    region_device,
    region_function,
    region_scheme,
)
from ..passes.quantized_base import is_quantized_call
from ..passes.quantized_fold import drop_unread, erase_dead


def _nibbles(codes: torch.Tensor, high_first: bool) -> torch.Tensor:
    """Pairs of 4-bit codes along the last axis, packed into one byte each."""
    first, second = codes[..., 0::2], codes[..., 1::2]
    return (first << 4) | second if high_first else first | (second << 4)


def _unnibble(packed: torch.Tensor, high_first: bool) -> torch.Tensor:
    high, low = packed >> 4, packed & 15
    pair = (high, low) if high_first else (low, high)
    return torch.stack(pair, dim=-1).flatten(-2)


def _pack_nbits(form: IntegerWeight) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(B, scales, zero_points) of an affine form in MatMulNBits' layout."""
    n, k = form.codes.shape
    blocks = form.scales.shape[1]
    midpoint = 2 ** (form.bits - 1)
    codes = torch.full((n, blocks * form.block), midpoint, dtype=torch.uint8)
    codes[:, :k] = form.codes
    codes = codes.reshape(n, blocks, form.block)
    packed = _nibbles(codes, high_first=False) if form.bits == 4 else codes
    zero = form.zero_points
    if zero is not None and not zero.is_floating_point() and form.bits == 4:  # packed like B, a row per n
        zero = torch.cat([zero, torch.full((n, blocks % 2), midpoint, dtype=torch.uint8)], dim=1)
        zero = _nibbles(zero, high_first=False)
    zero = None if zero is None else zero.reshape(-1)
    return packed.contiguous(), form.scales.reshape(-1).contiguous(), zero


@torch.library.custom_op("lowrank_fx::matmul_nbits", mutates_args=())
def _matmul_nbits(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor | None,
                 k: int, n: int, bits: int, block: int) -> torch.Tensor:
    """x Wᵀ with W (n, k) decoded from MatMulNBits' packed codes."""
    codes = (_unnibble(packed, high_first=False) if bits == 4 else packed).reshape(n, -1).float()
    blocks = codes.shape[1] // block
    if zero_points is None:
        zero = torch.full((n, blocks), float(2 ** (bits - 1)))
    elif zero_points.is_floating_point():
        zero = zero_points.reshape(n, blocks).float()
    else:
        zero = (_unnibble(zero_points.reshape(n, -1), high_first=False)[:, :blocks] if bits == 4
                else zero_points.reshape(n, blocks)).float()
    expand = lambda t: t.repeat_interleave(block, dim=1)  # noqa: E731
    weight = ((codes - expand(zero)) * expand(scales.reshape(n, blocks).float()))[:, :k]
    return torch.nn.functional.linear(x, weight.to(x.dtype))


@_matmul_nbits.register_fake
def _(x, packed, scales, zero_points, k, n, bits, block):
    return x.new_empty((*x.shape[:-1], n))


@torch.library.custom_op("lowrank_fx::matmul_bnb4", mutates_args=())
def _matmul_bnb4(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor,
                k: int, n: int, block: int, quant_type: int) -> torch.Tensor:
    """x Wᵀ with W (n, k) decoded from MatMulBnb4's packed codes, with ONNX Runtime's NF4 values
    (quant_type 1, the only one exported)."""
    codes = _unnibble(packed, high_first=True)[: n * k].long()
    weight = (RUNTIME_NF4.to(absmax.device)[codes].reshape(-1, block) * absmax.float()[:, None]).reshape(n, k)
    return torch.nn.functional.linear(x, weight.to(x.dtype))


@_matmul_bnb4.register_fake
def _(x, packed, absmax, k, n, block, quant_type):
    return x.new_empty((*x.shape[:-1], n))


def _register_schemas() -> None:
    """ONNX schemas for the two contrib ops, so that onnxscript can emit them."""
    import onnx
    from onnx.defs import OpSchema

    param, attr = OpSchema.FormalParameter, OpSchema.Attribute
    optional = OpSchema.FormalParameterOption.Optional
    floats = ["tensor(float)", "tensor(float16)"]
    ints = OpSchema.AttrType.INT
    if not onnx.defs.has("MatMulNBits", "com.microsoft"):
        onnx.defs.register_schema(OpSchema(
            "MatMulNBits", "com.microsoft", 1,
            inputs=[param("A", "T1"), param("B", "T2"), param("scales", "T1"),
                    param("zero_points", "T3", param_option=optional)],
            outputs=[param("Y", "T1")],
            type_constraints=[("T1", floats, ""), ("T2", ["tensor(uint8)"], ""),
                              ("T3", ["tensor(uint8)", *floats], "")],
            attributes=[attr("K", ints, ""), attr("N", ints, ""), attr("bits", ints, ""),
                        attr("block_size", ints, "")]))
    if not onnx.defs.has("MatMulBnb4", "com.microsoft"):
        onnx.defs.register_schema(OpSchema(
            "MatMulBnb4", "com.microsoft", 1,
            inputs=[param("A", "T1"), param("B", "T2"), param("absmax", "T1")],
            outputs=[param("Y", "T1")],
            type_constraints=[("T1", floats, ""), ("T2", ["tensor(uint8)"], "")],
            attributes=[attr("K", ints, ""), attr("N", ints, ""), attr("block_size", ints, ""),
                        attr("quant_type", ints, "")]))


def translations() -> dict:
    """{torch op: onnxscript function} for torch.onnx.export's custom_translation_table."""
    import onnxscript

    _register_schemas()
    microsoft = onnxscript.values.Opset("com.microsoft", 1)

    def nbits(x, packed, scales, zero_points, k: int, n: int, bits: int, block: int):
        inputs = (x, packed, scales) if zero_points is None else (x, packed, scales, zero_points)
        return microsoft.MatMulNBits(*inputs, K=k, N=n, bits=bits, block_size=block)

    def bnb4(x, packed, absmax, k: int, n: int, block: int, quant_type: int):
        return microsoft.MatMulBnb4(x, packed, absmax, K=k, N=n, block_size=block, quant_type=quant_type)

    return {torch.ops.lowrank_fx.matmul_nbits.default: nbits, torch.ops.lowrank_fx.matmul_bnb4.default: bnb4}


def _buffer(gm: fx.GraphModule, name: str, tensor: torch.Tensor | None) -> fx.Node | None:
    if tensor is None:
        return None
    gm.register_buffer(name, tensor)
    return gm.graph.get_attr(name)


def _replacement(gm: fx.GraphModule, stem: str, x: fx.Node, form: IntegerWeight, dtype) -> fx.Node:
    n, k = form.codes.shape
    if form.form == "codebook":
        packed = _nibbles(form.codes.reshape(-1), high_first=True)
        args = (x, _buffer(gm, f"{stem}_B", packed), _buffer(gm, f"{stem}_absmax", form.scales.to(dtype)),
                k, n, form.block, form.quant_type)
        return gm.graph.call_function(torch.ops.lowrank_fx.matmul_bnb4.default, args)
    packed, scales, zero = _pack_nbits(form)
    zero = zero.to(dtype) if zero is not None and zero.is_floating_point() else zero
    args = (x, _buffer(gm, f"{stem}_B", packed), _buffer(gm, f"{stem}_scales", scales.to(dtype)),
            _buffer(gm, f"{stem}_zero_points", zero), k, n, form.bits, form.block)
    return gm.graph.call_function(torch.ops.lowrank_fx.matmul_nbits.default, args)


def _check(gm: fx.GraphModule, new: fx.Node, function, region) -> None:
    """The rewritten layer against its region, on random rows: relative 1e-4 (the NF4 table drift)."""
    nodes = [new] if new.target is not torch.ops.aten.add.Tensor else [arg_node(new), new]
    probe = probe_input(region, torch.randn(8, region.in_features, generator=torch.Generator().manual_seed(0)))
    probe = probe.to(region.dtype)
    env: dict[fx.Node, Any] = {}
    for node in nodes:
        args = fx.node.map_arg(node.args, lambda a: env[a] if a in env else (
            probe if a.name == region.activation else module_attr(gm, target_name(a))))
        env[node] = node.target(*args)
    with torch.no_grad():
        expected = function(probe)
    error = float((env[new] - expected).norm() / expected.norm().clamp_min(1e-30))
    if error > TABLE_DRIFT:
        raise ExportError(f"{region.path}: its integer matmul differs from the layer by {error:.1e} (relative); "
                          "export with mode='merged'")


def integer_base(gm: fx.GraphModule) -> list[str]:
    """Rewrite every quantized layer of `gm` (an export copy: it gets new buffers and loses the
    quantized ones) as an integer matmul op. Returns the layers' paths."""
    done = []
    for region in find_regions(gm):
        nodes = {node.name: node for node in gm.graph.nodes}
        output = nodes[region.output]
        if not is_quantized_call(output):
            continue
        function = region_function(gm, region)
        dtype = region.dtype
        dense, bias = dequantize_region(function, region, dtype, region_device(gm, region))
        weight = gm.meta.get(SWAPPED_LAYERS, {}).get(region.path) or module_attr(gm, region.quantized[0])
        try:
            form = integer_form(weight, dense.cpu())
        except NotImplementedError as err:
            raise ExportError(
                f"{region.path} ({region_scheme(gm, region)}): this quantized weight has no integer form for "
                f"ONNX Runtime ({err}). Export it with mode='merged' (dense weights), or quantize the base "
                "with a supported scheme (lfx.quantize_base(model, 'int8' | 'int4' | 'nf4'))"
            ) from None
        stem = region.path.replace(".", "_") + "_q"
        with gm.graph.inserting_before(output):
            new = _replacement(gm, stem, nodes[region.activation], form, dtype)
            if bool(bias.any()):
                new = gm.graph.call_function(torch.ops.aten.add.Tensor, (new, _buffer(gm, f"{stem}_bias", bias)))
        _check(gm, new, function, region)
        new.meta.update({key: output.meta[key] for key in ("val", "nn_module_stack") if key in output.meta})
        output.replace_all_uses_with(new)
        erase_dead(gm, [nodes[name] for name in reversed(region.nodes)])
        drop_unread(gm, region.roots, keep=set())
        done.append(region.path)
    if done:
        gm.graph.lint()
        gm.recompile()
    return done
