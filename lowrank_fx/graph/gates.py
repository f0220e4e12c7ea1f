"""Adapter gates: which adapters of a graph are active, as data rather than graph structure.

Every adapter has a 0-dim float buffer `gm.lowrank_fx_gates.<adapter>` (1.0 active, 0.0
inactive). At each call site the inject pass adds the update through it:

    %gate = get_attr lowrank_fx_gates.<adapter>               role "gate"
    %y2   = aten.addcmul(%y, %delta, %gate)  = y + gate · Δy  role "add"

`set_active_adapters` only writes the buffers in place, so switching adapters changes no
graph, no module and no guard: a compiled graph keeps running without recompiling (buffers
are inputs of compiled graphs, not constants). The gates are non-persistent: they are not
part of `gm.state_dict()` or of adapter files, and a graph starts with every adapter active.
Folding (`lfx.merge`, `lfx.merged_state_dict`) adds gate · ΔW, so it folds exactly what the
graph computes: inactive adapters are left out.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import fx, nn

from ..errors import SpecError
from .record import KEY, Record, require_graph

GATES = "lowrank_fx_gates"


def add_gate(gm: fx.GraphModule, adapter: str, device: torch.device) -> str:
    """Register the gate of `adapter` (1.0, active) and return its get_attr path."""
    if not hasattr(gm, GATES):
        gm.add_module(GATES, nn.Module())
    getattr(gm, GATES).register_buffer(adapter, torch.ones((), device=device), persistent=False)
    return f"{GATES}.{adapter}"


def gate_value(gm: fx.GraphModule, adapter: str) -> float:
    """The gate of `adapter` as a Python float (1.0 for a graph without gates)."""
    gates = getattr(gm, GATES, None)
    gate = getattr(gates, adapter, None) if gates is not None else None
    return 1.0 if gate is None else float(gate)


def _adapter_names(gm: fx.GraphModule) -> list[str]:
    record = Record.find(gm)
    return list(record.adapters) if record is not None else []


def active_adapters(gm: fx.GraphModule) -> list[str]:
    """The adapters `gm` applies now.

    Args:
        gm: a graph from `lfx.rewrite`.

    Returns:
        Names of the adapters whose gate is non-zero, in the order they were added ([] for a
        graph without adapters).

    Raises:
        ModelTypeError: `gm` is not a GraphModule.
    """
    require_graph(gm, "lfx.active_adapters")
    return [name for name in _adapter_names(gm) if gate_value(gm, name) != 0.0]


def set_active_adapters(gm: fx.GraphModule, adapters: str | Sequence[str] | None) -> None:
    """Make exactly `adapters` active (gate 1.0) and every other adapter inactive (0.0).

    Only the gates' buffer values change, in place: a compiled graph is not recompiled. Which parameters
    train is separate: set `requires_grad` yourself (an inactive adapter gets zero gradients).

    Args:
        gm: a graph from `lfx.rewrite`.
        adapters: one name, a list of names, or [] (or None) for the base model.

    Returns:
        None; `gm`'s gates are set.

    Raises:
        ModelTypeError: `gm` is not a GraphModule.
        SpecError: a name that is not an adapter of `gm`, or a graph without adapters.
    """
    require_graph(gm, "lfx.set_active_adapters")
    names = _names(adapters)
    known = _adapter_names(gm)
    unknown = [name for name in names if name not in known]
    if not known and not names:
        raise SpecError("this graph has no adapters to turn off; it has none (a merged graph holds them in its "
                        "weights: run the original model for the base model's output)")
    if unknown:
        raise SpecError(
            f"no adapter named {', '.join(map(repr, unknown))} in this graph; "
            + (f"its adapters are {', '.join(map(repr, known))}" if known else
               "it has none (lfx.rewrite(model, spec, adapter=...) adds one)")
        )
    gates = getattr(gm, GATES, None)
    with torch.no_grad():
        for name in known:
            getattr(gates, name).fill_(1.0 if name in names else 0.0)


def _names(adapters) -> list[str]:
    """`adapters` as a list of names: a name, a list or tuple of names, or None (none)."""
    if adapters is None:
        return []
    names = [adapters] if isinstance(adapters, str) else adapters
    if not isinstance(names, (list, tuple)) or not all(isinstance(name, str) for name in names):
        raise SpecError(f"adapters must be a name, a list of names, or [] / None for the base model; got {adapters!r}")
    return list(names)


def ungate(graph: fx.Graph) -> None:
    """Back to ungated adds, y + Δy, in `graph` (in place): for exports, where every adapter
    kept in the graph is applied and switching is done by the exported graph's own inputs.
    A trained module's select(base, copy, gate) becomes select(base, copy), which is the copy
    (passes/train_modules.py)."""
    roles = {node: node.meta.get(KEY, {}).get("role") for node in graph.nodes}
    for node, role in roles.items():
        if role == "add" and node.target is torch.ops.aten.addcmul.default:
            node.target, node.args = torch.ops.aten.add.Tensor, node.args[:2]
        elif role == "select":
            node.args = node.args[:2]
    for node, role in reversed(roles.items()):  # users first: a per-row weight reads the gate (passes/row_gates.py)
        if role == "gate" and not node.users:
            graph.erase_node(node)
