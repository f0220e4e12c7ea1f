"""Graph edits shared by the copying fold (passes/fold.py) and the in-place one
(passes/fold_inplace.py): drop the adapter nodes, point a target's call sites at a folded
weight (the same parameter under every name, or an untied copy where the graph reads the
weight elsewhere), and give a quantized target's bias its update.
"""

from __future__ import annotations

import torch
from torch import fx, nn

from ..graph.fx_args import arg_node, target_name
from ..graph.gates import GATES
from ..graph.quantized import dequantized
from ..graph.record import CONTAINER, KEY, tagged
from ..graph.targets import Target, weight_operand
from ..methods.base import unit_key
from .fold_updates import merged_bias
from .quantized_fold import region_bias
from .row_gates import ROW_GATES

UNTIED = "lowrank_fx_untied"


class GraphIndex:
    """`gm`'s nodes by name and its get_attr nodes by the parameter they read, built once
    (O(nodes)) so that finding every target's chains and readers stays linear in the graph.
    Valid while the graph's nodes and parameters stay; folding a target changes only that
    target's entries, which it does not read again."""

    def __init__(self, gm: fx.GraphModule):
        self.nodes = {n.name: n for n in gm.graph.nodes}
        self._readers: dict[int, tuple[torch.Tensor, list[fx.Node]]] = {}  # holds the tensor: its id stays unique
        for node in gm.graph.nodes:
            if node.op == "get_attr":
                tensor = _tensor(gm, node.target)
                if tensor is not None:
                    self._readers.setdefault(id(tensor), (tensor, []))[1].append(node)

    def readers(self, tensor: torch.Tensor) -> list[fx.Node]:
        entry = self._readers.get(id(tensor))
        return entry[1] if entry is not None and entry[0] is tensor else []


def _tensor(gm: fx.GraphModule, path: str):
    try:
        return gm.get_parameter(path)
    except AttributeError:
        return None


def _weight_chains(index: GraphIndex, target: Target) -> list[list[fx.Node]]:
    """Per call site: [site, the ops between it and the weight..., the weight's get_attr]."""
    chains = []
    for site_name in target.sites:
        site = index.nodes[site_name]
        chain = [site]
        node = weight_operand(site)
        while node.op != "get_attr":
            chain.append(node)
            node = arg_node(node)
        chains.append([*chain, node])
    return chains


def set_parameter(gm: fx.GraphModule, path: str, value: nn.Parameter) -> None:
    owner, _, leaf = path.rpartition(".")
    module = gm.get_submodule(owner) if owner else gm
    if leaf in module._parameters:
        module._parameters[leaf] = value
    else:
        setattr(module, leaf, value)


def _readers(gm: fx.GraphModule, index: GraphIndex, target: Target) -> list[fx.Node]:
    """Every get_attr node that reads the target's weight tensor, under any of its names."""
    return index.readers(gm.get_parameter(target.weight))


def read_elsewhere(gm: fx.GraphModule, index: GraphIndex, target: Target) -> bool:
    """Whether the graph uses the target's weight anywhere but on its call sites' chains
    (and in lowrank_fx's own adapter nodes, which folding removes)."""
    on_chains = {node for chain in _weight_chains(index, target) for node in chain[:-1]}
    return any(user not in on_chains and KEY not in user.meta and KEY not in reader.meta
               for reader in _readers(gm, index, target) for user in reader.users)


def fold_target(gm: fx.GraphModule, index: GraphIndex, target: Target, merged: torch.Tensor) -> None:
    """Make the target's call sites read `merged` (a new tensor): under every name of the weight,
    or, where the graph also reads the weight elsewhere, as `lowrank_fx_untied.<target>`."""
    parameter = nn.Parameter(merged, requires_grad=False)
    if not read_elsewhere(gm, index, target):
        for reader in _readers(gm, index, target):
            set_parameter(gm, target_name(reader), parameter)
        return
    chains = _weight_chains(index, target)
    if not hasattr(gm, UNTIED):
        gm.add_module(UNTIED, nn.Module())
    getattr(gm, UNTIED).register_parameter(unit_key(target.name), parameter)
    for chain in chains:
        consumer, root = chain[-2], chain[-1]
        with gm.graph.inserting_before(consumer):
            untied = gm.graph.get_attr(f"{UNTIED}.{unit_key(target.name)}")
        consumer.replace_input_with(root, untied)


def remove_adapter_nodes(gm: fx.GraphModule) -> None:
    """Drop every node lowrank_fx added (y + gate · Δy becomes y, a trained module's select its
    base), the adapter modules and gates."""
    for node in tagged(gm, "add") + tagged(gm, "select"):
        node.replace_all_uses_with(arg_node(node))
    for node in reversed(tagged(gm)):
        gm.graph.erase_node(node)
    for node in list(gm.graph.nodes):
        if node.op == "get_attr" and not node.users:
            gm.graph.erase_node(node)
    for container in (CONTAINER, GATES, ROW_GATES):
        if hasattr(gm, container):
            gm.delete_submodule(container)


def quantized_bias(gm: fx.GraphModule, target: Target, regions, delta: torch.Tensor) -> torch.Tensor:
    """b + Δb of a quantized target (LoRA bias=True): the region's bias parameter, else its probed bias."""
    region = regions[target.sites[0]]
    path = region_bias(gm, region)
    if path is not None:
        return merged_bias(gm.get_parameter(path), delta)
    _, bias = dequantized(gm, target, with_bias=True)
    return merged_bias(bias, delta)
