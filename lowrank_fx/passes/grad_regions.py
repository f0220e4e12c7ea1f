"""Turn torch.export's grad-mode and autocast regions into plain calls that torch.compile traces.

torch.export records a `with torch.no_grad():` block (Llama's rotary embedding) or a
`with torch.autocast(...):` block as a higher-order op over a subgraph:

    %out = wrap_with_set_grad_enabled(False, %submod, *args)
    %out = wrap_with_autocast(device_type, dtype, enabled, cache_enabled, %submod, *args)

Run eagerly these are fine, but dynamo refuses them as soon as the subgraph reads a symbolic
size of a dynamic-shape graph ("wrap_with_set_grad_enabled: unexpected freevars"), so
`torch.compile(gm, fullgraph=True)` breaks. This pass replaces each such node by a call of
an ordinary function that enters the same context manager and calls the subgraph:

    %out = call_function[grad_region](False, %submod, *args)

which dynamo inlines (grad mode and autocast are context managers it supports) and which
computes exactly what the higher-order op computed, in eager mode too.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import fx

_hop = torch.ops.higher_order


def grad_region(enabled: bool, body, *args):
    """body(*args) with grad mode `enabled`, restored afterwards."""
    with torch.set_grad_enabled(enabled):
        return body(*args)


def autocast_region(device_type: str, dtype, enabled: bool, cache_enabled: bool, body, *args):
    """body(*args) inside torch.autocast(device_type, dtype, enabled, cache_enabled)."""
    with torch.autocast(device_type, dtype=dtype, enabled=enabled, cache_enabled=cache_enabled):
        return body(*args)


REPLACEMENTS: dict[Any, Callable[..., Any]] = {}
if hasattr(_hop, "wrap_with_set_grad_enabled"):
    REPLACEMENTS[_hop.wrap_with_set_grad_enabled] = grad_region
if hasattr(_hop, "wrap_with_autocast"):
    REPLACEMENTS[_hop.wrap_with_autocast] = autocast_region


def unwrap_regions(gm: fx.GraphModule) -> int:
    """Replace grad-mode / autocast higher-order ops in `gm` (in place); returns how many."""
    count = 0
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in REPLACEMENTS:
            node.target = REPLACEMENTS[node.target]
            count += 1
    if count:
        gm.graph.lint()
        gm.recompile()
    return count
