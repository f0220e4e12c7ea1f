"""The decode graph without its inactive adapters: what one generation call runs.

Every adapter site adds gate · Δy (graph/gates.py), so a decode graph carrying four adapters
computes all four updates every token and multiplies three of them by 0. For one call the
active set is fixed, so `active_graph(decode)` copies the graph once per set of adapters
whose gate is exactly 0 and drops their sites:

    %y2 = aten.addcmul(%y, %delta, %gate)   ->   users of %y2 read %y   (gate == 0)

and the delta, gate and shared nodes that fed only those sites go with them (dead code).
The copy shares decode's modules and tensors (no weight is copied); an active adapter keeps
its gated add, so a gate of any other value still scales its update. The result equals the
full graph's whenever Δy is finite (0 · Δy = 0). Per-row adapters use the full graph.
"""

from __future__ import annotations

from torch import fx

from ..graph.gates import GATES
from ..graph.module_copy import copy_call_specs
from ..graph.record import KEY


def inactive_adapters(decode: fx.GraphModule) -> tuple[str, ...]:
    """Names of decode's adapters whose gate is 0.0 now."""
    gates = getattr(decode, GATES, None)
    if gates is None:
        return ()
    return tuple(name for name, gate in gates.named_buffers() if float(gate) == 0.0)


def without_adapters(decode: fx.GraphModule, inactive: tuple[str, ...]) -> fx.GraphModule:
    """A GraphModule sharing decode's modules, with the sites of the `inactive` adapters removed."""
    graph = fx.Graph()
    graph.set_codegen(decode.graph._codegen)  # the (kwargs, cache list) calling convention
    output = graph.graph_copy(decode.graph, {})
    graph.output(output)
    for node in list(graph.nodes):
        info = node.meta.get(KEY)
        if info and info["role"] == "add" and info["adapter"] in inactive:
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
    pruned = fx.GraphModule(decode, graph, class_name="DecodeGraph")
    pruned.graph.eliminate_dead_code()  # after: purity of a call_module is read from its module
    pruned.recompile()
    copy_call_specs(decode, pruned)
    pruned.train(decode.training)
    return pruned


__all__ = ["inactive_adapters", "without_adapters"]
