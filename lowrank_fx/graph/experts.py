"""Mixture-of-experts weights stored as one 3-D parameter, and the graph sites that apply them.

A stack W holds E experts' matrices, (E, out, in) (Qwen3-MoE, Mixtral, OLMoE, DeepSeek-V3) or
transposed, (E, in, out) (gpt-oss; layout "in_out"). Every routed (token, expert) pair s applies
expert e_s to its activation x_s (in,). transformers 5 captures as one of two sites:

    batched   aten.bmm(W[ids], x.unsqueeze(-1))       (S, out, 1)    ids (S,): each pair's expert
              aten.bmm(x.unsqueeze(1), W[ids])        (S, 1, out)    layout "in_out"
    grouped   grouped_mm(x, Wᵀ, offs)                 (S, out)       rows sorted by expert; offs (E,):
              grouped_mm(x, W, offs)                  (S, out)       cumulative rows per expert ("in_out")

(grouped_mm: aten._grouped_mm, transformers' own fallback op for other dtypes, or the op that
passes/grouped_kernel.py puts in the fallback's place after capture). The routing
(ids or offs) is a node of the graph, so a unit reads it per call: it stays data-dependent.
`ExpertsKind` is the op kind of such a target; its matrix view is (E, out, in).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import fx

from .fx_args import target_name

aten = torch.ops.aten

_CASTS = {aten._to_copy.default, aten.to.dtype, aten.alias.default, aten.detach.default, aten.clone.default,
          aten.contiguous.default}
GROUPED_OPS = ("aten._grouped_mm.default", "transformers.grouped_mm_fallback.default", "lowrank_fx.grouped_mm.default")


@dataclasses.dataclass(frozen=True)
class ExpertsKind:
    """A stack of `experts` matrices applied per routed pair; `route` is "ids" (batched sites:
    each pair's expert) or "offsets" (grouped sites: cumulative rows per expert, rows sorted)."""

    experts: int
    route: str

    name = "experts"

    def to_matrix(self, weight: torch.Tensor, layout: str) -> torch.Tensor:
        return weight if layout == "out_in" else weight.transpose(-2, -1)

    def to_weight(self, matrix: torch.Tensor, layout: str, shape) -> torch.Tensor:
        return matrix if layout == "out_in" else matrix.transpose(-2, -1)

    def apply(self, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        raise TypeError("an expert stack's update depends on the routing; its unit applies it "
                        "(methods/lora_experts.py)")


@dataclasses.dataclass(frozen=True)
class _ExpertsSite:
    """One call site of a stack: its weight's get_attr, layout, the activation's arg index, routing node."""

    weight: fx.Node
    layout: str
    x_index: int
    route: fx.Node
    kind: str  # "ids" or "offsets"


def _uncast(node):
    while isinstance(node, fx.Node) and node.op == "call_function" and node.target in _CASTS:
        node = node.args[0]
    return node


def _stack(node, gm: fx.GraphModule) -> fx.Node | None:
    """The get_attr of a 3-D parameter that `node` is (through casts), else None."""
    node = _uncast(node)
    if not (isinstance(node, fx.Node) and node.op == "get_attr"):
        return None
    try:
        tensor = gm.get_parameter(target_name(node))
    except AttributeError:
        return None
    return node if tensor.dim() == 3 else None


def _is_last_two(dims) -> bool:
    return sorted(d % 3 for d in dims) == [1, 2]


def _indexed_stack(node, gm: fx.GraphModule) -> tuple[fx.Node, fx.Node] | None:
    """(stack get_attr, ids node) when `node` is W[ids] (possibly cast), else None."""
    node = _uncast(node)
    if not (isinstance(node, fx.Node) and node.op == "call_function" and node.target is aten.index.Tensor):
        return None
    indices = node.args[1]
    if not isinstance(indices, (list, tuple)) or len(indices) != 1 or not isinstance(indices[0], fx.Node):
        return None
    stack = _stack(node.args[0], gm)
    return (stack, indices[0]) if stack is not None else None


def experts_site(node: fx.Node, gm: fx.GraphModule) -> _ExpertsSite | None:
    """The expert-stack site `node` is, or None (see the module docstring for the patterns)."""
    if node.op != "call_function":
        return None
    if node.target is aten.bmm.default:
        first, second = node.args[:2]
        if (found := _indexed_stack(first, gm)) is not None:
            return _ExpertsSite(found[0], "out_in", 1, found[1], "ids")
        if (found := _indexed_stack(second, gm)) is not None:
            return _ExpertsSite(found[0], "in_out", 0, found[1], "ids")
        return None
    if str(node.target) in GROUPED_OPS:
        operand = node.args[1]
        offsets = node.args[2] if len(node.args) > 2 else node.kwargs.get("offs")
        layout = "in_out"
        plain = _uncast(operand)
        if isinstance(plain, fx.Node) and plain.op == "call_function" and plain.target is aten.transpose.int \
                and _is_last_two(plain.args[1:3]):
            operand, layout = plain.args[0], "out_in"
        stack = _stack(operand, gm)
        if stack is None or not isinstance(offsets, fx.Node):
            return None
        return _ExpertsSite(stack, layout, 0, offsets, "offsets")
    return None


def stack_operand(node: fx.Node):
    """The argument of an expert-stack site that leads back to the stack (W[ids], Wᵀ or W), or None."""
    if node.target is aten.bmm.default:
        return next((arg for arg in node.args[:2] if isinstance(_uncast(arg), fx.Node)
                     and _uncast(arg).target is aten.index.Tensor), None)
    if str(node.target) in GROUPED_OPS:
        return node.args[1]
    return None


def grouped_sites(gm: fx.GraphModule) -> list[str]:
    """Names of the grouped-matmul nodes of `gm` (ONNX has no such op)."""
    return [n.name for n in gm.graph.nodes if n.op == "call_function" and str(n.target) in GROUPED_OPS]
