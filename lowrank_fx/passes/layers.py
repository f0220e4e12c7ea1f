"""Give a flat captured graph its layers back: each repeated block becomes a `call_module`.

torch.export yields one flat graph whose weights are read by `get_attr` at the root. FSDP2
shards per module and activation checkpointing recomputes per call, so both need the layers
back as modules. This pass groups the nodes of each block (a decoder or encoder layer, a ViT
block, an `nn.TransformerEncoderLayer`) by the `nn_module_stack` torch recorded for each node
into a GraphModule per block, and the outer graph calls the blocks in order:

    %out = call_module model.layers.0(%hidden, %mask, %cos, %sin, %gate, ...)
    %h   = getitem(%out, 0)

Design (what every other part of lowrank_fx relies on):
  - The block is installed *at the module path of the layer it replaces* (`model.layers.0`)
    and keeps that layer's children, parameters and buffers. So every weight keeps its
    fully qualified name (`model.layers.0.self_attn.q_proj.weight` is still one, now a
    parameter of the block) and the flat graph's `get_attr` targets still resolve against
    the structured module tree.
  - The adapter container stays at the root (`gm.lowrank_fx[adapter][group]`, graph/record.py)
    and each block also registers the modules it calls (its adapter units, mode modules) at
    the same root-relative paths inside itself (`block.lowrank_fx.<adapter>.<group>.units.<key>`),
    the very same objects. So the block owns its adapters' parameters (FSDP2 `fully_shard(block)`
    shards them, `checkpoint` recomputes them) while the container, files, gates and PEFT names
    are untouched. Tensors a block reads but does not own (gates, LoRTA's and RandLoRA's factors
    shared by every layer, a weight tied to another module) are passed in as block inputs.
  - Everything that analyses or edits the graph (fold, merge, merged_state_dict, adapter
    files, PEFT, ONNX export) works on `flat_view(gm)`: the blocks inlined back into one graph
    over the same modules and tensors, node for node the flat graph; the names a user sees are
    therefore identical. Adding an adapter to a structured graph (`rewrite` again, loading an
    adapter file into it) flattens it in place (`unstructure`), injects, and structures again.
  - A block boundary never cuts an adapter's site: an injected node belongs to the block of
    the call site it adds to.

`structure(gm, layers)` with layers "auto" finds blocks by repetition: the children of a
module list (path `<list>.<i>`) with at least two children of one type, outermost only;
a list of glob patterns over module paths (`"model.layers.*"`) names them instead. Each block's
nodes must form one contiguous run (nodes in between that do not depend on the block are moved
before it); "auto" leaves out a list whose calls interleave, patterns raise.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import operator
import re
from typing import Any, cast

from torch import fx, nn
from torch.utils.checkpoint import checkpoint

from ..errors import SpecError
from ..graph.fx_args import target_name
from ..graph.module_copy import copy_call_specs
from ..graph.record import KEY

BLOCK = "lowrank_fx_block"  # block.meta[BLOCK]: the root-level names it mirrors (its adapter containers)
_INDEXED = re.compile(r"^(.+)\.(\d+)$")


@dataclasses.dataclass
class _BlockInfo:
    path: str  # the module path the block replaces (and keeps)
    kind: str  # the layer's class name
    nodes: int  # graph nodes inside the block
    inputs: int  # values passed in (activations, shared tensors, gates)
    outputs: int


@dataclasses.dataclass
class _Structured:
    """What `structure` did: the blocks made, in call order, and what "auto" left out and why."""
    blocks: list[_BlockInfo]
    skipped: dict[str, str] = dataclasses.field(default_factory=dict)


def _stack(node: fx.Node) -> list[tuple[str, str]]:
    """(module path, class name) of the modules `node` was recorded under, outermost first."""
    stack = node.meta.get("nn_module_stack") or {}
    found = []
    for path, kind in stack.values():
        name = kind if isinstance(kind, str) else f"{kind.__module__}.{kind.__qualname__}"
        found.append((path, name.rsplit(".", 1)[-1]))
    return found


def _outermost(paths: set[str]) -> set[str]:
    return {p for p in paths if not any(p.startswith(q + ".") for q in paths if q != p)}


def candidates(gm: fx.GraphModule, layers) -> dict[str, str]:
    """Block path -> class name for `layers` ("auto" or glob patterns), outermost only."""
    kinds = {path: kind for node in gm.graph.nodes for path, kind in _stack(node) if path}
    if layers == "auto":
        lists: dict[str, dict[str, str]] = {}
        for path, kind in kinds.items():
            indexed = _INDEXED.match(path)
            if indexed:
                lists.setdefault(indexed.group(1), {})[path] = kind
        chosen = {p for children in lists.values() if len(children) >= 2 and len(set(children.values())) == 1
                  for p in children}
    else:
        patterns = [layers] if isinstance(layers, str) else list(layers)
        if not patterns or not all(isinstance(p, str) for p in patterns):
            raise SpecError(f"layers must be 'auto', None or a list of glob patterns over module paths, got {layers!r}")
        chosen = {p for p in kinds if any(fnmatch.fnmatchcase(p, pattern) for pattern in patterns)}
        if not chosen:
            auto = sorted(candidates(gm, "auto"), key=_natural)
            raise SpecError(
                f"layers={patterns!r} matches no module the graph's nodes were recorded under; "
                + (f"layers='auto' finds {', '.join(auto[:4])}{', ...' if len(auto) > 4 else ''}" if auto else
                   "this graph has no repeated blocks (its nodes carry no nn_module_stack, or no module list repeats)")
            )
    return {p: kinds[p] for p in sorted(_outermost(chosen), key=_natural)}


def _natural(path: str):
    return [int(part) if part.isdigit() else part for part in path.split(".")]


def _membership(gm: fx.GraphModule, blocks: set[str]) -> dict[fx.Node, str]:
    """Node -> block path for every compute node inside a block; an injected node goes with its site."""
    member: dict[fx.Node, str] = {}
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output", "get_attr"):
            continue
        if KEY in node.meta and node.meta[KEY]["role"] == "add":
            site = node.args[0]
            if site in member:
                member[node] = member[site]
            continue
        path = next((p for p, _ in _stack(node) if p in blocks), None)
        if path is not None:
            member[node] = path
    for node in reversed(gm.graph.nodes):  # delta, rows, select: the block of the add they feed
        if KEY in node.meta and node not in member and node.op != "get_attr":
            owner = {member[u] for u in node.users if u in member}
            if len(owner) == 1:
                member[node] = owner.pop()
    return member


def _contiguous(nodes: list[fx.Node]) -> str | None:
    """Move the nodes between the block's first and last that do not depend on the block
    before it; the reason if one does (the block's calls interleave with other work)."""
    inside = set(nodes)
    first, last = nodes[0], nodes[-1]
    node = first.next
    while node is not last:
        following = node.next
        if node not in inside:
            uses = [a for a in node.all_input_nodes if a in inside]
            if uses:
                return f"{node.name} runs between its nodes and reads {uses[0].name}"
            first.prepend(node)
        node = following
    return None


def _register(holder: nn.Module, target: str, module: nn.Module) -> None:
    """Register `module` (the same object) in `holder` at the dotted path `target`, making
    plain intermediate modules where there are none."""
    *parents, name = target.split(".")
    for part in parents:
        child = holder._modules.get(part)
        if child is None:
            child = nn.Module()
            holder.add_module(part, child)
        holder = child
    holder.add_module(name, module)


def _block_module(gm: fx.GraphModule, path: str, kind: str, graph: fx.Graph,
                  mirrored: dict[str, nn.Module]) -> fx.GraphModule:
    """A GraphModule running `graph` that holds the layer's own children and tensors."""
    try:
        layer = gm.get_submodule(path)
    except AttributeError:  # a layer without tensors of its own is not in the captured tree
        layer = nn.Module()
    block = fx.GraphModule(nn.Module(), fx.Graph(), class_name=kind + "Block")
    for name, child in layer._modules.items():
        block.add_module(name, child)
    for name, param in layer._parameters.items():
        block.register_parameter(name, param)
    for name, buffer in layer._buffers.items():
        block.register_buffer(name, buffer, persistent=name not in layer._non_persistent_buffers_set)
    for target, module in mirrored.items():
        _register(block, target, module)
    block.meta[BLOCK] = sorted({target.split(".")[0] for target in mirrored})
    block.graph = graph
    block.train(layer.training)
    return block


def _extract(gm: fx.GraphModule, path: str, kind: str, nodes: list[fx.Node]) -> _BlockInfo:
    """Move `nodes` into a block at `path` and call it in their place."""
    prefix = path + "."
    inside = set(nodes)
    def owned(n):
        return n.op == "get_attr" and n.target.startswith(prefix)
    read = [a for n in nodes for a in n.all_input_nodes if a not in inside and not owned(a)]
    # one input per value; a tensor read by several get_attr nodes (a gate at every site) once
    def key(value):
        return ("attr", value.target) if value.op == "get_attr" else value
    inputs = list({key(value): value for value in reversed(read)}.values())[::-1]
    outputs = [n for n in nodes if any(u not in inside for u in n.users)]
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    placeholders = {}
    for value in inputs:
        placeholders[key(value)] = graph.placeholder(value.name)
        placeholders[key(value)].meta = dict(value.meta)
    for value in read:
        env[value] = placeholders[key(value)]
    mirrored: dict[str, nn.Module] = {}

    def inner(value: fx.Node) -> fx.Node:
        if value not in env:  # a tensor the block owns
            env[value] = graph.get_attr(target_name(value)[len(prefix):])
            env[value].meta = dict(value.meta)
        return env[value]

    for node in nodes:
        copy = graph.node_copy(node, inner)
        if node.op == "call_module":
            if target_name(node).startswith(prefix):
                copy.target = target_name(node)[len(prefix):]
            else:
                mirrored[target_name(node)] = gm.get_submodule(target_name(node))
        env[node] = copy
    graph.output(tuple(env[n] for n in outputs))
    block = _block_module(gm, path, kind, graph, mirrored)
    with gm.graph.inserting_before(nodes[0]):
        call = gm.graph.call_module(path, tuple(inputs))
        for i, node in enumerate(outputs):
            item = gm.graph.call_function(operator.getitem, (call, i))
            item.meta = dict(node.meta)
            node.replace_all_uses_with(item, delete_user_cb=lambda user: user not in inside)
    for node in reversed(nodes):
        gm.graph.erase_node(node)
    _register(gm, path, block)
    return _BlockInfo(path, kind, len(nodes), len(inputs), len(outputs))


def structure(gm: fx.GraphModule, layers="auto") -> _Structured:
    """Group each block's nodes of the flat graph `gm` into a call_module submodule, in place.

    Outputs are unchanged bit for bit (the same ops in the same order). Returns the blocks
    made and, for "auto", the candidates left out with the reason.
    """
    if blocks(gm):
        raise SpecError("this graph is structured already; lfx.rewrite keeps its blocks when adding an adapter")
    found = candidates(gm, layers)
    member = _membership(gm, set(found))
    runs: dict[str, list[fx.Node]] = {}
    for node, path in member.items():
        runs.setdefault(path, []).append(node)
    order = {node: i for i, node in enumerate(gm.graph.nodes)}
    result = _Structured([])
    for path in sorted(runs, key=lambda p: order[min(runs[p], key=order.__getitem__)]):
        nodes = sorted(runs[path], key=order.__getitem__)
        problem = _contiguous(nodes)
        if problem is not None:
            if layers != "auto":
                raise SpecError(f"cannot make {path} a block: {problem}; name other modules in layers=[...]")
            result.skipped[path] = problem
            continue
        result.blocks.append(_extract(gm, path, found[path], nodes))
    for node in list(gm.graph.nodes):
        if node.op == "get_attr" and not node.users:
            gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()
    return result


def blocks(gm: fx.GraphModule) -> list[str]:
    """Module paths of the blocks `gm`'s graph calls, in order (empty for a flat graph)."""
    return [call[0] for node in gm.graph.nodes if (call := block_call(gm, node)) is not None]


def block_call(gm: fx.GraphModule, node: fx.Node) -> tuple[str, tuple] | None:
    """(block path, the values passed in) if `node` calls a block: `call_module <path>(...)`,
    or `checkpoint(<path>, ..., use_reentrant=False)` after `checkpoint_layers`."""
    if node.op == "call_module":
        path, args = target_name(node), node.args
    elif node.op == "call_function" and node.target is checkpoint and node.args and \
            isinstance(node.args[0], fx.Node) and node.args[0].op == "get_attr":
        path, args = target_name(node.args[0]), node.args[1:]
    else:
        return None
    return (path, args) if _is_block(gm, path) else None


def _is_block(gm: fx.GraphModule, path: str) -> bool:
    try:
        module = gm.get_submodule(path)
    except AttributeError:  # a tensor, not a module
        return False
    return isinstance(module, fx.GraphModule) and BLOCK in getattr(module, "meta", {})


def _flat_graph(gm: fx.GraphModule) -> fx.Graph:
    """`gm`'s graph with every block inlined: the flat graph, valid over `gm`'s own modules."""
    graph = fx.Graph()
    graph.set_codegen(gm.graph._codegen)
    env: dict[fx.Node, Any] = {}  # a Node, or a tuple of a block's outputs
    for node in gm.graph.nodes:
        call = block_call(gm, node)
        if call is not None:
            path, args = call
            env[node] = _inline(graph, cast(fx.GraphModule, gm.get_submodule(path)), path, [env[a] for a in args])
        elif node.op == "get_attr" and _is_block(gm, node.target):
            continue  # a checkpointed block itself, passed to checkpoint
        elif node.op == "call_function" and node.target is operator.getitem and node.args[0] in env \
                and isinstance(env[node.args[0]], tuple):
            env[node] = env[node.args[0]][node.args[1]]
        else:
            env[node] = graph.node_copy(node, env.__getitem__)
    return graph


def _inline(graph: fx.Graph, block: fx.GraphModule, path: str, args: list) -> tuple:
    mirrored = set(block.meta[BLOCK])
    def root_path(target):
        return target if target.split(".")[0] in mirrored else f"{path}.{target}"
    env: dict[fx.Node, Any] = {}
    placeholders = iter(args)
    for node in block.graph.nodes:
        if node.op == "placeholder":
            env[node] = next(placeholders)
        elif node.op == "output":
            return tuple(env[value] for value in node.args[0])
        else:
            copy = graph.node_copy(node, env.__getitem__)
            if node.op in ("get_attr", "call_module"):
                copy.target = root_path(node.target)
            env[node] = copy
    raise AssertionError("a block graph without an output node")


def flat_view(gm: fx.GraphModule) -> fx.GraphModule:
    """`gm` itself when it has no blocks; else a GraphModule running the flat graph over the
    same modules, tensors and record (nothing copied), for the passes that read node by node."""
    if not blocks(gm):
        return gm
    view = fx.GraphModule(nn.Module(), fx.Graph(), class_name=type(gm).__name__)
    view._modules.update(gm._modules)
    view._parameters.update(gm._parameters)
    view._buffers.update(gm._buffers)
    view._non_persistent_buffers_set.update(gm._non_persistent_buffers_set)
    view.meta = gm.meta
    copy_call_specs(gm, view)
    view.graph = _flat_graph(gm)
    view.training = gm.training
    return view


def unstructure(gm: fx.GraphModule) -> list[str]:
    """Inline every block of `gm` in place (the layers become plain modules again); their paths."""
    paths = blocks(gm)
    if not paths:
        return paths
    graph = _flat_graph(gm)
    for path in paths:
        block = cast(fx.GraphModule, gm.get_submodule(path))
        layer = nn.Module()
        for name, child in block._modules.items():
            if name not in block.meta[BLOCK]:
                layer.add_module(name, child)
        layer._parameters.update(block._parameters)
        layer._buffers.update(block._buffers)
        layer._non_persistent_buffers_set.update(block._non_persistent_buffers_set)
        layer.train(block.training)
        parent, _, name = path.rpartition(".")
        setattr(gm.get_submodule(parent), name, layer)
    gm.graph = graph
    return paths
