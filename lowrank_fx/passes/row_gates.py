"""Per-row adapters in PyTorch: `with lfx.adapter_rows(gm, ["a", "b", None, "a"]): gm(x)` runs
row 0 and 3 with adapter a, row 1 with b, row 2 with the base model, in one batched call.

The first use converts the graph once, in place: every gated add y + gate · Δy (inject.py)
gets a per-row weight, from a buffer `lowrank_fx_row_gates.<adapter>` of shape (n,):

    %rows = get_attr lowrank_fx_row_gates.<adapter>                         role "gate"
    %w    = row_weight(%gate, %rows, %delta, %input)  (rows_total, 1, ..., 1)  role "gate"
    %y2   = aten.addcmul(%y, %delta, %w)       = y + gate · rows[row] · Δy

n = 1 (the buffer is 1.0) outside the context: every row gets gate · Δy, as before. Inside,
n = batch and rows_a[b] = 1.0 where row b names adapter a, else 0.0, with every adapter's gate
at 1. A site whose activation was flattened to (batch · k, in) (GPT-2's Conv1D) repeats each
row's weight k times, so every adapted activation must lead with the batch (batch-first).
Entering and leaving change buffer values (and their length: one more compiled graph for n =
batch, the first time); another mix of the same batch size recompiles nothing. Gradients flow
per row: a mixed batch trains each adapter on its own rows only.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import fx, nn

from ..errors import InputError, SpecError
from ..graph.gates import active_adapters, set_active_adapters
from ..graph.record import KEY, Record, require_graph, tag, tagged

ROW_GATES = "lowrank_fx_row_gates"


def row_weight(gate: torch.Tensor, rows: torch.Tensor, delta: torch.Tensor, batch_of: torch.Tensor) -> torch.Tensor:
    """gate · rows (n,) as (delta.shape[0], 1, ...): row b's weight repeated delta.shape[0] // n times.
    n must be 1 (all rows alike) or the batch, `batch_of`'s first dimension."""
    n, total = rows.shape[0], delta.shape[0]
    if n != 1 and n != batch_of.shape[0]:
        raise InputError(f"lfx.adapter_rows names {n} rows, but the batch has {batch_of.shape[0]}; "
                         "give one adapter name (or None) per row")
    if total % n:
        raise InputError(f"lfx.adapter_rows: an adapted activation has {total} rows, not a multiple of the batch "
                         f"{n}; per-row adapters need batch-first activations (e.g. "
                         "MultiheadAttention(batch_first=True))")
    weight = (gate * rows).to(delta.dtype)
    return weight[:, None].expand(n, total // n).reshape((total,) + (1,) * (delta.dim() - 1))


def _batch_input(graph: fx.Graph) -> fx.Node:
    """The first tensor input that leads with the batch (a placeholder with a non-scalar example)."""
    for node in graph.nodes:
        value = node.meta.get("val")
        if node.op == "placeholder" and isinstance(value, torch.Tensor) and value.dim() > 0:
            return node
    raise InputError("lfx.adapter_rows needs a graph captured by lfx.rewrite (its inputs carry example "
                     "shapes, to tell the batch size); this graph has none")


def enable_rows(gm: fx.GraphModule, gates_from: fx.GraphModule | None = None) -> None:
    """Give `gm`'s gated adds per-row weights (once; a no-op for a graph already converted).
    `gates_from`: a graph whose row gates `gm` shares (the decode graph of generation)."""
    adds = [node for node in tagged(gm, "add") if node.target is torch.ops.aten.addcmul.default]
    if tagged(gm, "select"):
        raise SpecError("lfx.adapter_rows cannot mix adapters that train whole modules (Spec.train): a weight cannot "
                        "differ per row in one op. Export per-row ONNX (lfx.export_onnx(..., mode='per_row')) instead")
    if Record.require(gm, "lfx.adapter_rows").adapters and not adds:
        raise SpecError("lfx.adapter_rows needs a flat graph; this one groups its layers into blocks "
                        "(layers='auto'): rewrite without layers= to mix adapters per row")
    if gates_from is not None:
        gm.add_module(ROW_GATES, row_gates(gates_from))
    row_gates(gm)
    converted = [node for node in adds if isinstance(node.args[2], fx.Node) and node.args[2].target is row_weight]
    if len(converted) == len(adds):
        return
    batch_of = _batch_input(gm.graph)
    for add in adds:
        if add in converted:
            continue
        y, delta, gate = add.args
        adapter, target = add.meta[KEY]["adapter"], add.meta[KEY]["target"]
        with gm.graph.inserting_before(add):
            rows = gm.graph.get_attr(f"{ROW_GATES}.{adapter}")
            weight = gm.graph.call_function(row_weight, (gate, rows, delta, batch_of))
        tag(rows, adapter, target, "gate")
        tag(weight, adapter, target, "gate")
        add.args = (y, delta, weight)
    gm.graph.lint()
    gm.recompile()


def row_gates(gm: fx.GraphModule) -> nn.Module:
    """gm's row gates module, with a (1,) buffer of 1.0 for every adapter that has none yet."""
    if not hasattr(gm, ROW_GATES):
        gm.add_module(ROW_GATES, nn.Module())
    holder = getattr(gm, ROW_GATES)
    for adapter in Record.require(gm, "lfx.adapter_rows").adapters:
        if adapter not in holder._buffers:
            device = next(iter(gm.parameters())).device
            holder.register_buffer(adapter, torch.ones(1, device=device), persistent=False)
    return holder


def check_rows(gm: fx.GraphModule, rows) -> list[str | None]:
    known = list(Record.require(gm, "lfx.adapter_rows").adapters)
    if isinstance(rows, (str, bytes)) or not isinstance(rows, Sequence) or not rows:
        raise InputError(f"rows must be a non-empty list with one adapter name (or None for the base model) per "
                         f"batch row, e.g. {[known[0] if known else 'a', None]!r}; got {rows!r}")
    unknown = sorted({r for r in rows if r is not None and r not in known}, key=str)
    if unknown:
        raise InputError(f"rows name {', '.join(map(repr, unknown))}, not adapters of this graph; its adapters are "
                         f"{', '.join(map(repr, known)) or 'none'} (None means the base model)")
    return list(rows)


def _set_rows(gm: fx.GraphModule, rows: list[str | None] | None) -> None:
    """Write the row gates of `gm` for `rows` (None: 1.0 for every row), in place where the length allows."""
    holder = row_gates(gm)
    for adapter in Record.require(gm, "lfx.adapter_rows").adapters:
        value = torch.ones(1) if rows is None else torch.tensor([float(r == adapter) for r in rows])
        current = holder.get_buffer(adapter)
        if current.shape == value.shape:
            with torch.no_grad():
                current.copy_(value)
        else:
            holder._buffers[adapter] = value.to(current.device)


@contextlib.contextmanager
def adapter_rows(gm: fx.GraphModule, rows: Sequence[str | None]) -> Iterator[fx.GraphModule]:
    """Within the `with` block, batch row b of every call of `gm` (or of a torch.compile of it)
    uses the adapter `rows[b]`, None for the base model.

    The active set and all-row gates are restored after, even on error. The first use
    converts `gm` once, in place (module docstring); outside the block it computes as before.

    Args:
        gm: a flat graph from `lfx.rewrite` (no layer blocks, no `Spec.train` adapter).
        rows: one adapter name, or None for the base model, per batch row.

    Returns:
        A context manager yielding `gm`.

    Raises:
        ModelTypeError: `gm` is not a GraphModule.
        SpecError: `gm` has no adapters, has layer blocks, or an adapter trains whole modules.
        InputError: `rows` is empty or names an unknown adapter; or, on a call inside the
            block, the batch has another number of rows.
    """
    require_graph(gm, "lfx.adapter_rows")
    if Record.find(gm) is None:
        raise SpecError("lfx.adapter_rows takes a graph from lfx.rewrite; this one has no adapters")
    rows = check_rows(gm, rows)
    enable_rows(gm)
    with rows_applied(gm, rows):
        yield gm


@contextlib.contextmanager
def rows_applied(gm: fx.GraphModule, rows: list[str | None]):
    """Every adapter active and the row gates set to `rows`, restored after (`gm` already converted)."""
    previous = active_adapters(gm)
    set_active_adapters(gm, list(Record.require(gm, "lfx.adapter_rows").adapters))
    _set_rows(gm, rows)
    try:
        yield
    finally:
        _set_rows(gm, None)
        set_active_adapters(gm, previous)
