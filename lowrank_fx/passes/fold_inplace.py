"""`lfx.merge(gm, inplace=True)`: fold the adapters into gm's own tensors and make gm itself the
dense graph, as PEFT's merge_and_unload does (no second model in memory).

For every adapted target with weight W (its (out, in) matrix view) and each active adapter a
(gate g_a ≠ 0), in the storage W already has:

    W ← W + Σ_a g_a · ΔW_a     summed in fp32 (float64 if W or ΔW is), rounded to W's dtype:
                               bit for bit the weight `lfx.merge(gm)` builds as a new tensor
    b ← b + Σ_a g_a · Δb_a     (out,), a unit with a bias update (LoRA bias=True)
    P ← C                      Spec.train: the active trained copy C written into the base parameter P

then the adapter nodes, modules and gates leave gm, which is returned. Memory: one ΔW at a
time (and one fp32 temporary of W's size for a bf16 / fp16 W); nothing else is allocated for
the weights folded in place.

What changes with it. gm shares its weights with the model it was captured from (and with
every graph captured from that model), so THE ORIGINAL MODEL NOW HOLDS W + ΔW in those layers,
exactly as PEFT's in-place merge changes the base model. Another graph over the same weights
with adapters of its own (a second lfx.rewrite of the model) now runs on W + ΔW plus its update.
A weight that a PiSSA / OLoRA init gave the graph its own copy of (W_res) is folded there and
copied into the model's tensor, which gm then reads again (passes/residual_base.py).

Where a fold cannot go in place it makes a new tensor, as `lfx.merge(gm)` does, and the
original model keeps its tensor there:
  - a weight the graph also reads elsewhere (GPT-2's lm_head is the token embedding): writing
    W + ΔW into it would change the other use, so the call sites read an untied copy
    (`lowrank_fx_untied.<target>`) and the tied tensor keeps the base values;
  - a quantized target: its weight has no dense storage to add to, so it becomes a dense
    aten.linear on W + ΔW (dequantized, fp32 sum); the quantized tensor is left as it was.

All or nothing. Every update is checked before the first write: a NaN or inf update raises
MergeError with every weight, gm's graph and its adapters unchanged. A LoRA update is shown
finite by its factors' bound, |ΔW_ij| ≤ |s| · max_i Σ_k |B_ik| · max |A| (no ΔW built, so the
in-place fold builds each ΔW once, as PEFT does); the other methods' ΔW is built, checked and
dropped, then built again for the write (about twice the time). Refused up front: a graph
sharded by FSDP2 (its weights are shards on each rank).

Afterwards gm has no adapters: `lfx.merge(gm)` or `lfx.merged_state_dict(gm)` again raise
MergeError ("no adapters to fold") rather than add ΔW twice. The gates of the folded adapters
are set to 0, so a graph that still shares gm's adapter modules and gates (the KV-cache decode
graph of `lfx.generate`) runs the merged weights without adding the update again. A graph with
layer blocks keeps its blocks (and checkpointing).
"""

from __future__ import annotations

import torch
from torch import fx, nn

from ..errors import MergeError
from ..graph.dtensors import is_dtensor
from ..graph.folded import GroupMarks, carry_marks, folded_marks, mark_folded
from ..graph.gates import GATES, active_adapters
from ..graph.record import KEY, Record
from .checkpoint_layers import checkpoint_layers, checkpointed
from .fold_graph import GraphIndex, fold_target, quantized_bias, read_elsewhere, remove_adapter_nodes, set_parameter
from .fold_updates import Update, add_in_place, check_update, merged_bias, merged_weight, target_update, updates
from .layers import flat_view, structure, unstructure
from .quantized_fold import fold_dense, regions_by_output
from .residual_base import return_to_model
from .train_modules import trained_values


def _checked(gm: fx.GraphModule, found: dict[str, Update]) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    """Check every target's update before anything changes (MergeError on NaN / inf) and keep
    the folded (weight, bias or None) of the targets that cannot fold in place."""
    copies = {}
    regions = None
    index = GraphIndex(gm)
    for name, update in found.items():
        target = update.target
        if not target.quantized and not read_elsewhere(gm, index, target):
            check_update(gm, update)  # LoRA: by its factors' bound, no ΔW built
            continue
        delta, bias_delta = target_update(gm, update)
        if target.quantized:
            regions = regions or regions_by_output(gm)
            bias = quantized_bias(gm, target, regions, bias_delta) if bias_delta is not None else None
            copies[name] = (merged_weight(None, delta, target, gm), bias)
        else:
            bias = None
            if bias_delta is not None:
                assert target.bias is not None, "LoRA(bias=True) refuses a target without a bias"
                bias = merged_bias(gm.get_parameter(target.bias), bias_delta)
            copies[name] = (merged_weight(gm.get_parameter(target.weight), delta, target), bias)
        del delta, bias_delta
    return copies


def fold_in_place(gm: fx.GraphModule) -> fx.GraphModule:
    """Fold gm's active adapters into its own weight tensors and remove them from gm; returns gm."""
    sharded = [name for name, param in gm.named_parameters() if is_dtensor(param)]
    if sharded:
        raise MergeError(
            f"cannot fold in place into a graph sharded by FSDP2 ({sharded[0]} is a DTensor shard); "
            "use lfx.merged_state_dict(gm) (gathered: every rank calls it) or lfx.merge(gm)"
        )
    view = flat_view(gm)
    _, found = updates(view)
    trained = trained_values(view)
    copies = _checked(view, found)
    marks = GroupMarks(view)  # graph/folded.py: what each weight holds, so loading it again is refused
    added = {name: marks.of(update.parts) for name, update in found.items()}
    # nothing has changed so far; from here on nothing can fail on the values
    gates = getattr(gm, GATES, None)
    folded = active_adapters(gm)
    recompute = checkpointed(gm)
    kept = unstructure(gm)
    if kept:
        _, found = updates(gm)  # the flat graph's own nodes
    regions = regions_by_output(gm) if any(update.target.quantized for update in found.values()) else {}
    record = Record.require(gm, "lfx.merge")
    remove_adapter_nodes(gm)
    index = GraphIndex(gm)
    for name, update in found.items():
        target = update.target
        if name in copies:
            weight, bias = copies.pop(name)
            if target.quantized:
                fold_dense(gm, target, regions[target.sites[0]], weight, bias)
                continue
            carry_marks(weight, gm.get_parameter(target.weight), added[name])
            fold_target(gm, index, target, weight)
            if bias is not None:
                assert target.bias is not None, "LoRA(bias=True) refuses a target without a bias"
                carry_marks(bias, gm.get_parameter(target.bias), added[name])
                set_parameter(gm, target.bias, nn.Parameter(bias, requires_grad=False))
            continue
        delta, bias_delta = target_update(gm, update, checked=True)  # by _checked, before any write
        weight = gm.get_parameter(target.weight)
        held = {**folded_marks(weight), **added[name]}  # read before the write makes them stale
        add_in_place(weight, target.kind.to_weight(delta, target.layout, weight.shape))
        mark_folded(weight, held)
        if bias_delta is not None:
            assert target.bias is not None, "LoRA(bias=True) refuses a target without a bias"
            bias = gm.get_parameter(target.bias)
            held = {**folded_marks(bias), **added[name]}
            add_in_place(bias, bias_delta)
            mark_folded(bias, held)
        del delta, bias_delta
    with torch.no_grad():
        for name, value in trained.items():
            gm.get_parameter(name).copy_(value)
        for gate in (gates.buffers() if gates is not None else []):
            gate.fill_(0.0)
    return_to_model(gm, folded)  # PiSSA / OLoRA targets: the model's own tensor gets W_res + ΔW
    gm.meta[KEY] = Record(aliases=dict(record.aliases), state_keys=list(record.state_keys))
    gm.graph.lint()
    gm.recompile()
    if kept:
        structure(gm, kept)
        if recompute:
            checkpoint_layers(gm)
    return gm
