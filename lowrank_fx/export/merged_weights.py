"""Merged export without a folded copy of the weights: W + ΔW is computed as the file is written.

`lfx.merge` (passes/fold.py) allocates a new tensor for every merged weight: for a 0.5B
decoder with LoRA on every linear layer, 1.4 GB before the exporter starts. The exporter itself only needs
the merged graph's STRUCTURE, which is the base graph without adapter nodes (it traces with
fake tensors). So, where folding is a pure weight update:

  structure  copy_graph(gm, []): the base graph, sharing gm's tensors;
  values     the ONNX initializer of each adapted weight W (out, in) becomes a lazy tensor
             W' = W + Σ_k gate_k · ΔW_k, added in fp32 and cast to W's dtype (fold's own
             `merged_weight`), evaluated when the file is written, one weight at a time;
             ΔW_k (out, in) is adapter k's update (LoRA: s · B A, B (out, r), A (r, in)).

"Pure weight update": every adapted weight is dense (not quantized), read by nothing but its
own call sites (a weight tied to another use is folded into an untied copy by `fold`), and
no adapter updates a bias or trains a module. Any other graph is folded with `fold` first.
A non-finite W' raises MergeError when the file is written (the partial file is removed).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import onnx_ir as ir
import torch
from torch import fx

from ..errors import ExportError
from ..passes.fold import fold
from ..passes.fold_graph import GraphIndex, read_elsewhere
from ..passes.fold_updates import Update, bias_update, merged_weight, target_update, updates
from ..passes.train_modules import trained_values
from .adapter_graph import copy_graph


@dataclasses.dataclass
class MergedGraph:
    """The graph to export and, for a lazy merge, how to compute each adapted weight."""

    graph: fx.GraphModule
    weights: dict[str, tuple[torch.Tensor, Callable[[], torch.Tensor]]]  # target: (base W, W')


def _updates(source: fx.GraphModule) -> dict[str, Update] | None:
    """{target: its Update} over the kept adapters, or None where the merge is not a pure
    weight update (see the module docstring)."""
    if trained_values(source):
        return None
    _, found = updates(source)
    index = GraphIndex(source)
    for update in found.values():
        target = update.target
        if target.quantized or bias_update(update) is not None or read_elsewhere(source, index, target):
            return None
    return found


def _merged(source: fx.GraphModule, update: Update) -> torch.Tensor:
    """W + Σ gate · ΔW in W's shape and dtype (fold's arithmetic, one target at a time)."""
    weight = source.get_parameter(update.target.weight)
    delta, _ = target_update(source, update)
    return merged_weight(weight, delta, update.target)


def merged_graph(model: fx.GraphModule, keep: list[str]) -> MergedGraph:
    """The dense graph for a merged export of `model` folding the adapters in `keep`."""
    if not keep:
        return MergedGraph(copy_graph(model, [])[0], {})
    source = copy_graph(model, keep)[0]
    updates = _updates(source)
    if updates is None:
        return MergedGraph(fold(source), {})
    weights = {name: (source.get_parameter(update.target.weight).detach(), lambda u=update: _merged(source, u))
               for name, update in updates.items()}
    return MergedGraph(copy_graph(model, [])[0], weights)


def attach_merged(model: ir.Model, merged: MergedGraph) -> None:
    """Point each adapted weight's initializer at its lazily computed merged value."""
    from torch.onnx._internal.exporter._core import TorchTensor

    by_storage: dict[tuple, ir.Value] = {}
    for value in model.graph.initializers.values():
        if value.const_value is not None and not isinstance(value.const_value, ir.LazyTensor):
            raw = getattr(value.const_value, "raw", None)
            if isinstance(raw, torch.Tensor):
                by_storage[(raw.data_ptr(), tuple(raw.shape), raw.dtype)] = value
    for name, (weight, compute) in merged.weights.items():
        value = by_storage.get((weight.data_ptr(), tuple(weight.shape), weight.dtype))
        if value is None:
            raise ExportError(f"internal: the exported graph has no initializer for {name}'s weight; "
                              "export with lfx.merge(gm) first and report this")
        tensor = value.const_value
        value.const_value = ir.LazyTensor(lambda c=compute, n=value.name: TorchTensor(c(), name=n),
                                          dtype=tensor.dtype, shape=tensor.shape, name=value.name)
