"""Per-row trained modules: in a per-row graph, each row reads its own adapter's copy of a
trained parameter (`Spec.train`), and rows with no adapter (id -1) the base.

A weight cannot differ per row, so the first ops that apply it to an activation are run once
per variant, and the rows pick their result exactly:

    out = op(x, W_base)                                    the base, for rows of no adapter
    out = where(mask[row, k] != 0, op(x, W_k), out)        for each adapter k that trains W

Ops between the parameter and that op that read only weights (a transpose, a cast) are
copied with it. Only adapters that train one of the op's parameters add a variant; where a
row's adapter does not train one of them, that variant reads the base for it. The op's
result must lead with the batch (or batch · n), as every per-row site must (per_row.py).
Input: a graph after `adapter_graph.copy_graph`, whose selects are ungated,
`select_trained(base, copy)` (graph/gates.py `ungate`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import fx

from ..errors import ExportError
from ..graph.record import KEY
from .per_row_lora import row_weights


def row_select(value: torch.Tensor, other: torch.Tensor, mask: torch.Tensor, k: int) -> torch.Tensor:
    """`value` in the rows whose adapter is k (mask[:, k] != 0), `other` elsewhere; rows = batch · n."""
    rows = value.shape[0]
    pick = row_weights(mask[:, k:k + 1], rows)  # (rows, 1)
    return torch.where(pick.reshape((rows,) + (1,) * (value.dim() - 1)) != 0, value, other)


def _role(node: fx.Node) -> str | None:
    return node.meta.get(KEY, {}).get("role")


def _chains(graph: fx.Graph) -> dict[fx.Node, tuple[fx.Node, dict[str, fx.Node]]]:
    """{top select: (the base parameter's node, {adapter: its copy's node})}."""
    selects = [n for n in graph.nodes if _role(n) == "select"]
    tops = [n for n in selects if not any(_role(u) == "select" and u.args[0] is n for u in n.users)]
    chains = {}
    for top in tops:
        copies: dict[str, Any] = {}
        node = top
        while _role(node) == "select":
            copies.setdefault(node.meta[KEY]["adapter"], node.args[1])
            node = node.args[0]
        chains[top] = (node, copies)
    return chains


def per_row_trained(graph: fx.Graph, adapters: list[str], mask: fx.Node,
                    leads_with_batch: Callable[[fx.Node], bool]) -> None:
    """Rewrite `graph` in place so that each row uses its adapter's trained copies (module docstring).

    `leads_with_batch(node)`: whether the node's result starts with the batch (or batch · n);
    a node that does not is refused with an ExportError.
    """
    chains = _chains(graph)
    if not chains:
        return
    dependent: set[fx.Node] = set()  # nodes computed from the model's inputs
    for node in graph.nodes:
        if node.op == "placeholder" or any(arg in dependent for arg in node.all_input_nodes):
            dependent.add(node)
    region: list[fx.Node] = []  # weight-only ops between a trained parameter and its use
    frontier: list[fx.Node] = []  # the first ops that apply it to an activation
    stack = list(chains)
    while stack:
        for user in stack.pop().users:
            if user in dependent:
                if user not in frontier:
                    frontier.append(user)
            elif user not in region:
                region.append(user)
                stack.append(user)
    inside = set(region)
    order = {node: i for i, node in enumerate(graph.nodes)}
    for consumer in sorted(frontier, key=order.__getitem__):
        _split_rows(graph, consumer, chains, inside, adapters, mask, leads_with_batch)
    for node in sorted([*region, *(n for n in graph.nodes if _role(n) == "select")], key=order.__getitem__,
                       reverse=True):
        if not node.users:
            graph.erase_node(node)


def _tops_of(node: fx.Node, chains: dict, inside: set[fx.Node]) -> list[fx.Node]:
    """The trained parameters (top selects) `node` reads, directly or through weight-only ops."""
    found, stack, seen = [], list(node.all_input_nodes), set()
    while stack:
        arg = stack.pop()
        if arg in seen:
            continue
        seen.add(arg)
        if arg in chains:
            found.append(arg)
        elif arg in inside:
            stack.extend(arg.all_input_nodes)
    return found


def _split_rows(graph: fx.Graph, consumer: fx.Node, chains: dict, inside: set[fx.Node], adapters: list[str],
                mask: fx.Node, leads_with_batch: Callable[[fx.Node], bool]) -> None:
    tops = _tops_of(consumer, chains, inside)
    value = consumer.meta.get("val")
    if (value is not None and not isinstance(value, torch.Tensor)) or not leads_with_batch(consumer):
        names = ", ".join(chains[t][0].target for t in tops)
        raise ExportError(
            f"per-row export of the trained parameters {names}: the op that applies them, {consumer.name} "
            f"({consumer.target}), does not return one tensor that leads with the batch, so its rows cannot "
            "pick their adapter's copy. Export with mode='adapters' and one adapter per run."
        )

    def variant(adapter: str | None) -> fx.Node:
        memo: dict[fx.Node, fx.Node] = {}
        for top in tops:
            root, copies = chains[top]
            memo[top] = copies.get(adapter, root) if adapter is not None else root

        def clone(node: fx.Node) -> fx.Node:
            if node in memo:
                return memo[node]
            if node not in inside:
                return node
            memo[node] = graph.node_copy(node, clone)
            return memo[node]

        return graph.node_copy(consumer, clone)

    with graph.inserting_before(consumer):
        out = variant(None)
        for k, adapter in enumerate(adapters):
            if any(adapter in chains[top][1] for top in tops):
                out = graph.call_function(row_select, (variant(adapter), out, mask, k))
    consumer.replace_all_uses_with(out)
    graph.erase_node(consumer)
