"""Put tensors into a model's parameter and buffer slots by state_dict key, and take them back.

`Slots(model)` assigns as `load_state_dict(..., assign=True)` does: a parameter slot gets a
Parameter (a plain tensor is wrapped with the old parameter's requires_grad; a Parameter, such as
a bitsandbytes Params4bit, goes in as it is), a buffer slot the tensor. One tensor assigned to
several keys becomes one Parameter, so keys that share a value stay tied. `undo()` puts back
every tensor it replaced, newest first: exact, as the old tensors are only held, never copied.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class Slots:
    def __init__(self, model: nn.Module):
        self.model = model
        self._replaced: list[tuple[nn.Module, str, str, torch.Tensor]] = []  # (module, kind, leaf, old)
        self._wrapped: dict[int, tuple[torch.Tensor, nn.Parameter]] = {}  # holds the tensor: its id stays unique

    def find(self, key: str) -> tuple[nn.Module, str, str] | None:
        """(module, "param" | "buffer", leaf) of a state_dict key, or None if it names neither."""
        owner, _, leaf = key.rpartition(".")
        try:
            module = self.model.get_submodule(owner) if owner else self.model
        except AttributeError:
            return None
        if module._parameters.get(leaf) is not None:
            return module, "param", leaf
        if module._buffers.get(leaf) is not None:
            return module, "buffer", leaf
        return None

    def assign(self, key: str, value: torch.Tensor) -> None:
        found = self.find(key)
        assert found is not None, "callers check that every key has a slot first (_check_keys)"
        module, kind, leaf = found
        table: dict[str, Any] = module._parameters if kind == "param" else module._buffers
        old = table[leaf]
        if kind == "param" and not isinstance(value, nn.Parameter):
            if id(value) not in self._wrapped:
                self._wrapped[id(value)] = (value, nn.Parameter(value, requires_grad=old.requires_grad))
            value = self._wrapped[id(value)][1]
        self._replaced.append((module, kind, leaf, old))
        table[leaf] = value

    def undo(self) -> None:
        for module, kind, leaf, old in reversed(self._replaced):
            table: dict[str, Any] = module._parameters if kind == "param" else module._buffers
            table[leaf] = old
        self._replaced.clear()


def same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether `a` and `b` are one tensor's data: same storage, offset, shape, strides and dtype."""
    if a is b:
        return True
    if type(a) not in (torch.Tensor, nn.Parameter) or type(b) not in (torch.Tensor, nn.Parameter):
        return False  # a tensor subclass (quantized, DTensor) is the same only as itself
    return (a.device == b.device and a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride()
            and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
            and a.storage_offset() == b.storage_offset())
