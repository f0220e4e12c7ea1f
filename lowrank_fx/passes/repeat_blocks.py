"""Write the blocks capture did not trace: copies of a traced block over their own weights.

Capture traces each repeated module list only up to a prefix (graph/block_lists.py). In that
graph, the nodes of traced child j of list `model.layers` are those recorded under the module
path `model.layers.j` (nn_module_stack). For child j >= 1 every value it reads from outside
itself is one of:

  - an output of child j-1 (a node of child j-1 that is read outside it), at position p
    of that child's outputs in graph order: the *chain* input p;
  - a tensor of its own (`get_attr model.layers.j.<leaf>`): renamed for the copy;
  - a value computed outside every child from its own tensors (the inner tensors of a
    torchao NF4 weight): recomputed for the copy from the copy's tensors;
  - a graph input that only this child reads, or a value computed from one (a KV cache
    slot): the copy reads child i's, found by the stride the traced children show
    (`_slots`); the values child j returns to the graph's output (its new keys and values)
    go to child i's places in that output the same way;
  - anything else computed outside every child (masks, rotary cos/sin, symbolic sizes, a
    shared tensor), or by child 0 when child 0 is of a kind of its own (T5's position bias,
    which child 0 computes and every later child reads): read by the copy as it is.

Child i >= keep of kind k is written after the last traced child as a copy of the last
traced child of kind k, reading its chain inputs from child i-1's outputs and its own tensors under
`model.layers.i`; what came after the prefix (final norm, head, loss) then reads child N-1's
outputs where it read child keep-1's. Node metadata (shapes, module paths) is copied with the
path renamed, so `layers="auto"`, targets and every later pass see what a whole-model
capture gives: the same nodes in the same order, over the same tensors.

The pass refuses (NotRepeatable, and capture traces the whole model instead) when the prefix
does not have this shape: a child read by anything but the next child (all hidden states
returned), a child reading an earlier child than the one before it or a value computed from
one outside any child, per-child inputs or outputs that follow no stride, or children of
different kinds with different output counts.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable

import torch
from torch import fx, nn

from ..graph.block_lists import BlockList
from .layers import _stack


class NotRepeatable(Exception):
    """Why the traced prefix cannot be repeated (capture then traces the whole model)."""


@dataclasses.dataclass
class _Child:
    nodes: list[fx.Node]  # graph order
    outputs: list[fx.Node]  # nodes read outside the child, graph order
    chain: dict[fx.Node, int]  # value of child j-1 it reads -> position among that child's outputs
    inputs: list[fx.Node]  # values outside every child that only this child reads (its cache), graph order
    slots: list[fx.Node]  # the graph inputs those are computed from, graph order
    owned: list[fx.Node]  # values outside every child computed from the child's own tensors
    returned: list[fx.Node]  # nodes the graph's output reads directly


def _strided(positions: list[list[int]], what: str) -> tuple[list[int], list[int]]:
    """(child 0's positions, strides) when child j's k-th is child 0's k-th + j * stride k."""
    first, second = positions[0], positions[1]
    if any(len(found) != len(first) for found in positions) or not first:
        raise NotRepeatable(f"the traced blocks have different numbers of {what}")
    strides = [b - a for a, b in zip(first, second)]
    for j, found in enumerate(positions):
        if found != [p + j * d for p, d in zip(first, strides)] or min(strides) <= 0:
            raise NotRepeatable(f"the {what} of the traced blocks do not follow one stride")
    return first, strides


def _members(gm: fx.GraphModule, entry: BlockList) -> dict[int, list[fx.Node]]:
    paths = {f"{entry.path}.{j}": j for j in range(len(entry.kinds))}
    members: dict[int, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output", "get_attr"):
            continue
        j = next((paths[p] for p, _ in _stack(node) if p in paths), None)
        if j is not None:
            members.setdefault(j, []).append(node)
    return members


def _children(gm: fx.GraphModule, entry: BlockList, members: dict[int, list[fx.Node]]) -> list[_Child]:
    owner = {node: j for j, nodes in members.items() for node in nodes}
    derived = set()  # nodes outside every child that are computed from a child's values
    roots: dict[fx.Node, frozenset] = {}  # node outside every child -> the graph inputs and tensors it is computed from
    for node in gm.graph.nodes:
        if node in owner:
            continue
        if any(a in owner or a in derived for a in node.all_input_nodes):
            derived.add(node)
        roots[node] = frozenset([node]) if node.op in ("placeholder", "get_attr") else \
            frozenset().union(*(roots.get(a, frozenset()) for a in node.all_input_nodes))
    order = {node: k for k, node in enumerate(gm.graph.nodes)}
    reach: dict[fx.Node, set[int]] = {}  # graph input -> the traced children that read it (or values of it)
    for node, j in owner.items():
        for arg in node.all_input_nodes:
            for root in roots.get(arg, ()):
                reach.setdefault(root, set()).add(j)
    children: list[_Child] = []
    for j in range(entry.keep):
        nodes = members.get(j)
        if not nodes:
            raise NotRepeatable(f"{entry.path}.{j} has no nodes in the graph")
        inside = set(nodes)
        outputs = [n for n in nodes if any(u not in inside for u in n.users)]
        returned = [n for n in nodes if any(u.op == "output" for u in n.users)]
        chain: dict[fx.Node, int] = {}
        private: list[fx.Node] = []
        owned: list[fx.Node] = []
        path = f"{entry.path}.{j}"
        for node in nodes:
            for arg in node.all_input_nodes:
                if arg in inside or arg.op == "get_attr":
                    continue
                source = owner.get(arg)
                if source is None:
                    if arg in derived:
                        raise NotRepeatable(f"{entry.path}.{j} reads {arg.name}, computed from a block outside any "
                                            "block")
                    if (any(root.op == "placeholder" and reach[root] == {j} for root in roots[arg])
                            and arg not in private):
                        private.append(arg)  # computed from a graph input of this child alone
                    elif any(root.op == "get_attr" and _own(root.target, path) for root in roots[arg]) \
                            and arg not in owned:
                        owned.append(arg)  # computed from this child's own tensor (a quantized weight's parts)
                elif source == j - 1:
                    chain[arg] = children[j - 1].outputs.index(arg)
                elif source != 0 or not entry.first_unique:
                    raise NotRepeatable(f"{entry.path}.{j} reads {entry.path}.{source}, not the block before it")
        slots = {root for arg in private for root in roots[arg] if root.op == "placeholder" and reach[root] == {j}}
        children.append(_Child(nodes, outputs, chain, sorted(private, key=order.__getitem__),
                               sorted(slots, key=order.__getitem__), owned, returned))
    for j, child in enumerate(children[:-1]):
        following = set(children[j + 1].nodes) if j or not entry.first_unique else \
            {n for later in children[1:] for n in later.nodes}
        following.update(child.nodes)
        stray = [(out.name, user.name) for out in child.outputs for user in out.users
                 if user not in following and user.op != "output"]
        if stray:
            raise NotRepeatable(f"an output of {entry.path}.{j} ({stray[0][0]}) is read by {stray[0][1]}, "
                                "after the block that follows it")
    return children


def _renamed_meta(meta: dict, old: str, new: str) -> dict:
    """`meta` with module path `old` (and the stack keys made from it, dotted or underscored) renamed to `new`."""
    copied = dict(meta)
    stack = meta.get("nn_module_stack")
    if stack:
        def rename(path: str) -> str:
            return new + path[len(old):] if path == old or path.startswith(old + ".") else path

        dotted = re.compile(rf"(?<![\w.]){re.escape(old)}(?=\.|$)|(?<=__){re.escape(old)}(?=\.|$)")
        flat = re.compile(rf"{re.escape(old.replace('.', '_'))}(?=_|$)")
        new_flat = new.replace(".", "_")
        copied["nn_module_stack"] = {flat.sub(new_flat, dotted.sub(new, key)): (rename(path), kind)
                                     for key, (path, kind) in stack.items()}
    return copied


def _own(target: str, path: str) -> bool:
    return target == path or target.startswith(path + ".")


def _expand(gm: fx.GraphModule, model: nn.Module, entry: BlockList, children: list[_Child]) -> None:
    """Rebuild gm.graph with children keep..N-1 written in, over the model's own tensors.
    Their get_attr nodes go after the traced children's, in the same order (so the graph's
    tensors, and its state_dict, come in the order of a whole-model capture)."""
    graph = gm.graph
    last = children[-1].nodes[-1]
    traced = [f"{entry.path}.{j}" for j in range(entry.keep)]
    reads = [n for n in graph.nodes if n.op == "get_attr" and any(_own(n.target, p) for p in traced)]
    own = {j: [n for n in reads if _own(n.target, traced[j])] for j in range(entry.keep)}
    outs_len = {entry.kinds[j]: len(children[j].outputs) for j in range(entry.keep)}
    inputs, returns = _slots(graph, entry, children)
    new = fx.Graph(owning_module=gm, tracer_cls=graph._tracer_cls)
    new._codegen = graph._codegen
    env: dict[fx.Node, fx.Node] = {}
    attrs: dict[int, dict[fx.Node, fx.Node]] = {}  # child -> template's get_attr -> its own

    def read_tensors() -> None:
        for i in range(entry.keep, len(entry.kinds)):
            if i in attrs:
                return
            j = entry.template(entry.kinds[i])
            old, fresh = traced[j], f"{entry.path}.{i}"
            attrs[i] = {}
            for node in own[j]:
                target = fresh + node.target[len(old):]
                _install(gm, model, target)
                attrs[i][node] = new.get_attr(target)
                attrs[i][node].meta = dict(node.meta)

    def copy_child(i: int, previous: list[fx.Node]) -> list[fx.Node]:
        j = entry.template(entry.kinds[i])
        template, old, fresh = children[j], traced[j], f"{entry.path}.{i}"
        if len(previous) != len(children[j - 1].outputs):
            raise NotRepeatable(f"{entry.path}.{i - 1} has {len(previous)} outputs where {old} reads "
                                f"{len(children[j - 1].outputs)}")
        local: dict[fx.Node, fx.Node] = dict(attrs[i])
        local.update((theirs, env[mine]) for theirs, mine in zip(template.slots, inputs(i)))
        for node in _prologue(graph, template, own[j]):  # what this child reads, from its own inputs and tensors
            local[node] = new.node_copy(node, lambda arg: local.get(arg, env.get(arg)))

        def value(arg: fx.Node) -> fx.Node:
            if arg in local:
                return local[arg]
            if arg in template.chain:
                return previous[template.chain[arg]]
            return env[arg]

        for node in template.nodes:
            local[node] = new.node_copy(node, value)
            local[node].meta = _renamed_meta(node.meta, old, fresh)
        returned.update((k, local[n]) for k, n in zip(returns(i), (outs[p] for p in returns(j))))
        return [local[n] for n in template.outputs]

    output_value = graph.output_node().args[0]
    outs = list(output_value) if isinstance(output_value, (tuple, list)) else []
    returned: dict[int, fx.Node] = {}  # position in the graph's output -> a copied child's value
    kept: dict[fx.Node, fx.Node] = {}  # the traced children's own returned values, before the last one's are redirected
    for node in graph.nodes:
        if node.op == "output" and returned:
            flat = [kept.get(value, env[value]) if isinstance(value, fx.Node) else value for value in outs]
            for k, value in returned.items():
                flat[k] = value
            new.output(type(node.args[0])(flat), type_expr=node.type).meta = dict(node.meta)
            continue
        env[node] = new.node_copy(node, lambda arg: env[arg])
        if reads and node is reads[-1]:
            read_tensors()
        if node is last:
            read_tensors()
            outputs = [env[n] for n in children[-1].outputs]
            for i in range(entry.keep, len(entry.kinds)):
                outputs = copy_child(i, outputs)
            if len(outputs) != outs_len[entry.kinds[entry.keep - 1]]:
                raise NotRepeatable(f"the last block of {entry.path} has another output count than the traced one")
            kept.update((n, env[n]) for n in children[-1].returned)
            for old_out, new_out in zip(children[-1].outputs, outputs):
                env[old_out] = new_out
    gm.graph = new


def _slots(graph: fx.Graph, entry: BlockList, children: list[_Child]):
    """(inputs(i), returns(i)): the graph inputs child i alone reads (where the traced template
    reads its own), and the positions in the graph's output of the values it returns.

    A decode graph with a KV cache passes each layer its own key and value and returns each
    layer's new ones. The traced children show them laid out with one stride per child
    (layer i's after layer i-1's); the untraced children's follow that stride. Child 0 may
    share its inputs with everyone (the cache length is read from layer 0's keys), so the
    stride of the inputs comes from children 1, 2, ... (or, with two traced children, from
    child 1's own inputs being one contiguous run). A graph without such values gets none."""
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    index = {node: k for k, node in enumerate(placeholders)}
    inputs: Callable[[int], list[fx.Node]] = lambda i: []  # noqa: E731
    returns: Callable[[int], list[int]] = lambda i: []  # noqa: E731
    last = len(entry.kinds) - 1
    if any(child.inputs for child in children):
        where = [[index[n] for n in child.slots] for child in children[1:]]
        if len(where) >= 2:
            in_first, in_strides = _strided(where, "graph inputs read by one block alone")
        else:
            in_first = where[0]
            in_strides = [len(in_first)] * len(in_first)
            if not in_first or in_first != list(range(in_first[0], in_first[0] + len(in_first))) or \
                    any(index[n] + len(in_first) not in in_first for n in children[0].slots):
                raise NotRepeatable("the graph inputs read by one block alone do not follow one stride")
        if any(p + (last - 1) * d >= len(placeholders) for p, d in zip(in_first, in_strides)):
            raise NotRepeatable("the graph has no inputs for the untraced blocks")
        inputs = lambda i: [placeholders[p + (i - 1) * d] for p, d in zip(in_first, in_strides)]  # noqa: E731
        for i in range(entry.keep, last + 1):
            for mine, theirs in zip(inputs(i), children[entry.template(entry.kinds[i])].slots):
                if _spec(mine) != _spec(theirs):
                    raise NotRepeatable(f"graph input {mine.name} does not look like {theirs.name}")
    if any(child.returned for child in children[:-1]):
        outs = graph.output_node().args[0]
        if not isinstance(outs, (tuple, list)):
            raise NotRepeatable("the graph's output is not a flat tuple")
        where = [[k for k, value in enumerate(outs) if value in set(child.nodes)] for child in children]
        out_first, out_strides = _strided(where, "returned values")
        if any(p + last * d >= len(outs) for p, d in zip(out_first, out_strides)):
            raise NotRepeatable("the graph's output has no places for the untraced blocks")
        returns = lambda i: [p + i * d for p, d in zip(out_first, out_strides)]  # noqa: E731
    return inputs, returns


def _spec(node: fx.Node):
    value = node.meta.get("val")
    return (value.dim(), value.dtype) if isinstance(value, torch.Tensor) else type(value)


def _prologue(graph: fx.Graph, child: _Child, tensors: list[fx.Node]) -> list[fx.Node]:
    """The nodes outside every child that compute what `child` reads from its own graph inputs
    (its cache slot) or its own `tensors` (a quantized weight's inner tensors), in graph order."""
    needed, stack = set(), [*child.inputs, *child.owned]
    while stack:
        node = stack.pop()
        if node in needed or node.op in ("placeholder", "get_attr"):
            continue
        needed.add(node)
        stack.extend(node.all_input_nodes)
    seeds = set(child.slots) | set(tensors)
    mine = set()
    for node in graph.nodes:  # only what depends on the child's own inputs is recomputed per copy
        if node in needed and any(a in seeds or a in mine for a in node.all_input_nodes):
            mine.add(node)
    return [node for node in graph.nodes if node in mine]


def _install(gm: fx.GraphModule, model: nn.Module, target: str) -> None:
    """Put the model's own tensor at get_attr `target` of gm (a parameter stays a parameter)."""
    owner_path, _, leaf = target.rpartition(".")
    source = model.get_submodule(owner_path)
    tensor = getattr(source, leaf)
    owner = gm
    for part in owner_path.split("."):
        if not hasattr(owner, part):
            owner.add_module(part, nn.Module())
        owner = getattr(owner, part)
    if isinstance(tensor, nn.Parameter):
        owner.register_parameter(leaf, tensor)
    elif isinstance(tensor, torch.Tensor):
        owner.register_buffer(leaf, tensor, persistent=leaf not in source._non_persistent_buffers_set)
    else:
        setattr(owner, leaf, tensor)


def repeat_blocks(gm: fx.GraphModule, model: nn.Module, lists: list[BlockList]) -> list[str]:
    """Write the untraced children of each list into `gm` (in place); returns the lists expanded.
    Raises NotRepeatable when the traced prefix cannot be repeated (gm's graph is then as it
    was, though it may hold tensors of the model it does not read).
    A list whose children are all in the graph already (a whole-model capture) is left alone."""
    original, expanded = gm.graph, []
    try:
        for entry in lists:
            members = _members(gm, entry)  # of the graph as the lists before it left it
            if entry.keep in members:  # traced in full
                continue
            _expand(gm, model, entry, _children(gm, entry, members))
            expanded.append(entry.path)
    except NotRepeatable:
        gm.graph = original
        raise
    gm.graph.lint()
    return expanded
