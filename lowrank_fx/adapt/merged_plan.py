"""Which tensor each of the ORIGINAL model's state_dict keys gets when adapters are folded, and
the folded values, one target at a time.

`merged_plan(gm)` decides every key without building a tensor:
  - kept: the graph's own tensor (detached, not copied), or a trained module's active copy
    (Spec.train), for keys no adapter folds into. Tied names of one tensor share one value.
  - folded: key → (target, "weight" | "bias"): W + ΔW (b + Δb), built by `folded_values`.
    A folded weight goes to the keys of the module that calls it; another name tied to the same
    tensor (GPT-2's transformer.wte.weight beside lm_head.weight) keeps the original values when
    the graph reads it elsewhere: a conflict, which the callers refuse or untie.
  - quantized layers: their keys `<module>.weight` / `<module>.bias` get the dense values
    (dequantized W, plus ΔW in fp32 where adapted); a format's other keys (bitsandbytes'
    `weight.absmax`, `SCB`) are left out.

`folded_values(gm, plan, names)` then yields, target by target, its new tensors: one ΔW is
built, added and dropped before the next target's, so peak memory beyond the values handed out
is one ΔW and one sum.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import torch
from torch import fx

from ..errors import MergeError
from ..graph.folded import GroupMarks, carry_marks
from ..graph.quantized import dequantized
from ..graph.record import Record
from ..graph.targets import Target
from ..passes.fold_graph import GraphIndex, read_elsewhere
from ..passes.fold_updates import Update, merged_bias, merged_weight, target_update, updates
from ..passes.quantized_fold import region_bias, regions_by_output
from ..passes.train_modules import with_trained


@dataclasses.dataclass
class _MergedPlan:
    keys: list[str]  # the state's keys, in the original model's order
    kept: dict[str, torch.Tensor]  # key -> the graph's own tensor (detached) or a trained copy
    folded: dict[str, list[tuple[str, str]]]  # target -> [(key, "weight" | "bias")], its folded keys
    shapes: dict[str, torch.Size]  # key -> shape, every key but a quantized layer's
    targets: dict[str, Target]  # every target of the graph
    updates: dict[str, Update]  # adapted target -> what folds into it
    conflicts: list[tuple[str, str]]  # (folded key, tied key that keeps the original values)

    def keyed(self, name: str, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """{key: value} of target `name` from its {"weight" | "bias": value}; keys of one value share it."""
        return {key: values[leaf] for key, leaf in self.folded[name] if leaf in values}

    @property
    def quantized(self) -> dict[str, Target]:
        return {name: t for name, t in self.targets.items() if t.quantized}


def quantized_key(key: str, quantized) -> tuple[str, str] | None:
    """(quantized target, "weight" | "bias" | "") for a key under a quantized layer, else None."""
    for name in quantized:
        if key.startswith(name + "."):
            leaf = key[len(name) + 1:]
            return name, leaf if leaf in ("weight", "bias") else ""
    return None


def _gm_name(record, key: str, gm_names) -> str | None:
    """The GraphModule's name for the original model's tensor `key`."""
    for name in record.aliases.get(key, [key]):
        if name in gm_names:
            return name
    return None


def _owns(key: str, target: Target) -> bool:
    return key.rsplit(".", 1)[0] == target.name or key == target.weight


def _has_bias_update(update: Update) -> bool:
    return any(group.unit(update.target.name).delta_bias() is not None for _, group in update.parts)


def merged_plan(gm: fx.GraphModule) -> _MergedPlan:
    """Where every original key's value comes from (`gm` flat: passes/layers.flat_view)."""
    targets, found = updates(gm)  # MergeError for a graph without adapters
    record = Record.require(gm, "lfx.merged_state_dict")
    tensors = with_trained(gm, dict(gm.state_dict(keep_vars=True)))  # trained modules: the active copies
    quantized = {name for name, t in targets.items() if t.quantized}
    folds = []  # (graph tensor, target, leaf, whether the graph reads the tensor elsewhere)
    index = GraphIndex(gm)
    for name, update in found.items():
        if name not in quantized:
            t = update.target
            folds.append((tensors[t.weight], t, "weight", read_elsewhere(gm, index, t)))
            if _has_bias_update(update):
                assert t.bias is not None, "LoRA(bias=True) refuses a target without a bias"
                folds.append((tensors[t.bias], t, "bias", False))
    plan = _MergedPlan(list(record.state_keys), {}, {}, {}, targets, found, [])
    detached = {}
    for key in record.state_keys:
        under = quantized_key(key, quantized)
        if under is not None:
            if under[1]:  # a format's own keys are left out
                plan.folded.setdefault(under[0], []).append((key, under[1]))
            continue
        graph_name = _gm_name(record, key, tensors)
        if graph_name is None:
            raise MergeError(f"the graph has no tensor for the original model's {key!r}; "
                             "was it captured from another model?")
        value = tensors[graph_name]
        plan.shapes[key] = value.shape
        owners = [entry[1:] for entry in folds if entry[0] is value]
        owner = next((entry for entry in owners if _owns(key, entry[0])), owners[0] if owners else None)
        if owner is not None:
            target, leaf, shared_use = owner
            if _owns(key, target) or not shared_use:
                plan.folded.setdefault(target.name, []).append((key, leaf))
                continue
            owner_key = next(k for k in record.aliases.get(key, [key]) if _owns(k, target))
            plan.conflicts.append((owner_key, key))
        if id(value) not in detached:  # tied names that keep one value stay one tensor
            detached[id(value)] = value.detach()
        plan.kept[key] = detached[id(value)]
    return plan


def _quantized_values(gm: fx.GraphModule, target: Target, update: Update | None, regions) -> dict[str, torch.Tensor]:
    """{"weight": dense W (+ ΔW), "bias": b (+ Δb) if the layer has one} of a quantized layer."""
    region = regions[target.sites[0]]
    delta = bias_delta = None
    if update is not None:
        delta, bias_delta = target_update(gm, update)
    values = {"weight": merged_weight(None, delta, target, gm) if delta is not None else dequantized(gm, target)}
    path = region_bias(gm, region)
    bias = gm.get_parameter(path).detach() if path is not None else None
    if bias_delta is not None:
        bias = merged_bias(bias if bias is not None else dequantized(gm, target, with_bias=True)[1], bias_delta)
    if bias is not None:
        values["bias"] = bias
    return values


def _dense_values(gm: fx.GraphModule, target: Target, update: Update) -> dict[str, torch.Tensor]:
    delta, bias_delta = target_update(gm, update)
    values = {"weight": merged_weight(gm.get_parameter(target.weight), delta, target)}
    if bias_delta is not None:
        assert target.bias is not None, "LoRA(bias=True) refuses a target without a bias"
        values["bias"] = merged_bias(gm.get_parameter(target.bias), bias_delta)
    return values


def folded_values(gm: fx.GraphModule, plan: _MergedPlan, names=None) -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
    """(target, {"weight": new tensor, "bias": new tensor if it has one}) for each target of
    `plan.folded` (or of `names`), one at a time. MergeError on a NaN / inf update, when it is reached."""
    regions = regions_by_output(gm) if plan.quantized else {}
    marks = GroupMarks(gm)
    for name in plan.folded:
        if names is not None and name not in names:
            continue
        target, update = plan.targets[name], plan.updates.get(name)
        if target.quantized:
            values = _quantized_values(gm, target, update, regions)
        else:
            assert update is not None, "a dense target is in plan.folded for its update"
            values = _dense_values(gm, target, update)
            for leaf, value in values.items():  # graph/folded.py: loading these adapters again is refused
                carry_marks(value, gm.get_parameter(getattr(target, leaf)), marks.of(update.parts))
        yield name, values
