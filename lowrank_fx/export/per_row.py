"""Per-row adapters: one graph holds K adapters as constants, each batch row picks one.

The graph takes `adapter_ids` (batch,) int64: row b uses adapter `adapter_ids[b]`, an index
into the exported adapter list; any id outside [0, K), by convention **-1**, means no
adapter (the base model). At every adapter call site the update of adapter k is weighted
per row by mask[b, k], mask = one-hot(adapter_ids):

    y = base(x) + Σ_k mask[row, k] · Δ_k(x)

A site whose activation was flattened to (batch·n, in) (GPT-2's Conv1D runs addmm on
(batch·seq, in)) gets the row weights repeated n times. The mask enters the graph as a
buffer swapped per call (torch.func.functional_call), so the exported graph reads it from
`adapter_ids`. Works for every method; each Δ_k is the adapter's own unit, except that
the LoRA adapters of a site are stacked into one rank-ΣR pair (per_row_lora.py; faster).
Trained modules (`Spec.train`): each row reads its own adapter's copy (per_row_trained.py).
"""

from __future__ import annotations

import operator
from functools import partial
from typing import cast

import torch
from torch import fx, nn

from ..errors import ExportError
from ..graph.fx_args import arg_node, target_name
from ..graph.record import KEY
from ..methods.base import unit_key
from ..methods.lora_unit import LoRAUnit
from .adapter_graph import copy_graph, tagged_in
from .per_row_lora import StackedLoRA, row_weights, stackable
from .per_row_trained import per_row_trained

MASK = "lowrank_fx_rows_mask"
ROWS = "lowrank_fx_rows"  # modules added by this pass (stacked LoRA sites)
IDS = "adapter_ids"
NONE_ID = -1


def row_scale(delta: torch.Tensor, mask: torch.Tensor, k: int) -> torch.Tensor:
    """delta (rows, ...) times mask[:, k] row by row; rows = batch · n, batch = mask.shape[0]."""
    rows = delta.shape[0]
    weights = row_weights(mask[:, k:k + 1].to(delta.dtype), rows)  # (rows, 1)
    return delta * weights.reshape((rows,) + (1,) * (delta.dim() - 1))


def one_hot(ids: torch.Tensor, count: int) -> torch.Tensor:
    """(batch, count) float mask; rows whose id is outside [0, count) are all zero."""
    return (ids[:, None] == torch.arange(count, device=ids.device)).to(torch.float32)


def _first_dim(node) -> object | None:
    """Size of a node's first dimension from its shape metadata (int or SymInt), if known."""
    value = node.meta.get("val") if isinstance(node, fx.Node) else None
    return value.shape[0] if isinstance(value, torch.Tensor) and value.dim() else None


def _divides(batch, rows) -> bool:
    if isinstance(batch, int) and isinstance(rows, int):
        return rows % batch == 0
    import sympy  # symbolic sizes are sympy expressions (imported lazily: it is slow to import)

    def expr(size):
        return size.node.expr if isinstance(size, torch.SymInt) else sympy.Integer(size)

    return sympy.simplify(sympy.Mod(expr(rows), expr(batch))) == 0


def _check_rows(graph: fx.Graph, deltas: list[fx.Node]) -> None:
    """Every adapted activation must lead with the batch (or batch · n) dimension."""
    inputs = [n for n in graph.nodes if n.op == "placeholder" and _first_dim(n) is not None]
    if not inputs:
        return  # no shape metadata (a symbolic_trace graph): the layout cannot be checked
    batch = _first_dim(inputs[0])
    for delta in deltas:
        rows = _first_dim(delta.args[0])
        if rows is not None and not _divides(batch, rows):
            raise ExportError(
                f"per-row adapters need the batch as the first dimension of every adapted "
                f"activation, but the input of {delta.meta[KEY]['target']} (node {arg_node(delta).name}) "
                f"starts with {rows}, not a multiple of the batch {batch} of input {inputs[0].name}. "
                "Capture the model batch-first (e.g. nn.MultiheadAttention(batch_first=True)), "
                "or export with mode='adapters' and one adapter per run."
            )


def _leads_with_batch(graph: fx.Graph, node: fx.Node) -> bool:
    """Whether `node`'s first dimension is a multiple of the batch (True when shapes are unknown)."""
    inputs = [n for n in graph.nodes if n.op == "placeholder" and _first_dim(n) is not None]
    rows = _first_dim(node)
    return not inputs or rows is None or _divides(_first_dim(inputs[0]), rows)


def _sites(deltas: list[fx.Node]) -> dict[tuple, list[fx.Node]]:
    """Delta nodes grouped by call site: (target, activation node) -> the adapters' deltas."""
    sites: dict[tuple, list[fx.Node]] = {}
    for delta in deltas:
        sites.setdefault((delta.meta[KEY]["target"], delta.args[0]), []).append(delta)
    return sites


def _stack(gm: fx.GraphModule, graph: fx.Graph, deltas: list[fx.Node], adapters: list[str], mask: fx.Node,
           name: str) -> None:
    """Replace the LoRA deltas of one site by one StackedLoRA call (per_row_lora.py)."""
    adds = [next(iter(d.users)) for d in deltas]
    order = {node: i for i, node in enumerate(graph.nodes)}
    carrier = min(adds, key=order.__getitem__)
    units = [cast(LoRAUnit, gm.get_submodule(target_name(d))) for d in deltas]  # stackable ones only
    index = [adapters.index(d.meta[KEY]["adapter"]) for d in deltas]
    gm.get_submodule(ROWS).add_module(name, StackedLoRA(units, index))
    with graph.inserting_before(carrier):
        stacked = graph.call_module(f"{ROWS}.{name}", (deltas[0].args[0], mask))
    stacked.meta[KEY] = dict(carrier.meta[KEY], role="delta")
    carrier.replace_input_with(arg_node(carrier, 1), stacked)
    for add, delta in zip(adds, deltas):
        if add is not carrier:
            add.replace_all_uses_with(arg_node(add))
            graph.erase_node(add)
        graph.erase_node(delta)


def per_row_graph(gm: fx.GraphModule, adapters: list[str], stack_lora: bool = True) -> fx.GraphModule:
    """A graph with `adapters` whose updates are weighted per row by the buffer MASK (batch, K).

    stack_lora: run the LoRA adapters of each site as one stacked pair (per_row_lora.py).
    """
    new, graph = copy_graph(gm, adapters)
    new.register_buffer(MASK, torch.zeros(2, len(adapters)))
    new.add_module(ROWS, nn.Module())
    deltas = [n for n in tagged_in(graph) if n.meta[KEY]["role"] == "delta"]
    _check_rows(graph, deltas)
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    with graph.inserting_after(placeholders[-1]):
        mask = graph.get_attr(MASK)
    for i, ((target, _), site) in enumerate(_sites(deltas).items()):
        # stacking replaces the add that reads a delta: a delta read through a row slice (MHA) stays generic
        lora = [d for d in site if stack_lora and stackable(new.get_submodule(target_name(d)))
                and next(iter(d.users)).meta[KEY]["role"] == "add"]
        if len(lora) > 1:
            _stack(new, graph, lora, adapters, mask, f"{unit_key(target)}_{i}")
        for delta in (d for d in site if d not in lora or len(lora) == 1):
            k = adapters.index(delta.meta[KEY]["adapter"])
            with graph.inserting_after(delta):
                weighted = graph.call_function(row_scale, (delta, mask, k))
            delta.replace_all_uses_with(weighted, delete_user_cb=partial(operator.is_not, weighted))
    per_row_trained(graph, adapters, mask, lambda node: _leads_with_batch(graph, node))
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
