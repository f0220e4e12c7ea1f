"""Input statistics of targets over a calibration run, for data-driven inits (CorDA).

`rewrite(..., calibration=run)` calls `run(graph)` on the graph before the adapter is added
(the user runs it on sample data, as PEFT's `run_model`). Meanwhile every call site of a
CorDA target records its activation x, seen as rows (n, in), as PEFT's forward hook does:

    C = (1 / calls) · Σ_calls  x̂ᵀ x̂,      x̂ = x / |max(x)|   (max of the values of that call)

PEFT's hook reads a batch of one (it drops the leading axis); rows of any batch are the same
rows here. The recording nodes leave the graph afterwards, even on error.
"""

from __future__ import annotations

import contextlib

import torch
from torch import fx

from ..errors import SpecError
from ..graph.targets import Target

_SUMS: dict[str, list] = {}  # while a calibration runs: target -> [calls, Σ x̂ᵀ x̂]


def _record(x: torch.Tensor, target: str) -> None:
    rows = x.detach().reshape(-1, x.shape[-1]).float()
    rows = rows / torch.max(rows).abs()
    entry = _SUMS[target]
    entry[0] += 1
    product = rows.t() @ rows
    entry[1] = product if entry[1] is None else entry[1] + product


@contextlib.contextmanager
def recording(gm: fx.GraphModule, names: list[str], targets: dict[str, Target], record, batch_start=None):
    """While open, `gm` calls record(x, target) at every call site of the `names` before the
    site runs (x its activation), and batch_start() first in every call of the graph."""
    nodes = {node.name: node for node in gm.graph.nodes}
    added = []
    if batch_start is not None:
        first = next(node for node in gm.graph.nodes if node.op != "placeholder")
        with gm.graph.inserting_before(first):
            added.append(gm.graph.call_function(batch_start, ()))
    for name in names:
        target = targets[name]
        for i, (site, index) in enumerate(zip(target.sites, target.activations)):
            x = nodes[target.inputs[i]] if target.inputs else nodes[site].args[index]
            with gm.graph.inserting_before(nodes[site]):
                added.append(gm.graph.call_function(record, (x, name)))
    gm.recompile()
    try:
        yield
    finally:
        for node in reversed(added):
            gm.graph.erase_node(node)
        gm.recompile()


def check_calibration(init: str, calibration) -> None:
    if not callable(calibration):
        raise SpecError(f"LoRA init {init!r} needs input statistics: pass rewrite(..., calibration=run) with a "
                        f"function run(graph) that calls the graph on sample data (got calibration={calibration!r})")


def input_covariances(gm: fx.GraphModule, names: list[str], targets: dict[str, Target], calibration) -> dict:
    """{target: C (in, in) fp32} for `names`, from one `calibration(gm)` run."""
    check_calibration("corda", calibration)
    _SUMS.update({name: [0, None] for name in names})
    try:
        with recording(gm, names, targets, _record), torch.no_grad():
            calibration(gm)
        sums = {name: _SUMS[name] for name in names}
    finally:
        for name in names:
            _SUMS.pop(name, None)
    unseen = [name for name, (calls, _) in sums.items() if calls == 0]
    if unseen:
        raise SpecError(f"the calibration run never reached {', '.join(unseen[:5])}: CorDA needs their inputs; "
                        "make run(graph) call the graph on data that goes through every target")
    return {name: total / calls for name, (calls, total) in sums.items()}
