"""Quantized linear layers, found as regions of the graph.

torch.export reads a quantized weight (a torchao tensor subclass) through
`access_subclass_inner_tensor` and the scheme's own ops, and a bitsandbytes layer (swapped
before capture, graph/quant_formats.py) through its dequantize op; no `aten.linear` on a
weight parameter is left to find. lowrank_fx never matches those op names. A quantized linear
is instead the **region** of nodes export recorded (`node.meta["nn_module_stack"]`) under one
call of one `nn.Linear` module (or subclass) with

  - exactly one activation coming in (a tensor computed from the graph's inputs),
  - exactly one value going out (the layer's output),
  - a quantized parameter or buffer (a tensor subclass, or integer packed bytes) among the
    tensors it reads that do not depend on the inputs (its weight side).

Other inputs it may read: the sizes of the activation (reshapes back to (batch, seq, out)),
which a region's function takes from its own input. A region's function (`region_function`)
is a small GraphModule x -> y made of the region's nodes and its weight side, sharing the
graph's tensors. It is what the base computes, so it is the oracle for everything else:

  - the dense weight is y(I) - y(0) transposed (`dequantized`), exact for weight-only schemes;
  - at capture, the format's own dequantize (`weight_dequantizer`) is checked against it on a
    few rows, or, where there is none, whether gradients flow through it (graph/quant_check.py).

A target made of regions keeps its module's name, has a `QuantizedLinearKind` (graph/op_kinds.py),
`Target.inputs` naming each site's activation node, and its output node as the site.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any

import torch
from torch import fx, nn

from .fx_args import target_name
from .quant_formats import (
    BnbLinear4bit,
    BnbLinear8bit,
    is_quantized,
    row_scaled,
    scheme_name,
    stored_bytes,
    torchao_dense,
)

EXAMPLES = "lowrank_fx_examples"  # gm.meta[EXAMPLES]: (args, kwargs) of the capture, detached
SWAPPED_LAYERS = "lowrank_fx_swapped"  # gm.meta[SWAPPED_LAYERS]: {path: BnbLinear4bit | BnbLinear8bit}


class SharedLayers(dict):
    """{path: swapped layer}, kept in gm.meta; copies of the graph share it (no tensor copies)."""

    def __deepcopy__(self, memo):
        return self


@dataclasses.dataclass
class Region:
    key: str  # nn_module_stack key of the call (plus "#i" when one key holds several calls)
    path: str  # the module's path in the model
    module_type: str
    nodes: list[str]  # the region's nodes, in graph order
    activation: str  # the one activation coming in
    output: str  # the one node whose value leaves the region
    weight_inputs: list[str]  # nodes outside the region, not depending on inputs, that it reads
    size_inputs: list[str]  # SymInt nodes outside the region that it reads (activation sizes)
    roots: list[str]  # get_attr targets of its weight side
    quantized: list[str]  # the roots that are quantized, the weight first
    in_features: int
    out_features: int
    dtype: torch.dtype  # the output's dtype
    activation_rank: int
    quantizes_activation: bool  # an integer value computed from the activation inside the region


def _type_of(entry) -> str:
    kind = entry[1]
    return kind if isinstance(kind, str) else f"{kind.__module__}.{kind.__qualname__}"


def _is_linear_type(qualified: str) -> bool:
    module, _, name = qualified.rpartition(".")
    try:
        found = importlib.import_module(module)
        for part in name.split("."):
            found = getattr(found, part)
        return isinstance(found, type) and issubclass(found, nn.Linear)
    except (ImportError, AttributeError, ValueError):
        return name.endswith("Linear")


def module_attr(gm: fx.GraphModule, target: str):
    """The attribute `target` (a dotted path) of `gm`, or None when there is none."""
    owner, _, leaf = target.rpartition(".")
    try:
        module = gm.get_submodule(owner) if owner else gm
    except AttributeError:
        return None
    return getattr(module, leaf, None)


def _val(node):
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def _components(nodes: list[fx.Node]) -> list[list[fx.Node]]:
    """Split one module's nodes into its calls: connected by data edges among themselves."""
    members = set(nodes)
    parent = {n: n for n in nodes}

    def find(n):
        while parent[n] is not n:
            parent[n] = parent[parent[n]]
            n = parent[n]
        return n

    for n in nodes:
        for a in n.all_input_nodes:
            if a in members:
                parent[find(a)] = find(n)
    groups: dict[fx.Node, list[fx.Node]] = {}
    for n in nodes:
        groups.setdefault(find(n), []).append(n)
    return list(groups.values())


def _attach_weight_only(calls: list[list[fx.Node]], on_inputs, position: dict) -> list[list[fx.Node]]:
    """Merge each call made only of weight-side nodes (a check on a scale, say) into the one
    call that reads the same outside node, so that it goes with its layer."""
    pure = [c for c in calls if not any(on_inputs(n) for n in c)]
    kept = [c for c in calls if not any(c is p for p in pure)]
    for part in pure:
        reads = {a for n in part for a in n.all_input_nodes}
        owners = [c for c in kept if reads & {a for n in c for a in n.all_input_nodes}]
        if len(owners) == 1:
            owners[0].extend(part)
        else:
            kept.append(part)
    return [sorted(c, key=position.__getitem__) for c in kept]


def find_regions(gm: fx.GraphModule) -> list[Region]:
    """Every quantized linear region of `gm`'s top-level graph, in graph order."""
    by_key: dict[str, tuple[str, str, list[fx.Node]]] = {}
    for node in gm.graph.nodes:
        stack = node.meta.get("nn_module_stack")
        if node.op != "call_function" or not stack:
            continue
        key, entry = list(stack.items())[-1]
        by_key.setdefault(key, (entry[0], _type_of(entry), []))[2].append(node)
    if not by_key:
        return []
    depends: dict[fx.Node, bool] = {}  # node -> whether it depends on a graph input

    def on_inputs(node: fx.Node) -> bool:
        todo = [node]
        while todo:
            n = todo[-1]
            if n in depends:
                todo.pop()
                continue
            if n.op == "placeholder":
                depends[n] = True
                todo.pop()
                continue
            pending = [a for a in n.all_input_nodes if a not in depends]
            if pending:
                todo.extend(pending)
                continue
            depends[n] = any(depends[a] for a in n.all_input_nodes)
            todo.pop()
        return depends[node]

    position = {n: i for i, n in enumerate(gm.graph.nodes)}
    nodes_by_name = {n.name: n for n in gm.graph.nodes}
    regions = []
    for key, (path, module_type, nodes) in by_key.items():
        if not path or not _is_linear_type(module_type):
            continue
        calls = _attach_weight_only(_components(nodes), on_inputs, position)
        for index, call in enumerate(calls):
            region = _region(gm, f"{key}#{index}" if len(calls) > 1 else key, path, module_type, call, on_inputs)
            if region is not None:
                regions.append(region)
    return sorted(regions, key=lambda r: position[nodes_by_name[r.output]])


def _static(size) -> int | None:
    """`size` as an int when it is one, also a SymInt that the capture fixed (a graph input's
    feature width, which a linear layer pins); None for a size that varies."""
    from torch.fx.experimental.symbolic_shapes import is_concrete_int

    return int(size) if is_concrete_int(size) else None


def _roots(node: fx.Node) -> list[fx.Node]:
    seen, todo, found = set(), [node], []
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "get_attr":
            found.append(n)
        todo.extend(n.all_input_nodes)
    return found


def _region(gm, key, path, module_type, call, on_inputs) -> Region | None:
    members = set(call)
    external = list(dict.fromkeys(a for n in call for a in n.all_input_nodes if a not in members))
    activations, weights, sizes = [], [], []
    for node in external:
        value = _val(node)
        if isinstance(value, torch.SymInt):
            sizes.append(node)
        elif not on_inputs(node):
            weights.append(node)
        elif isinstance(value, torch.Tensor):
            activations.append(node)
        else:
            return None
    outputs = [n for n in call if any(u not in members for u in n.users)]
    if len(activations) != 1 or len(outputs) != 1:
        return None
    x, y = activations[0], outputs[0]
    xv, yv = _val(x), _val(y)
    if not isinstance(xv, torch.Tensor) or not isinstance(yv, torch.Tensor) or xv.dim() < 1 or yv.dim() < 1:
        return None
    roots = list(dict.fromkeys(target_name(r) for w in weights for r in _roots(w)))
    quantized = [r for r in roots if is_quantized(module_attr(gm, r))]
    if not quantized:
        return None
    # the weight: a parameter before buffers (bitsandbytes' absmax), then the largest
    quantized.sort(key=lambda r: (not isinstance(module_attr(gm, r), nn.Parameter), -module_attr(gm, r).numel()))
    in_f, out_f = _static(xv.shape[-1]), _static(yv.shape[-1])
    if in_f is None or out_f is None:
        return None
    from_x = {x}
    integer = False
    for n in call:  # graph order: whatever depends on the activation
        if any(a in from_x for a in n.all_input_nodes):
            from_x.add(n)
            v = _val(n)
            values = v if isinstance(v, (list, tuple)) else [v]
            integer |= any(isinstance(t, torch.Tensor) and not (t.is_floating_point() or t.is_complex())
                           for t in values)
    return Region(key=key, path=path, module_type=module_type, nodes=[n.name for n in call],
                  activation=x.name, output=y.name, weight_inputs=[w.name for w in weights],
                  size_inputs=[s.name for s in sizes], roots=roots, quantized=quantized,
                  in_features=int(in_f), out_features=int(out_f), dtype=yv.dtype,
                  activation_rank=xv.dim(), quantizes_activation=integer)


def region_scheme(gm: fx.GraphModule, region: Region) -> str:
    return scheme_name(module_attr(gm, region.quantized[0]), region.module_type)


def region_bytes(gm: fx.GraphModule, region: Region) -> int:
    """Bytes of every tensor the region's weight side reads (quantized data, scales, bias)."""
    seen, total = set(), 0
    for root in region.roots:
        tensor = module_attr(gm, root)
        if isinstance(tensor, torch.Tensor) and id(tensor) not in seen:
            seen.add(id(tensor))
            total += stored_bytes(tensor)
    return total


def _same_size(a, b) -> bool:
    return isinstance(a, torch.SymInt) and isinstance(b, torch.SymInt) and str(a.node.expr) == str(b.node.expr)


def _copy_weight_side(gm: fx.GraphModule, region: Region, graph: fx.Graph, env: dict) -> None:
    """Copy into `graph` the nodes of `gm` that compute the region's weight inputs."""
    nodes = {n.name: n for n in gm.graph.nodes}
    needed = set()
    todo = [nodes[name] for name in region.weight_inputs]
    while todo:
        n = todo.pop()
        if n not in needed:
            needed.add(n)
            todo.extend(n.all_input_nodes)
    for n in gm.graph.nodes:
        if n in needed:
            env[n] = graph.node_copy(n, lambda a: env[a])


def weight_values(gm: fx.GraphModule, region: Region) -> list[torch.Tensor]:
    """The tensors the region's weight inputs hold now, in `region.weight_inputs` order."""
    nodes = {n.name: n for n in gm.graph.nodes}
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    _copy_weight_side(gm, region, graph, env)
    graph.output(tuple(env[nodes[name]] for name in region.weight_inputs))
    return list(fx.GraphModule(gm, graph)())


def region_function(gm: fx.GraphModule, region: Region, weights_as_inputs: bool = False) -> fx.GraphModule:
    """A GraphModule computing the region: f(x) (reading `gm`'s tensors), or, with
    `weights_as_inputs`, f(x, *weight inputs) in the order of `region.weight_inputs`."""
    nodes = {n.name: n for n in gm.graph.nodes}
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    activation = nodes[region.activation]
    env[activation] = x = graph.placeholder("x")
    x.meta["val"] = _val(activation)
    if weights_as_inputs:
        for i, name in enumerate(region.weight_inputs):
            env[nodes[name]] = graph.placeholder(f"w{i}")
            env[nodes[name]].meta["val"] = _val(nodes[name])
    else:
        _copy_weight_side(gm, region, graph, env)
    shape = list(_val(activation).shape)
    for name in region.size_inputs:
        size = _val(nodes[name])
        dim = next((d for d, s in enumerate(shape) if _same_size(s, size)), None)
        if dim is None:
            raise ValueError(f"the quantized layer {region.path} reads a size ({size}) that is not one of its input's")
        env[nodes[name]] = graph.call_function(torch.ops.aten.sym_size.int, (x, dim))
    for name in region.nodes:
        env[nodes[name]] = graph.node_copy(nodes[name], lambda a: env[a])
    graph.output(env[nodes[region.output]])
    return fx.GraphModule(gm, graph)


def probe_input(region: Region, rows: torch.Tensor) -> torch.Tensor:
    """`rows` (n, in) shaped as the region's activation: (1, ..., 1, n, in)."""
    return rows.reshape((1,) * max(region.activation_rank - 2, 0) + tuple(rows.shape))


def run_rows(function, region: Region, rows: torch.Tensor) -> torch.Tensor:
    """The region's function on each row of `rows` (n, in): (n, out). A region whose activation
    is one vector (in,) is called once per row."""
    if region.activation_rank == 1:
        return torch.stack([function(row) for row in rows])
    return function(probe_input(region, rows)).reshape(rows.shape[0], region.out_features)


def dequantize_region(function, region: Region, dtype: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(W (out, in), b (out,)) that the region computes, y = x Wᵀ + b, probed on the identity:
    in rows through the layer, an (in × in × out) product. Exact for a weight-only layer without
    bias (each output is the one product W_ij · 1; with a bias, one rounding of W_ij + b_i), so it
    is the oracle where a format has no dequantize."""
    eye = torch.eye(region.in_features, dtype=dtype, device=device)
    with torch.no_grad():
        ys = run_rows(function, region, eye)
        y0 = run_rows(function, region, eye[:1] * 0)[0]
    return (ys - y0).t().contiguous(), y0


def weight_dequantizer(gm: fx.GraphModule, region: Region):
    """f(weights) -> W (out, in): the region's dense weight from the tensors it reads (in the
    order of `region.weight_inputs`), by its format's own dequantize: torchao's `dequantize()`
    on the tensor rebuilt from its inner tensors, a swapped bitsandbytes layer's
    `dense_weight`. An elementwise pass over the weight, where probing the identity
    (`dequantize_region`) costs a matmul. None when the format has no dequantize."""
    nodes = {n.name: n for n in gm.graph.nodes}
    swapped = gm.meta.get(SWAPPED_LAYERS, {}).get(region.path)
    if isinstance(swapped, (BnbLinear4bit, BnbLinear8bit)):
        names = [nodes[w].target.removeprefix(region.path + ".") if nodes[w].op == "get_attr" else None
                 for w in region.weight_inputs]
        if None in names:
            return None
        return lambda weights: swapped.dense_weight(dict(zip(names, weights)))
    inner: dict[str, Any] = {}
    for position, name in enumerate(region.weight_inputs):
        node = nodes[name]
        if node.target is torch.ops.export.access_subclass_inner_tensor.default and node.args[0].op == "get_attr":
            inner.setdefault(node.args[0].target, {})[node.args[1]] = position
    root = region.quantized[0]
    if root not in inner:
        return None
    tensor = module_attr(gm, root)
    kind, (_, context), size, stride = type(tensor), tensor.__tensor_flatten__(), tensor.shape, tensor.stride()
    positions = inner[root]

    def dequantize(weights):
        return torchao_dense(kind, {name: weights[i] for name, i in positions.items()}, context, size, stride)

    if row_scaled(kind, {name: getattr(tensor, name) for name in positions}, size) is not None:
        # W = s · q: the backward's dL/dy · W as (dL/dy ⊙ s) · q, no weight-sized product
        dequantize.row_scaled = lambda weights: row_scaled(  # type: ignore[attr-defined]  # read by getattr
            kind, {name: weights[i] for name, i in positions.items()}, size)
    return dequantize


def region_device(gm: fx.GraphModule, region: Region) -> torch.device:
    """The device of the tensors the region reads (its first root that is a tensor; else the CPU)."""
    for root in region.roots:
        tensor = module_attr(gm, root)
        if isinstance(tensor, torch.Tensor):
            return tensor.device
    return torch.device("cpu")


def dequantized(gm: fx.GraphModule, target, with_bias: bool = False):
    """The dense weight (out, in) that target's quantized layer computes with, in its compute
    dtype (and the bias, with `with_bias`). Every site of a target reads the same weight."""
    region = _target_region(gm, target)
    weight, bias = dequantize_region(region_function(gm, region), region, activation_dtype(gm, region),
                                     region_device(gm, region))
    return (weight, bias) if with_bias else weight


def dequantized_exactly(gm: fx.GraphModule, target) -> torch.Tensor:
    """The target's dense weight (out, in) by its format's own dequantize (no rounding with a bias,
    unlike probing the identity); `dequantized` where the format has none."""
    region = _target_region(gm, target)
    dequantize = weight_dequantizer(gm, region)
    if dequantize is None:
        return dequantized(gm, target)
    with torch.no_grad():
        return dequantize(weight_values(gm, region))


def activation_dtype(gm: fx.GraphModule, region: Region) -> torch.dtype:
    """The dtype of the activation coming into the region."""
    nodes = {n.name: n for n in gm.graph.nodes}
    return _val(nodes[region.activation]).dtype


def _target_region(gm: fx.GraphModule, target) -> Region:
    site = target.sites[0]
    for region in find_regions(gm):
        if region.output == site:
            return region
    raise ValueError(f"{target.name} has no quantized region in this graph")
