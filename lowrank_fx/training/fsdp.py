"""FSDP2 per layer: `shard_layers(gm)` shards each layer block, then the rest, across the ranks.

A graph rewritten with `layers="auto"` (passes/layers.py) has one submodule per layer that
owns the layer's base weights and adapter units. `fully_shard(block)` on each makes one
communication group per layer: in forward a block's weights are all-gathered just before it
runs and freed after it, and its adapters' gradients are reduce-scattered as its backward
finishes, so a rank keeps about 1/world of the base weights resident. `fully_shard(gm)` last
takes what no block owns (embeddings, head, final norm, factors shared by every layer). The
root container (`gm.lowrank_fx`) reaches the blocks' adapter units too; those parameters are
passed to it as `ignored_params`, as their block manages them already.

Adapter files, PEFT directories and trainer checkpoints gather the shards (every rank calls
them, rank 0 writes) and load back into a sharded graph shard by shard (graph/dtensors.py).
"""

from __future__ import annotations

from torch import fx, nn

from ..errors import SpecError
from ..passes.layers import blocks


def shard_layers(gm: fx.GraphModule, mesh=None) -> list[str]:
    """`fully_shard` every block of `gm`, then `gm` itself, in place; the blocks' paths.

    `mesh`: a 1-D DeviceMesh (default: every rank of the default process group)."""
    from torch.distributed.fsdp import fully_shard

    paths = blocks(gm)
    if not paths:
        raise SpecError("FSDP shards a graph per layer block and this graph has none; rewrite it with "
                        "lfx.rewrite(model, spec, ..., layers='auto')")
    owned: set[nn.Parameter] = set()
    for path in paths:
        block = gm.get_submodule(path)
        fully_shard(block, mesh=mesh)
        owned.update(block.parameters())
    fully_shard(gm, mesh=mesh, ignored_params=owned)
    return paths
