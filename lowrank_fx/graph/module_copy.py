"""A GraphModule that calls like another: the same modules and tensors, its call specs and meta.

Passes that must not touch the graph they are given (capture's plain copy, export's adapter
subsets, the training form of the sites) build a new graph and run it over the old one's
modules. `fx.GraphModule(gm, graph)` shares every module and tensor the graph reads; the pytree
specs that let it take and return the model's own structures (`_in_spec`, `_out_spec`, set
by torch.export) and the `meta` lowrank_fx keeps there must come along too.
"""

from __future__ import annotations

from torch import fx, nn


def copy_call_specs(source: nn.Module, target: nn.Module) -> None:
    """Give `target` the pytree input and output specs of `source`, where it has them."""
    for attr in ("_in_spec", "_out_spec"):
        if hasattr(source, attr):
            setattr(target, attr, getattr(source, attr))


def over_graph(gm: fx.GraphModule, graph: fx.Graph) -> fx.GraphModule:
    """A GraphModule running `graph` over `gm`'s modules and tensors, with gm's call specs and meta."""
    new = fx.GraphModule(gm, graph)
    copy_call_specs(gm, new)
    new.meta.update(getattr(gm, "meta", {}))
    return new
