"""`checkpoint_layers(gm)`: recompute each layer block in backward instead of keeping its activations.

A graph structured by passes/layers.py calls each block once. This pass makes each call

    %block = get_attr model.layers.0
    %out   = torch.utils.checkpoint.checkpoint(%block, %hidden, ..., use_reentrant=False)

so autograd keeps only what a block is given (its inputs) and runs the block again, one at a
time, in backward: saved activations fall from every block's to about one block's plus the
block inputs, for one more forward of the blocks. Non-reentrant checkpointing works in eager
mode and under `torch.compile(fullgraph=True)` (Dynamo traces it as a higher-order op whose
nodes the partitioner recomputes); it restores the RNG state, so dropout recomputes the same
masks. Gradients equal those without checkpointing (to rounding: the recomputed forward may
be fused differently when compiled). Every other pass sees the block calls as before
(`passes/layers.block_call`).
"""

from __future__ import annotations

from torch import fx
from torch.utils.checkpoint import checkpoint

from ..errors import SpecError
from ..graph.record import require_graph
from .layers import block_call


def checkpoint_layers(gm: fx.GraphModule) -> list[str]:
    """Make every layer block of `gm` recompute in backward, changing `gm` IN PLACE.

    A block already checkpointed is left as it is.

    Args:
        gm: a graph from `lfx.rewrite(..., layers="auto")` (or `layers=[...]`).

    Returns:
        The paths of the blocks changed ("model.layers.0", ...).

    Raises:
        ModelTypeError: `gm` is not a GraphModule.
        SpecError: `gm` has no layer blocks.
    """
    require_graph(gm, "lfx.checkpoint_layers")
    calls = [(node, call) for node in gm.graph.nodes if (call := block_call(gm, node)) is not None]
    if not calls:
        raise SpecError(
            "this graph has no layer blocks to checkpoint; rewrite it with "
            "lfx.rewrite(model, spec, ..., layers='auto') (or layers=['model.layers.*'] naming them)"
        )
    changed = []
    for node, (path, args) in calls:
        if node.op != "call_module":
            continue
        with gm.graph.inserting_before(node):
            block = gm.graph.get_attr(path)
            call = gm.graph.call_function(checkpoint, (block, *args), {"use_reentrant": False})
        call.meta = dict(node.meta)
        node.replace_all_uses_with(call)
        gm.graph.erase_node(node)
        changed.append(path)
    gm.graph.lint()
    gm.recompile()
    return changed


def checkpointed(gm: fx.GraphModule) -> bool:
    """Whether `gm` calls its blocks through checkpoint (rewrite keeps that when adding an adapter)."""
    return any(node.op == "call_function" and block_call(gm, node) is not None for node in gm.graph.nodes)
