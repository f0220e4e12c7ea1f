"""The update each adapted target folds, built one target at a time.

For a target with weight W, matrix view (out, in), the active adapters a (gate g_a ≠ 0) give

    ΔW = Σ_a g_a · ΔW_a      (out, in)
    Δb = Σ_a g_a · Δb_a      (out,), only where a unit has a bias update (LoRA bias)

in fp32, or float64 where W or a factor is float64, summed in the order the adapters were
added. A unit that reads the base (DoRA, trainable token rows) gets W's (out, in) matrix, a
quantized W dequantized.

`updates(gm)` says which adapter groups add to which target without building any tensor, and
refuses a graph where an active unit has no ΔW of its weight's shape (`Unit.fold_refusal`: LoRA
with PEFT's grouped-conv layout), before anything is changed;
`target_update(gm, update)` builds one target's ΔW and Δb and refuses NaN or inf. Folding
builds, uses and drops one target's ΔW before the next, so it never holds more than one ΔW
(beside the weights it folds into).

Finite check: a unit may bound max |ΔW| from its parameters (`Unit.delta_bound`; LoRA:
|s| · max_i Σ_k |B_ik| · max |A|); when Σ_a |g_a| · bound_a < fp32 max / 4, ΔW is finite without
looking at it. Otherwise ΔW is checked in one pass (min and max, which propagate NaN).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import torch
from torch import fx

from ..errors import MergeError
from ..graph.gates import gate_value
from ..graph.quantized import dequantized
from ..graph.record import CONTAINER, Record
from ..graph.targets import Target, find_targets

if TYPE_CHECKING:
    from ..methods.base import AdapterGroup


@dataclasses.dataclass
class Update:
    """What folds into one target: (gate, adapter group) per active adapter, in adapter order."""

    target: Target
    parts: list[tuple[float, AdapterGroup]]


def _fold_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype folding adds in: fp32 for fp16/bf16/fp32, float64 stays float64."""
    return torch.promote_types(dtype, torch.float32)


def _adapted_record(gm: fx.GraphModule) -> Record:
    record = Record.find(gm)
    if record is None or not record.adapters:
        raise MergeError(
            "this graph has no adapters to fold; call lfx.rewrite(model, spec, ...) first "
            "(a merged graph is already dense)"
        )
    return record


def updates(gm: fx.GraphModule) -> tuple[dict[str, Target], dict[str, Update]]:
    """(every target of `gm`, {adapted target: its Update}) over the active adapters; no tensor is built."""
    record = _adapted_record(gm)
    targets = find_targets(gm, record.aliases)
    found: dict[str, Update] = {}
    for adapter, info in record.adapters.items():
        gate = gate_value(gm, adapter)
        if gate == 0.0:
            continue
        groups = getattr(gm, CONTAINER)[adapter]
        for name, group in info.groups.items():
            why = groups[group].unit(name).fold_refusal()
            if why is not None:
                raise MergeError(f"cannot fold adapter {adapter!r} into {name}: {why}. Nothing was changed.")
            found.setdefault(name, Update(targets[name], [])).parts.append((gate, groups[group]))
    return targets, found


def base_matrix(gm: fx.GraphModule, target: Target) -> torch.Tensor:
    """The target's base weight as its (out, in) matrix; a quantized one dequantized by its region."""
    if target.quantized:
        return dequantized(gm, target)
    return target.kind.to_matrix(gm.get_parameter(target.weight).detach(), target.layout)


def _add(total: torch.Tensor | None, value: torch.Tensor, gate: float) -> torch.Tensor:
    value = value.to(_fold_dtype(value.dtype))
    if gate != 1.0:  # x · 1.0 is x bit for bit: no pass over ΔW for an adapter at full gate
        value = value * gate
    return value if total is None else total + value


def finite(value: torch.Tensor) -> bool:
    """Whether every entry is finite, in one reduction (min and max propagate NaN and show ±inf)."""
    if value.numel() == 0:
        return True
    low, high = torch.aminmax(value)
    return bool(torch.isfinite(low) & torch.isfinite(high))


def _refuse(name: str) -> MergeError:
    return MergeError(
        f"refusing to fold: the update of {name} has NaN or inf values (diverged training?). "
        "Nothing was changed; load a good checkpoint first."
    )


def bias_update(update: Update) -> torch.Tensor | None:
    bias = None
    for gate, group in update.parts:
        unit_bias = group.unit(update.target.name).delta_bias()
        if unit_bias is not None:
            bias = _add(bias, unit_bias, gate)
    return bias


def bounded(update: Update) -> bool:
    """Whether ΔW is finite by the units' own bounds, Σ_a |g_a| · max |ΔW_a| < fp32 max / 4,
    without building it (LoRA: from B and A; other methods give no bound), and Δb is finite."""
    total = 0.0
    for gate, group in update.parts:
        bound = group.unit(update.target.name).delta_bound(*group.shared_tensors())
        if bound is None:
            return False
        total += abs(gate) * bound
    bias = bias_update(update)
    return total < torch.finfo(torch.float32).max / 4 and (bias is None or finite(bias))


def target_update(gm: fx.GraphModule, update: Update,
                  checked: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(ΔW (out, in), Δb (out,) or None) of one target, summed over its adapters; MergeError on
    NaN / inf, checked on ΔW itself (one pass) unless the units' bounds already show it finite.
    `checked=True`: `check_update` passed on this update and its parameters have not changed."""
    name = update.target.name
    delta: torch.Tensor | None = None
    with torch.no_grad():
        for gate, group in update.parts:
            base = base_matrix(gm, update.target) if group.unit(name).uses_base_weight else None
            delta = _add(delta, group.delta_weight(name, base), gate)
        bias = bias_update(update)
    assert delta is not None, "an Update has at least one part"
    if not checked and not bounded(update) and (not finite(delta) or (bias is not None and not finite(bias))):
        raise _refuse(name)
    return delta, bias


def check_update(gm: fx.GraphModule, update: Update) -> None:
    """MergeError unless the target's update is finite: by the bounds, else by building it (then dropped)."""
    if not bounded(update):
        target_update(gm, update)


def merged_weight(weight: torch.Tensor | None, delta: torch.Tensor, target: Target,
                  gm: fx.GraphModule | None = None) -> torch.Tensor:
    """A new tensor W + ΔW in W's own shape, layout and dtype, added in fp32 (float64 if either is
    float64). A quantized target's W (pass None) is dequantized from `gm`; the sum is dense (out, in),
    in its compute dtype."""
    if target.quantized:
        assert gm is not None, "a quantized target's base weight is read from its graph"
        base = dequantized(gm, target)
        wide = torch.promote_types(_fold_dtype(base.dtype), delta.dtype)
        return (base.to(wide) + delta.to(base.device, wide)).to(base.dtype)
    assert weight is not None, "a dense target's weight is given"
    stored = target.kind.to_weight(delta, target.layout, weight.shape)
    wide = torch.promote_types(_fold_dtype(weight.dtype), stored.dtype)
    return (weight.detach().to(wide) + stored.to(weight.device, wide)).to(weight.dtype)


def merged_bias(bias: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """A new tensor b + Δb (out,) in b's dtype, added in fp32 (float64 if either is float64)."""
    wide = torch.promote_types(_fold_dtype(bias.dtype), delta.dtype)
    return (bias.detach().to(wide) + delta.to(bias.device, wide)).to(bias.dtype)


def add_in_place(tensor: torch.Tensor, delta: torch.Tensor) -> None:
    """tensor ← tensor + delta in the tensor's own storage, bit for bit `merged_weight` /
    `merged_bias`: `delta` is already in the tensor's shape; the sum is taken in fp32 (float64 if
    either is float64) and rounded to the tensor's dtype (no temporary for an fp32 tensor and
    fp32 delta; a bf16/fp16 tensor costs one fp32 temporary of its size)."""
    wide = torch.promote_types(_fold_dtype(tensor.dtype), delta.dtype)
    with torch.no_grad():
        target = tensor.detach()
        if target.dtype == wide:
            target.add_(delta.to(target.device, wide))
        else:
            target.copy_(target.to(wide) + delta.to(target.device, wide))
