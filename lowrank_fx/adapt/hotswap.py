"""Hot-swap slots: a LoRA adapter padded to a fixed rank R, so that loading another LoRA
adapter of any rank r <= R (and any alpha) into it changes tensor values only, never shapes
or Python constants, and a `torch.compile`d graph keeps running without recompiling.

`rewrite(..., max_rank=R)` makes the new adapter a slot. Each unit's factors become

    A (R, in) = [A_r; 0]      B (out, R) = [B_r, 0]      (rank axes from `Unit.rank_axes`)

so B A = B_r A_r (the zero rows and columns add nothing, and get zero gradients), and its
scale s = alpha / r (rsLoRA: alpha / sqrt(r)) becomes a 0-dim buffer `scale`, written in
place on a swap. Loading (`load_adapters`, `load_peft`) into an existing slot copies the
file's r-rank factors into the first r rows / columns, zeroes the rest and fills the scale;
the slot's spec becomes the loaded adapter's. A slot's `state_dict()` (hence its adapter
files, PEFT directories and checkpoints) holds the loaded adapter as it is: factors trimmed to
their rank r, no scale buffer; `load_state_dict` pads them back.

Only plain LoRA can be a slot (not DoRA, LoRTA, RandLoRA, nor a conv with groups > 1): the
others' shapes or constants do not reduce to a padded rank.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx, nn

from ..errors import InputError, SpecError
from ..graph.record import CONTAINER, Record
from ..methods.base import unit_key

SCALE = "scale"
KEEP_BASE = ("default", "nonzero", "gaussian", "orthogonal")  # inits that leave the base weight as it is
SUPPORTED = "plain LoRA (lfx.LoRA without dora=True, on linear, embedding or conv targets with groups=1)"


def check_max_rank(max_rank) -> None:
    if max_rank is not None and (isinstance(max_rank, bool) or not isinstance(max_rank, int) or max_rank < 1):
        raise SpecError("max_rank must be a positive int (the rank hot-swap slots are padded to), or None; got "
                        f"{max_rank!r}")


def _slot_problem(target: str, method) -> str | None:
    """Why `method` on `target` cannot fill a hot-swap slot, or None."""
    if getattr(method, "kind", None) != "lora" or getattr(method, "dora", False):
        name = "DoRA" if getattr(method, "dora", False) else type(method).__name__
        return f"{target} uses {name}; hot-swap supports {SUPPORTED}"
    if method.init not in KEEP_BASE:
        return (f"{target} uses init={method.init!r}, which goes with a changed base weight; a slot swaps factors over "
                f"an unchanged base (inits {', '.join(KEEP_BASE)})")
    return None


def slot_problems(adapter: str, assignment: dict, targets: dict, spec, max_rank: int) -> None:
    """SpecError unless every target of `assignment` (target -> method) can be padded to `max_rank`."""
    problems = [p for t, method in assignment.items() if (p := _slot_problem(t, method))]
    problems += [f"{t} is a conv with groups={targets[t].kind.groups}; hot-swap supports {SUPPORTED}"
                 for t in assignment if getattr(targets[t].kind, "groups", 1) != 1]
    problems += [f"{t} has rank {m.rank} > max_rank {max_rank}; raise max_rank to at least {m.rank}"
                 for t, m in assignment.items() if not problems and m.rank > max_rank]
    if spec.train:
        problems.append("the spec trains whole modules (Spec.train); a hot-swap slot holds LoRA factors only")
    if not assignment:
        problems.append("the spec adapts no target")
    if problems:
        raise SpecError(f"adapter {adapter!r} cannot be a hot-swap slot of rank {max_rank}: " + "; ".join(problems))


def make_slot(gm: fx.GraphModule, adapter: str, max_rank: int) -> None:
    """Pad every unit of `adapter` to `max_rank` and turn its scale into a buffer (in place)."""
    for unit in _units(gm, adapter).values():
        _pad_unit(unit, max_rank)
    Record.require(gm, "lfx.rewrite(max_rank=...)").adapters[adapter].max_rank = max_rank


# A slot is a LoRA unit that gains attributes at run time (loaded_rank, its scale as a buffer):
# the helpers below take it as Any.
def _units(gm: fx.GraphModule, adapter: str) -> dict[str, Any]:
    info = Record.require(gm, "lfx.load_adapter").adapters[adapter]
    container = getattr(gm, CONTAINER)[adapter]
    return {target: container[group].unit(target) for target, group in info.groups.items()}


def _padded(value: torch.Tensor, axis: int, rank: int) -> torch.Tensor:
    shape = list(value.shape)
    shape[axis] = rank
    out = value.new_zeros(shape)
    out.narrow(axis, 0, value.shape[axis]).copy_(value)
    return out


def _pad_unit(unit: Any, max_rank: int) -> None:
    unit.loaded_rank = unit.lora_A.shape[0]
    with torch.no_grad():
        for name, axis in unit.rank_axes.items():
            old = getattr(unit, name)
            setattr(unit, name, nn.Parameter(_padded(old.detach(), axis, max_rank), requires_grad=old.requires_grad))
    scale = float(unit.scale)
    del unit.scale  # the Python float: a compiled graph would bake it in
    unit.register_buffer(SCALE, torch.tensor(scale, dtype=unit.lora_A.dtype, device=unit.lora_A.device),
                         persistent=False)
    unit._register_state_dict_hook(_trim_hook)
    unit._register_load_state_dict_pre_hook(_pad_hook, with_module=True)


def _is_slot(unit: nn.Module) -> bool:
    return hasattr(unit, "loaded_rank")


def slot_scales(module: nn.Module) -> set[str]:
    """Keys of the slots' scale buffers under `module`: runtime state, never written to files."""
    return {f"{name}.{SCALE}".lstrip(".") for name, unit in module.named_modules() if _is_slot(unit)}


def loaded_factor(unit: Any, name: str) -> torch.Tensor:
    """Parameter `name` of `unit` as the loaded adapter has it: a slot's factor trimmed to its rank."""
    value = getattr(unit, name)
    axis = unit.rank_axes.get(name) if _is_slot(unit) else None
    return value if axis is None else value.narrow(axis, 0, unit.loaded_rank)


def _trim_hook(unit, state, prefix, _metadata):
    for name, axis in unit.rank_axes.items():
        if prefix + name in state:
            state[prefix + name] = state[prefix + name].narrow(axis, 0, unit.loaded_rank)
    return state


def _pad_hook(unit, state, prefix, *_):
    """load_state_dict: factors trimmed to the slot's loaded rank are padded back. A state of
    another rank belongs to another adapter, whose scale a state dict does not hold: refused."""
    full = unit.lora_A.shape[0]
    for name, axis in unit.rank_axes.items():
        key = prefix + name
        if key in state and state[key].shape[axis] != full:
            if state[key].shape[axis] != unit.loaded_rank:
                raise InputError(
                    f"{key} has rank {state[key].shape[axis]}, but this hot-swap slot holds an adapter of rank "
                    f"{unit.loaded_rank}: a state dict restores the adapter the slot holds. Swap in another "
                    "adapter with lfx.load_adapters or lfx.load_peft (which also set its scale)"
                )
            state[key] = _padded(state[key], axis, full)


def swap_problems(gm: fx.GraphModule, adapter: str, current: dict, incoming: dict) -> list[str]:
    """What stops the adapter `incoming` (target -> method) from filling slot `adapter` (target -> method)."""
    info = Record.require(gm, "lfx.load_adapter").adapters[adapter]
    problems = []
    only_slot = [t for t in current if t not in incoming]
    only_file = [t for t in incoming if t not in current]
    if only_slot or only_file:
        problems.append("a hot-swapped adapter must adapt exactly the slot's targets: "
                        + "; ".join([f"the slot also adapts {', '.join(only_slot[:8])}"] * bool(only_slot)
                                    + [f"the file also adapts {', '.join(only_file[:8])}"] * bool(only_file)))
    for target, method in incoming.items():
        problem = _slot_problem(target, method)
        if problem:
            problems.append(problem)
        elif method.rank > info.max_rank:
            problems.append(f"{target} has rank {method.rank}, above the slot's max_rank {info.max_rank}; "
                            f"rewrite with max_rank >= {method.rank}")
        elif target in current and bool(method.bias) != bool(current[target].bias):
            problems.append(f"{target}: bias={method.bias} in the file, bias={current[target].bias} in the slot")
    return problems


def swap_in(gm: fx.GraphModule, adapter: str, spec, built: Any, group_of: dict[str, str],
            tensors: dict[str, torch.Tensor]) -> None:
    """Copy the checked `tensors` (keys of `built`, the loaded adapter built from `spec`) into slot
    `adapter`: factors into the leading rows / columns, zeros after, scales filled, all in place."""
    record = Record.require(gm, "lfx.load_adapter")
    units = _units(gm, adapter)
    with torch.no_grad():
        for target, unit in units.items():
            source = built[group_of[target]].unit(target)
            prefix = f"{group_of[target]}.units.{unit_key(target)}."
            rank = source.lora_A.shape[0]
            for name, axis in unit.rank_axes.items():
                slot = getattr(unit, name)
                slot.zero_()
                slot.narrow(axis, 0, rank).copy_(tensors[prefix + name].to(slot.dtype))
            if unit.lora_B_bias is not None:
                unit.lora_B_bias.copy_(tensors[prefix + "lora_B_bias"].to(unit.lora_B_bias.dtype))
            getattr(unit, SCALE).fill_(float(source.scale))
            unit.loaded_rank = rank
    record.adapters[adapter].spec = spec

