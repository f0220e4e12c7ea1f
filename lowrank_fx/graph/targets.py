"""Finding the linear-like nodes of a graph and naming them.

A linear-like node multiplies an activation x (..., in) by a 2-D weight parameter:

    aten.linear(x, W, b?)          W (out, in)    nn.Linear, F.linear, MHA in_proj / out_proj
    aten.addmm(b, x, W)            W (in, out)    Hugging Face Conv1D (GPT-2)
    aten.mm(x, W), aten.matmul(x, W)
                                   W (in, out), or (out, in) when reached through .t()

The weight operand may pass through transposes (which flip the layout) and dtype casts on
its way from the `get_attr` node. A target is one weight: every call site that multiplies
by it shares one adapter. Its name is the path of the module that calls it (so GPT-2's
tied head is `lm_head`, not `transformer.wte`), else the weight's name without a trailing
`.weight` / `_weight`.
"""

from __future__ import annotations

import dataclasses
import operator

import torch
import torch.nn.functional as F
from torch import fx

aten = torch.ops.aten

# op -> (index of the activation, index of the weight, layout of an untransposed weight).
# aten ops come from torch.export, torch-level functions from symbolic_trace.
LINEAR_OPS = {
    aten.linear.default: (0, 1, "out_in"),
    aten.addmm.default: (1, 2, "in_out"),
    aten.mm.default: (0, 1, "in_out"),
    aten.matmul.default: (0, 1, "in_out"),
    F.linear: (0, 1, "out_in"),
    torch.addmm: (1, 2, "in_out"),
    torch.mm: (0, 1, "in_out"),
    torch.matmul: (0, 1, "in_out"),
    operator.matmul: (0, 1, "in_out"),
}
# Ops that may stand between a weight's get_attr and its use: transposes flip the layout,
# casts keep it. Method names cover `W.t()` and friends in symbolically traced graphs, and
# attribute names `W.T` / `W.mT` (export: aten.numpy_T / aten.mT; symbolic_trace: getattr).
_FLIPS = {aten.t.default, aten.transpose.int, aten.permute.default, aten.numpy_T.default, aten.mT.default,
          torch.t, torch.transpose, "t", "transpose"}
_FLIP_ATTRIBUTES = ("T", "mT")
_CASTS = {aten._to_copy.default, aten.to.dtype, aten.alias.default, aten.detach.default,
          aten.clone.default, aten.contiguous.default, "to", "float", "contiguous", "detach"}


@dataclasses.dataclass
class Target:
    """One adaptable weight W and the nodes that multiply by it.

    Adapters are defined for W in (out, in) layout; `layout == "in_out"` records that the
    graph stores the weight transposed (Conv1D), which folding must respect.
    """

    name: str
    weight: str  # get_attr target, the weight's name inside the GraphModule
    out_features: int
    in_features: int
    op: str  # short op name of the first call site: linear, addmm, mm, matmul
    layout: str  # "out_in" or "in_out"
    sites: list[str]  # names of the call-site nodes
    activations: list[int]  # per site: the arg index of x
    dtype: torch.dtype

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)


def weight_source(node) -> tuple[fx.Node, bool] | None:
    """Follow a weight operand back to its get_attr; return (get_attr node, flipped)."""
    flipped = False
    while isinstance(node, fx.Node) and node.op in ("call_function", "call_method"):
        if node.target in _FLIPS or (node.target is getattr and node.args[1] in _FLIP_ATTRIBUTES):
            if node.target is aten.permute.default and list(node.args[1]) not in ([1, 0], [-1, -2]):
                return None
            flipped = not flipped
        elif node.target not in _CASTS:
            return None
        node = node.args[0]
    if isinstance(node, fx.Node) and node.op == "get_attr":
        return node, flipped
    return None


def _is_parameter(gm: fx.GraphModule, name: str) -> bool:
    try:
        return isinstance(gm.get_parameter(name), torch.nn.Parameter)
    except AttributeError:
        return False


def _calling_module(node: fx.Node) -> str | None:
    """Path of the innermost module the node was traced in, when export recorded it."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path = list(stack.values())[-1][0]
    return path or None


def _default_name(weight: str) -> str:
    for suffix in (".weight", "_weight"):
        if weight.endswith(suffix) and len(weight) > len(suffix):
            return weight[: -len(suffix)]
    return weight


def _target_name(node: fx.Node, weight: str, aliases: dict[str, list[str]]) -> str:
    module = _calling_module(node)
    if module is not None:
        for alias in aliases.get(weight, [weight]):
            if alias.rsplit(".", 1)[0] == module and alias != module:
                return _default_name(alias)
    return _default_name(weight)


def find_targets(gm: fx.GraphModule, aliases: dict[str, list[str]] | None = None) -> dict[str, Target]:
    """Every linear-like target of `gm`'s top-level graph, by target name, in graph order."""
    aliases = aliases or {}
    by_weight: dict[str, Target] = {}
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in LINEAR_OPS:
            continue
        x_index, w_index, base_layout = LINEAR_OPS[node.target]
        if len(node.args) <= w_index:
            continue
        source = weight_source(node.args[w_index])
        if source is None or not _is_parameter(gm, source[0].target):
            continue
        attr, flipped = source
        weight = gm.get_parameter(attr.target)
        if weight.dim() != 2:
            continue
        layout = base_layout if not flipped else ("in_out" if base_layout == "out_in" else "out_in")
        out_f, in_f = weight.shape if layout == "out_in" else weight.shape[::-1]
        target = by_weight.get(attr.target)
        if target is None:
            by_weight[attr.target] = Target(
                name=_target_name(node, attr.target, aliases),
                weight=attr.target,
                out_features=int(out_f),
                in_features=int(in_f),
                op=getattr(node.target, "__name__", str(node.target)).split(".")[0],
                layout=layout,
                sites=[node.name],
                activations=[x_index],
                dtype=weight.dtype,
            )
        elif target.layout != layout:
            # The same weight used in both orientations is not one linear map; skip the site.
            continue
        else:
            target.sites.append(node.name)
            target.activations.append(x_index)
    return {t.name: t for t in by_weight.values()}


def weight_uses(gm: fx.GraphModule) -> dict[str, list[str]]:
    """For every parameter read by the graph: the ops that consume it (for error messages)."""
    uses: dict[str, list[str]] = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr" and _is_parameter(gm, node.target):
            ops = uses.setdefault(node.target, [])
            for user in node.users:
                ops.append(str(user.target) if user.op == "call_function" else user.op)
    return uses
