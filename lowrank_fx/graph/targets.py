"""Finding the nodes that are linear in a weight parameter, and naming them.

A target is one weight parameter W and every node that applies it to an activation:

    aten.linear(x, W, b?)          W (out, in)    nn.Linear, F.linear, MHA in_proj / out_proj
    aten.addmm(b, x, W)            W (in, out)    Hugging Face Conv1D (GPT-2)
    aten.mm(x, W), aten.matmul(x, W)
                                   W (in, out), or (out, in) when reached through .t()
    aten.conv1d/2d/3d(x, W, b?, stride, padding, dilation, groups)      W (out, in/g, k...)
    aten.embedding(W, ids, padding_idx)                                 W (num, dim)

The weight operand may pass through transposes (which flip the layout), dtype casts, and
a row selection (`W.chunk(3)[i]`, `W.split(...)[i]`, `W[a:b]`: MultiheadAttention's packed
in_proj called on separate query, key and value); such a site uses rows a:b of the update.
Every call site of a weight shares one adapter. A target's name is the path of the module
that calls it (so GPT-2's tied head is `lm_head`, not `transformer.wte`), else the weight's
name without a trailing `.weight` / `_weight`. `graph/op_kinds.py` maps each weight to the
matrix (out, in) that methods adapt.

A 3-D stack of mixture-of-experts weights (E, out, in) or (E, in, out) is a target at the sites
that apply it per routed pair, transformers' batched bmm or grouped matmul (graph/experts.py):
its kind is an `ExpertsKind`, and `routes` names each site's routing node (experts or offsets).

A linear layer with a quantized weight is found as a region of nodes (graph/quantized.py):
its target keeps the module's name, its sites are the region's output nodes, `inputs` names
each site's activation, and its kind is a `QuantizedLinearKind`.
"""

from __future__ import annotations

import dataclasses
import operator
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import fx

from .experts import ExpertsKind, experts_site, stack_operand
from .fx_args import arg_node, target_name
from .op_kinds import LINEAR, ConvKind, EmbeddingKind, OpKind, QuantizedLinearKind
from .quantized import find_regions, region_scheme

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
    """One adaptable weight W and the nodes that apply it.

    Methods adapt W's matrix view (out_features, in_features) (graph/op_kinds.py);
    `layout == "in_out"` records that the graph stores a linear weight transposed (Conv1D),
    which folding must respect. `rows[i]` is the (start, stop) of W's rows that site i uses,
    or None for all of them.
    """

    name: str
    weight: str  # get_attr target, the weight's name inside the GraphModule
    out_features: int
    in_features: int
    op: str  # short op name of the first call site: linear, addmm, mm, matmul, conv2d, embedding, ...
    layout: str  # "out_in" or "in_out"
    sites: list[str]  # names of the call-site nodes
    activations: list[int]  # per site: the arg index of x
    dtype: torch.dtype
    kind: OpKind = LINEAR
    weight_shape: tuple[int, ...] = ()
    rows: list[tuple[int, int] | None] = dataclasses.field(default_factory=list)
    bias: str | None = None  # the bias parameter every site adds, if they all add the same one
    module_type: str = ""  # qualified class name of the module whose forward applies W ("" if unknown)
    inputs: list[str] = dataclasses.field(default_factory=list)  # quantized: per site, the activation node
    routes: list[str] = dataclasses.field(default_factory=list)  # expert stacks: per site, the routing node

    @property
    def quantized(self) -> bool:
        return isinstance(self.kind, QuantizedLinearKind)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)


def _leading_size(node, gm: fx.GraphModule) -> int | None:
    """Size of dim 0 of a tensor that is a parameter, or a cast of one."""
    while isinstance(node, fx.Node) and node.op == "call_function" and node.target in _CASTS:
        node = node.args[0]
    if isinstance(node, fx.Node) and node.op == "get_attr" and _is_parameter(gm, target_name(node)):
        return int(gm.get_parameter(target_name(node)).shape[0])
    return None


def _row_selection(node: fx.Node, gm: fx.GraphModule) -> tuple[fx.Node, tuple[int, int]] | None:
    """(the sliced parameter, (start, stop)) if `node` selects rows (dim 0) of a parameter."""
    if node.target is operator.getitem:
        parent, index = node.args
        if not isinstance(parent, fx.Node) or parent.op != "call_function" or not isinstance(index, int):
            return None
        rows = _leading_size(parent.args[0], gm) if parent.args else None
        if rows is None:
            return None
        dim = parent.args[2] if len(parent.args) > 2 else parent.kwargs.get("dim", 0)
        count = parent.args[1] if len(parent.args) > 1 else None
        if parent.target in (aten.chunk.default, aten.split.Tensor) and isinstance(count, int):
            size = -(-rows // count) if parent.target is aten.chunk.default else count
            sizes = [min(size, rows - start) for start in range(0, rows, size)]
        elif parent.target is aten.split_with_sizes.default and isinstance(count, (list, tuple)):
            sizes = [n if isinstance(n, int) else -1 for n in count]
        else:
            return None
        if dim != 0 or not all(n >= 0 for n in sizes) or index >= len(sizes):
            return None
        start = sum(sizes[:index])
        return arg_node(parent), (start, start + sizes[index])
    if node.target is aten.slice.Tensor:
        tensor, dim, begin, end, step = (list(node.args) + [0, None, None, 1][len(node.args) - 1:])[:5]
        rows = _leading_size(tensor, gm)
        if (rows is None or not isinstance(tensor, fx.Node) or dim != 0 or step != 1
                or not all(isinstance(v, (int, type(None))) for v in (begin, end))):
            return None
        first, last, _ = slice(begin, end).indices(rows)
        return tensor, (first, last)
    return None


def weight_source(node, gm: fx.GraphModule | None = None) -> tuple[fx.Node, bool, tuple[int, int] | None] | None:
    """Follow a weight operand back to its get_attr; return (get_attr node, flipped, row range).

    With `gm`, a row selection of the stored weight (before any transpose) is followed too.
    """
    flipped = False
    selected = None
    while isinstance(node, fx.Node) and node.op in ("call_function", "call_method"):
        if node.target in _FLIPS or (node.target is getattr and node.args[1] in _FLIP_ATTRIBUTES):
            if node.target is aten.permute.default and list(cast(list, node.args[1])) not in ([1, 0], [-1, -2]):
                return None
            flipped = not flipped
            node = node.args[0]
        elif node.target in _CASTS:
            node = node.args[0]
        elif gm is not None and not flipped and (found := _row_selection(node, gm)) is not None:
            node, (start, stop) = found
            selected = (start, stop) if selected is None else (start + selected[0], start + selected[1])
        else:
            return None
    if isinstance(node, fx.Node) and node.op == "get_attr":
        return node, flipped, selected
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


def _calling_type(node: fx.Node) -> str:
    """Qualified class name of the innermost module the node was traced in, or ""."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    kind = list(stack.values())[-1][1]
    return kind if isinstance(kind, str) else f"{kind.__module__}.{kind.__qualname__}"


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


_CONV_OPS = {getattr(aten, f"conv{d}d").default: d for d in (1, 2, 3)}
_CONV_OPS.update({getattr(aten, f"conv{d}d").padding: d for d in (1, 2, 3)})


def _conv_kind(node: fx.Node, dims: int, kernel: tuple[int, ...]) -> ConvKind:
    names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
    bound: dict[str, Any] = dict(zip(names, node.args), **node.kwargs)
    def expand(v, default):
        return tuple(v) * (dims if len(v) == 1 else 1) if isinstance(v, (list, tuple)) else (
            (default,) * dims if v is None else (int(v),) * dims)
    padding = bound.get("padding", 0)
    return ConvKind(dims=dims, kernel=kernel, stride=expand(bound.get("stride", 1), 1),
                    padding=padding if isinstance(padding, str) else expand(padding, 0),
                    dilation=expand(bound.get("dilation", 1), 1), groups=int(bound.get("groups", 1)))


def _site(node: fx.Node, gm: fx.GraphModule | None):
    """(activation index, weight operand, base layout, kind, bias operand) of a call site, or None."""
    if node.op != "call_function":
        return None
    if node.target in LINEAR_OPS:
        x_index, w_index, layout = LINEAR_OPS[node.target]
        if len(node.args) <= w_index:
            return None
        b_index = {aten.linear.default: 2, F.linear: 2, aten.addmm.default: 0, torch.addmm: 0}.get(node.target)
        bias = node.args[b_index] if b_index is not None and len(node.args) > b_index else node.kwargs.get("bias")
        return x_index, node.args[w_index], layout, None, bias
    if node.target in _CONV_OPS:
        bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        return 0, node.args[1], "out_in", _CONV_OPS[node.target], bias
    if node.target is aten.embedding.default:
        return 1, node.args[0], "in_out", "embedding", None
    return None


def weight_operand(node: fx.Node) -> fx.Node:
    """The weight argument of a call site (the node that leads back to the weight's get_attr)."""
    site = _site(node, None)
    return site[1] if site is not None else stack_operand(node)


def _kind(node: fx.Node, family, weight: torch.Tensor) -> OpKind | None:
    if family is None:
        return LINEAR if weight.dim() == 2 else None
    if family == "embedding":
        padding = node.args[2] if len(node.args) > 2 else node.kwargs.get("padding_idx", -1)
        if not isinstance(padding, (int, type(None))) or weight.dim() != 2:
            return None
        return EmbeddingKind(None if padding is None or padding < 0 else padding)
    if weight.dim() != family + 2:
        return None
    return _conv_kind(node, family, tuple(int(k) for k in weight.shape[2:]))


def _bias_name(bias) -> str | None:
    source = weight_source(bias) if isinstance(bias, fx.Node) else None
    return target_name(source[0]) if source is not None and not source[1] else None


def _add_experts_site(by_weight: dict, node: fx.Node, site, gm: fx.GraphModule, aliases) -> None:
    """Record a call site of a 3-D expert stack (graph/experts.py) on its weight's target."""
    weight = gm.get_parameter(site.weight.target)
    kind = ExpertsKind(int(weight.shape[0]), site.kind)
    _experts, out_f, in_f = kind.to_matrix(weight, site.layout).shape
    key = (site.weight.target, kind.name)
    target = by_weight.get(key)
    if target is None:
        by_weight[key] = Target(
            name=_target_name(node, site.weight.target, aliases), weight=site.weight.target, out_features=int(out_f),
            in_features=int(in_f), op=str(node.target).split(".")[-2], layout=site.layout, sites=[node.name],
            activations=[site.x_index], dtype=weight.dtype, kind=kind, weight_shape=tuple(weight.shape), rows=[None],
            module_type=_calling_type(node), routes=[site.route.name])
    elif target.layout == site.layout and target.kind == kind:
        target.sites.append(node.name)
        target.activations.append(site.x_index)
        target.rows.append(None)
        target.routes.append(site.route.name)


def find_targets(gm: fx.GraphModule, aliases: dict[str, list[str]] | None = None) -> dict[str, Target]:
    """Every target of `gm`'s top-level graph (ops linear in a weight parameter), by name, in graph order."""
    aliases = aliases or {}
    by_weight: dict[tuple[str, str], Target] = {}
    regions = find_regions(gm)
    inside = {name for r in regions for name in r.nodes}
    for node in gm.graph.nodes:
        if node.name in inside:
            continue  # a quantized layer's own ops: the layer is the target (below)
        stacked = experts_site(node, gm)
        if stacked is not None:
            _add_experts_site(by_weight, node, stacked, gm, aliases)
            continue
        site = _site(node, gm)
        if site is None:
            continue
        x_index, operand, base_layout, family, bias = site
        source = weight_source(operand, gm)
        if source is None or not _is_parameter(gm, target_name(source[0])):
            continue
        attr, flipped, rows = source
        weight_name = target_name(attr)
        weight = gm.get_parameter(weight_name)
        kind = _kind(node, family, weight)
        if kind is None or (family is not None and flipped):
            continue
        layout = base_layout if not flipped else ("in_out" if base_layout == "out_in" else "out_in")
        if rows is not None and layout != "out_in":
            continue  # rows of a transposed weight are its inputs, not its outputs
        matrix = kind.to_matrix(weight, layout)
        out_f, in_f = matrix.shape
        bias_name = _bias_name(bias)
        key = (weight_name, kind.name)  # a tied weight read by an embedding and a linear is two targets
        target = by_weight.get(key)
        if target is None:
            by_weight[key] = Target(
                name=_target_name(node, weight_name, aliases),
                weight=weight_name,
                out_features=int(out_f),
                in_features=int(in_f),
                op=getattr(node.target, "__name__", str(node.target)).split(".")[0],
                layout=layout,
                sites=[node.name],
                activations=[x_index],
                dtype=weight.dtype,
                kind=kind,
                weight_shape=tuple(weight.shape),
                rows=[rows],
                bias=bias_name if rows is None else None,
                module_type=_calling_type(node),
            )
        elif target.layout != layout or target.kind != kind:
            # The same weight used in another orientation or op setting is not the same map; skip the site.
            continue
        else:
            target.sites.append(node.name)
            target.activations.append(x_index)
            target.rows.append(rows)
            if bias_name != target.bias or rows is not None:
                target.bias = None
    for region in regions:
        key = (region.quantized[0], "quantized")
        target = by_weight.get(key)
        if target is None:
            by_weight[key] = Target(
                name=region.path, weight=region.quantized[0], out_features=region.out_features,
                in_features=region.in_features, op="linear", layout="out_in", sites=[region.output],
                activations=[0], dtype=region.dtype, kind=QuantizedLinearKind(region_scheme(gm, region)),
                weight_shape=(region.out_features, region.in_features), rows=[None], bias=None,
                module_type=region.module_type, inputs=[region.activation])
        elif (target.in_features, target.out_features) == (region.in_features, region.out_features):
            target.sites.append(region.output)
            target.activations.append(0)
            target.rows.append(None)
            target.inputs.append(region.activation)
    order = {n.name: i for i, n in enumerate(gm.graph.nodes)}
    found = sorted(by_weight.values(), key=lambda t: order[t.sites[0]])
    return {t.name: t for t in found}


def weight_uses(gm: fx.GraphModule) -> dict[str, list[str]]:
    """For every parameter read by the graph: the ops that consume it (for error messages)."""
    uses: dict[str, list[str]] = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr" and _is_parameter(gm, node.target):
            ops = uses.setdefault(node.target, [])
            for user in node.users:
                ops.append(str(user.target) if user.op == "call_function" else user.op)
    return uses
