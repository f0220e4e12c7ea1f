"""`delete_adapter(gm, adapter)`: remove one adapter from a graph, as if it had never been added.

Every node the adapter added (graph/record.py roles) goes: an "add" y + g · Δy becomes y and a
trained module's "select" becomes its base (passes/train_modules.py), then its unit calls,
slices, gates and tensor reads are erased. Its modules (`gm.lowrank_fx[name]`), its gate buffer
(and per-row gate, after `lfx.adapter_rows`) and its record entry are dropped; so are the
container and the gate module once no adapter is left. A weight its init replaced by a residual
(PiSSA, OLoRA, ...) is the model's own tensor again. Adapter files, PEFT directories and ONNX
exports read the graph and the record, so they no longer see it. A graph with layer blocks (checkpointed or not) is flattened, edited and
structured again, as `rewrite` does when it adds an adapter.
"""

from __future__ import annotations

from torch import fx

from ..deprecation import api_options
from ..errors import SpecError
from ..graph.gates import GATES
from ..graph.record import CONTAINER, KEY, Record, require_graph, tagged
from ..passes.checkpoint_layers import checkpoint_layers, checkpointed
from ..passes.layers import structure, unstructure
from ..passes.residual_base import restore_originals
from ..passes.row_gates import ROW_GATES


@api_options(positional=2, renamed={"name": "adapter"})
def delete_adapter(gm: fx.GraphModule, adapter: str) -> None:
    """Remove adapter `adapter` from `gm`, IN PLACE: its parameters, gate, graph nodes and record entry.

    The graph itself changes (as `rewrite` on a rewritten graph adds in place); as for
    in-place methods in Python, nothing is returned.

    Args:
        gm: a graph from `lfx.rewrite`.
        adapter: the adapter to remove (was `name=`).

    Returns:
        None; `gm` no longer has the adapter.

    Raises:
        ModelTypeError: `gm` is not a GraphModule.
        SpecError: `gm` has no adapter of that name (the message lists its adapters).
    """
    require_graph(gm, "lfx.delete_adapter")
    record = Record.find(gm)
    known = list(record.adapters) if record is not None else []
    if not isinstance(adapter, str) or adapter not in known:
        raise SpecError(f"no adapter named {adapter!r} in this graph; "
                        + (f"its adapters are {', '.join(map(repr, known))}" if known else "it has none"))
    recompute = checkpointed(gm)
    kept = unstructure(gm)
    try:
        _erase(gm, adapter)
    finally:
        if kept:
            structure(gm, kept)
            if recompute:
                checkpoint_layers(gm)
    del record.adapters[adapter]


def _erase(gm: fx.GraphModule, name: str) -> None:
    nodes = [node for node in tagged(gm) if node.meta[KEY]["adapter"] == name]
    for node in nodes:
        if node.meta[KEY]["role"] in ("add", "select"):
            node.replace_all_uses_with(node.args[0])
    for node in reversed(nodes):
        gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()
    restore_originals(gm, name)  # a PiSSA-like init's residual base gives way to the model's W
    container = getattr(gm, CONTAINER)
    del container[name]
    if not len(container):
        delattr(gm, CONTAINER)
    for holder_name in (GATES, ROW_GATES):  # its gate, and its per-row weights if lfx.adapter_rows made them
        holder = getattr(gm, holder_name, None)
        if holder is None:
            continue
        holder._buffers.pop(name, None)
        holder._non_persistent_buffers_set.discard(name)
        if not holder._buffers:
            delattr(gm, holder_name)
