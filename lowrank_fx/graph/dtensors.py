"""Tensors of a graph sharded by FSDP2 (`fully_shard`) are DTensors: each rank holds a shard.

Adapter files and checkpoints hold whole tensors. Saving gathers each DTensor (a collective:
every rank must take part, rank 0 then writes); loading cuts a whole tensor into this rank's
shard with the slot's own mesh and placements.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, TypeGuard

import torch
from torch import nn

if TYPE_CHECKING:
    from torch.distributed.tensor import DTensor


def is_dtensor(value) -> TypeGuard[DTensor]:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch build without torch.distributed
        return False
    return isinstance(value, DTensor)


def gathered(value: torch.Tensor) -> torch.Tensor:
    """The whole tensor: `value` itself, or a DTensor's full tensor (a collective)."""
    return value.full_tensor() if is_dtensor(value) else value


def like_slot(slot: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """`value` (a whole tensor) laid out as `slot`: sharded the same way if `slot` is a DTensor."""
    if not is_dtensor(slot):
        return value
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(value.to(slot.device_mesh.device_type), slot.device_mesh, slot.placements)


def writes_files(sharded: bool) -> bool:
    """Whether this process writes what it saved: always, unless it saved gathered shards
    (every rank did) and is not rank 0."""
    return not sharded or torch.distributed.get_rank() == 0


@contextlib.contextmanager
def whole(root: nn.Module):
    """While inside, every DTensor parameter of `root` (a graph, or only its adapter
    container) is replaced, on its own module, by its whole value (all-gathered: every rank
    must enter), so code that reads parameters by name sees plain tensors; the shards are put
    back on leaving. Yields whether anything was sharded."""
    swapped = []
    for module in root.modules():
        for name, param in list(module._parameters.items()):
            if param is not None and is_dtensor(param):
                swapped.append((module, name, module._parameters[name]))
                module._parameters[name] = nn.Parameter(param.full_tensor().detach(), requires_grad=param.requires_grad)
    try:
        yield bool(swapped)
    finally:
        for module, name, param in swapped:
            module._parameters[name] = param
