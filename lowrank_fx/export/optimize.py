"""Graph clean-up after translation whose cost grows linearly with the model: `optimize_graph`.

onnxscript's full optimizer (torch.onnx.export(optimize=True)) runs a pattern rewriter that
walks the whole graph once per match attempt, so its time grows with the square of the node
count (31 s of a 132 s merged export of a 24-layer 0.5B decoder), and its constant folding
materializes every folded weight transpose as a new array while the weights are still
held by the model. Here:

1. weight transposes fold lazily. The exporter writes a linear layer y = x Wᵀ (W (out, in))
   as MatMul(x, Transpose(W)). A Transpose whose input is a constant initializer read by that
   node only (not a graph input: adapter inputs stay overridable) is replaced by a new
   initializer W' = W.permute(perm), (in, out) contiguous, computed when the file is written,
   one weight at a time. MatMul then reads W' with no transpose at run time or load time.
2. onnxscript's constant folding of small values (inputs of at most 8192 elements: shape
   arithmetic, scalar casts), unused nodes removed, constants lifted to initializers, common
   subexpressions merged, then names fixed. The pattern rewrites are left out: ONNX Runtime
   applies its own graph transformers at session start, and the resulting latency is within
   noise of the fully optimized graph (benchmarks/bench_onnx_scale.py --latency).
"""

from __future__ import annotations

import onnx_ir as ir
import onnx_ir.passes.common as common
from onnxscript.optimizer import _constant_folding

from .tensors import torch_view

SMALL = 8192  # elements: onnxscript's default constant-folding input limit


def _transposed(source: ir.TensorProtocol, perm: list[int], name: str) -> ir.LazyTensor:
    """A lazy initializer holding source.permute(perm), contiguous."""
    from torch.onnx._internal.exporter._core import TorchTensor

    shape = ir.Shape([source.shape[axis] for axis in perm])
    return ir.LazyTensor(lambda: TorchTensor(torch_view(source).permute(perm).contiguous(), name=name),
                         dtype=source.dtype, shape=shape, name=name)


def _fold_weight_transposes(graph: ir.Graph) -> int:
    """Replace each Transpose of a sole-use constant initializer by a lazy transposed one."""
    folded = 0
    for node in list(graph):
        if node.op_type != "Transpose" or node.domain != "" or len(node.inputs) != 1:
            continue
        weight = node.inputs[0]
        if (weight is None or weight.const_value is None or not weight.is_initializer()
                or weight.is_graph_input() or weight.is_graph_output() or len(weight.uses()) != 1):
            continue
        perm_attr = node.attributes.get("perm")
        rank = len(weight.const_value.shape)
        perm = list(perm_attr.as_ints()) if perm_attr is not None else list(reversed(range(rank)))
        out = node.outputs[0]
        if out.is_graph_output():
            continue
        name = f"{weight.name}.T" if perm == [1, 0] else f"{weight.name}.perm_{'_'.join(map(str, perm))}"
        value = ir.Value(name=name, shape=ir.Shape([weight.const_value.shape[a] for a in perm]),
                         type=weight.type, const_value=_transposed(weight.const_value, perm, name))
        graph.register_initializer(value)
        out.replace_all_uses_with(value)
        graph.remove(node, safe=True)
        graph.initializers.pop(weight.name)
        folded += 1
    return folded


def optimize_graph(model: ir.Model) -> None:
    """Clean up `model` in place (see the module docstring)."""
    _fold_weight_transposes(model.graph)
    passes = ir.passes.Sequential(
        _constant_folding.FoldConstantsPass(shape_inference=True, input_size_limit=SMALL,
                                            output_size_limit=_constant_folding.DEFAULT_CONSTANT_FOLD_OUTPUT_SIZE_LIMIT,
                                            should_fold=_small_only),
        common.RemoveUnusedNodesPass(),
        common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        common.CommonSubexpressionEliminationPass(),
        common.RemoveUnusedNodesPass(),
        common.OutputFixPass(),
        common.NameFixPass(),
    )
    passes(model)


def _small_only(node: ir.Node) -> bool | None:
    """Never fold a node reading a large constant (onnxscript folds a sole-use Transpose of
    any size, which would copy a weight into memory); else onnxscript's own rule."""
    for value in node.inputs:
        if value is not None and value.const_value is not None and value.const_value.size > SMALL:
            return False
    return None
