"""Output heads: the targets that "all-linear" leaves out.

A head is a target tied to an embedding table (GPT-2's lm_head), or one whose output size
equals an embedding table's row count (a vocabulary) and whose result feeds no other target.
"""

from __future__ import annotations

import torch
from torch import fx

from .targets import Target, weight_source

aten = torch.ops.aten


def _embedding_tables(gm: fx.GraphModule) -> list[torch.Tensor]:
    """The weights that aten.embedding looks rows up in."""
    tables = []
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is aten.embedding.default:
            source = weight_source(node.args[0])
            if source is not None:
                tables.append(gm.get_parameter(source[0].target))
    return tables


def _inner_targets(gm: fx.GraphModule, targets: dict[str, Target]) -> set[str]:
    """Targets whose result flows (through any ops) into a call site of a target.

    One reverse pass over the graph: `reaches[n]` says whether node n's value is read,
    directly or not, by some target's call site. (A graph is acyclic, so a site never
    feeds itself; a weight called twice in a row counts as inner, which it is.)
    """
    sites = {site for t in targets.values() for site in t.sites}
    reaches: dict[fx.Node, bool] = {}
    for node in reversed(list(gm.graph.nodes)):
        reaches[node] = any(user.name in sites or reaches[user] for user in node.users)
    nodes = {n.name: n for n in gm.graph.nodes}
    return {t.name for t in targets.values() if any(reaches[nodes[site]] for site in t.sites)}


def output_heads(gm: fx.GraphModule, targets: dict[str, Target]) -> set[str]:
    """Targets that "all-linear" leaves out: output heads tied to an embedding or sized like one.

    A head is a target tied to an embedding table (GPT-2's lm_head), or one whose output
    size equals an embedding table's row count (a vocabulary) AND whose result feeds no
    other target. The second condition keeps hidden layers that merely happen to be as wide
    as some table (an MLP of width 4·d equal to a small vocabulary, attention projections
    as wide as T5's relative-position buckets) in "all-linear".
    """
    tables = _embedding_tables(gm)
    vocab = {int(table.shape[0]) for table in tables}
    tied = {id(table) for table in tables}
    inner = _inner_targets(gm, targets)
    return {
        t.name for t in targets.values()
        if id(gm.get_parameter(t.weight)) in tied or (t.out_features in vocab and t.name not in inner)
    }
