"""Per-row adapters: one graph holds K adapters as constants, each batch row picks one.

The graph takes `adapter_ids` (batch,) int64: row b uses adapter `adapter_ids[b]`, an index
into the exported adapter list; any id outside [0, K), by convention **-1**, means no
adapter (the base model). At every adapter call site the update of adapter k is weighted
per row by mask[b, k], mask = one-hot(adapter_ids):

    y = base(x) + Σ_k mask[row, k] · Δ_k(x)

A site whose activation was flattened to (batch·n, in) (GPT-2's Conv1D runs addmm on
(batch·seq, in)) gets the row weights repeated n times. The mask enters the graph as a
buffer swapped per call (torch.func.functional_call), so the exported graph reads it from
`adapter_ids`. Works for every method; each Δ_k is the adapter's own unit.
"""

from __future__ import annotations

import torch
from torch import fx

from ..errors import ExportError
from ..record import KEY
from .adapter_graph import copy_graph, tagged_in

MASK = "lowrank_fx_rows_mask"
IDS = "adapter_ids"
NONE_ID = -1


def row_scale(delta: torch.Tensor, mask: torch.Tensor, k: int) -> torch.Tensor:
    """delta (rows, ...) times mask[:, k] row by row; rows = batch · n, batch = mask.shape[0]."""
    batch, rows = mask.shape[0], delta.shape[0]
    weights = mask[:, k].to(delta.dtype)[:, None].expand(batch, rows // batch).reshape(rows)
    return delta * weights.reshape((rows,) + (1,) * (delta.dim() - 1))


def one_hot(ids: torch.Tensor, count: int) -> torch.Tensor:
    """(batch, count) float mask; rows whose id is outside [0, count) are all zero."""
    return (ids[:, None] == torch.arange(count, device=ids.device)).to(torch.float32)


def _first_dim(node) -> object | None:
    value = node.meta.get("val") if isinstance(node, fx.Node) else None
    return value.shape[0] if isinstance(value, torch.Tensor) and value.dim() else None


def _divides(batch, rows) -> bool:
    if isinstance(batch, int) and isinstance(rows, int):
        return rows % batch == 0
    import sympy  # symbolic sizes are sympy expressions (imported lazily: it is slow to import)

    as_expr = lambda d: d.node.expr if isinstance(d, torch.SymInt) else sympy.Integer(d)  # noqa: E731
    return sympy.simplify(sympy.Mod(as_expr(rows), as_expr(batch))) == 0


def _check_rows(graph: fx.Graph, deltas: list[fx.Node]) -> None:
    """Every adapted activation must lead with the batch (or batch · n) dimension."""
    inputs = [n for n in graph.nodes if n.op == "placeholder" and _first_dim(n) is not None]
    if not inputs:
        return  # no shape metadata (symbolic_trace): the exported graph checks at run time
    batch = _first_dim(inputs[0])
    for delta in deltas:
        rows = _first_dim(delta.args[0])
        if rows is not None and not _divides(batch, rows):
            raise ExportError(
                f"per-row adapters need the batch as the first dimension of every adapted "
                f"activation, but the input of {delta.meta[KEY]['target']} (node {delta.args[0].name}) "
                f"starts with {rows}, not a multiple of the batch {batch} of input {inputs[0].name}. "
                "Capture the model batch-first (e.g. nn.MultiheadAttention(batch_first=True)), "
                "or export with mode='adapters' and one adapter per run."
            )


def per_row_graph(gm: fx.GraphModule, adapters: list[str]) -> fx.GraphModule:
    """A graph with `adapters` whose updates are weighted per row by the buffer MASK (batch, K)."""
    new, graph = copy_graph(gm, adapters)
    new.register_buffer(MASK, torch.zeros(2, len(adapters)))
    deltas = [n for n in tagged_in(graph) if n.meta[KEY]["role"] == "delta"]
    _check_rows(graph, deltas)
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    with graph.inserting_after(placeholders[-1]):
        mask = graph.get_attr(MASK)
    for delta in deltas:
        k = adapters.index(delta.meta[KEY]["adapter"])
        with graph.inserting_after(delta):
            weighted = graph.call_function(row_scale, (delta, mask, k))
        delta.replace_all_uses_with(weighted, delete_user_cb=lambda user: user is not weighted)
    graph.lint()
    new.recompile()
    return new


def row_swap(count: int):
    """The FlatCall swap of a per-row graph: adapter_ids (the one extra input) -> MASK."""

    def swap(inputs: tuple, extra: tuple) -> dict[str, torch.Tensor]:
        (ids,) = extra
        torch._check(ids.shape[0] == inputs[0].shape[0])
        return {MASK: one_hot(ids, count)}

    return swap
