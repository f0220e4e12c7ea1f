"""`lfx.generate(..., rows=[...])`: each batch row generates with its own adapter, in one batch.

The decode graph shares the training graph's row gates, as it shares its gates
(passes/row_gates.py): converting it once and setting gm's row gates steers both.
"""

from __future__ import annotations

import contextlib

import torch
from torch import fx

from ..errors import InputError
from ..passes.row_gates import check_rows, enable_rows, rows_applied


def row_generation(gm: fx.GraphModule, decode: fx.GraphModule, input_ids, adapters, rows):
    """A context that applies `rows` to gm and its decode graph; a no-op context for rows=None."""
    if rows is None:
        return contextlib.nullcontext()
    if adapters is not None:
        raise InputError("give either adapters= (one set for every row) or rows= (one adapter per row), not both")
    rows = check_rows(gm, rows)
    batch = len(input_ids) if isinstance(input_ids, (list, tuple)) else torch.as_tensor(input_ids).shape[0]
    if len(rows) != batch:
        raise InputError(f"rows names {len(rows)} adapters for {batch} prompts; give one name (or None) per prompt")
    enable_rows(decode, gates_from=gm)  # gm itself is left as it is
    return rows_applied(gm, rows)
