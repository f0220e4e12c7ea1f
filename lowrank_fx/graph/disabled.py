"""`with lfx.adapters_disabled(gm):` the base model inside, the adapters' gates as they were after.

Inside, every gate is 0 (graph/gates.py): each site adds 0 · Δy, so outputs are the base
model's, and trained modules read their base. On leaving, normally or by an exception, each
gate gets back the value it had (adapters added inside stay as they were made; deleted ones are
skipped). Only buffer values change, so a compiled graph does not recompile.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import fx

from .gates import GATES, set_active_adapters
from .record import require_graph


@contextlib.contextmanager
def adapters_disabled(gm: fx.GraphModule) -> Iterator[fx.GraphModule]:
    """Run `gm` as its base model inside the `with` block; the active adapters are restored after.

    Args:
        gm: a graph from `lfx.rewrite` with at least one adapter.

    Returns:
        A context manager yielding `gm`, whose gates are all 0 inside (module docstring).

    Raises:
        ModelTypeError: `gm` is not a GraphModule.
        SpecError: `gm` has no adapters (a merged graph holds them in its weights).
    """
    require_graph(gm, "lfx.adapters_disabled")
    gates = getattr(gm, GATES, None)
    saved = {name: gate.detach().clone() for name, gate in gates.named_buffers()} if gates is not None else {}
    set_active_adapters(gm, [])  # refuses a graph without adapters (a merged one holds them in its weights)
    try:
        yield gm
    finally:
        gates = getattr(gm, GATES, None)
        with torch.no_grad():
            for name, value in saved.items():
                gate = getattr(gates, name, None) if gates is not None else None
                if gate is not None:
                    gate.copy_(value)
