"""Marks on folded weights: which adapters a weight already holds, so that loading one of them
again, which would make it W + 2·ΔW, is refused.

Every fold that writes a weight or bias (`lfx.load_merged`, `lfx.merge`, `lfx.merge(gm,
inplace=True)`, the new tensors of `lfx.merged_state_dict`) marks it with the fingerprint of
each adapter group folded in: sha256 over the group's state (names inside the group, dtypes,
shapes, bytes), with the adapter's name for messages. Loaders (files/into_graph.py) compute the
same fingerprint of the values they are about to load and refuse a match.

The mark sits on the tensor's storage, so it stays with the weight through `nn.Parameter`
wrapping and into every graph captured from the model (a capture shares the model's tensors).
It records the tensor's version counter: a later in-place write (`model.load_state_dict` of the
original weights) makes it stale, and a stale mark is ignored. Not marked, so not refused:
values copied into other tensors (`model.load_state_dict(state)` without `assign=True` copies
the numbers, not the mark), a model moved or cast to new tensors, quantized layers requantized
by `load_merged`, and FSDP2 shards.
"""

from __future__ import annotations

import hashlib

import torch
from torch import fx

from .dtensors import is_dtensor
from .record import CONTAINER

ATTR = "lowrank_fx_folded"  # on a storage: (version of the tensor when marked, {fingerprint: adapter})


def fingerprint(tensors: dict[str, torch.Tensor]) -> str | None:
    """sha256 of an adapter group's tensors by their names inside the group; None for shards."""
    digest = hashlib.sha256()
    for key in sorted(tensors):
        tensor = tensors[key]
        if is_dtensor(tensor) or tensor.is_meta:
            return None
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{key}|{tensor.dtype}|{list(tensor.shape)}|".encode())
        # an ndarray is a buffer (no copy); numpy's stubs do not say so for Python 3.10
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())  # type: ignore[arg-type]
    return "sha256:" + digest.hexdigest()


def _storage_and_version(tensor: torch.Tensor):
    try:
        return tensor.untyped_storage(), tensor._version
    except (RuntimeError, NotImplementedError, TypeError, AttributeError):  # subclasses, inference tensors
        return None, None


def folded_marks(tensor: torch.Tensor) -> dict[str, str]:
    """{fingerprint: adapter} of the adapters folded into `tensor` (empty if none, or if stale)."""
    storage, version = _storage_and_version(tensor)
    mark = getattr(storage, ATTR, None)
    return dict(mark[1]) if mark is not None and mark[0] == version else {}


def mark_folded(tensor: torch.Tensor, marks: dict[str, str]) -> None:
    """Record `marks` ({fingerprint: adapter}) as what `tensor` now holds, at its current version."""
    storage, version = _storage_and_version(tensor)
    if storage is not None and marks:
        setattr(storage, ATTR, (version, dict(marks)))


def carry_marks(new: torch.Tensor, base: torch.Tensor, added: dict[str, str]) -> None:
    """Mark `new`, computed from `base` plus a fold, with base's marks and `added`."""
    mark_folded(new, {**folded_marks(base), **added})


def marks_in(gm: torch.nn.Module) -> dict[str, str]:
    """{fingerprint: adapter} over every parameter and buffer of `gm`."""
    found = {}
    for tensor in [*gm.parameters(), *gm.buffers()]:
        found.update(folded_marks(tensor))
    return found


class GroupMarks:
    """Fingerprints of a graph's adapter groups, each hashed once, on first use."""

    def __init__(self, gm: fx.GraphModule):
        container = getattr(gm, CONTAINER, {})
        self._adapter = {id(group): name for name, groups in container.items() for group in groups.values()}
        self._prints: dict[int, str | None] = {}

    def of(self, parts) -> dict[str, str]:
        """{fingerprint: adapter} of the (gate, group) pairs of a fold update."""
        marks = {}
        for _, group in parts:
            if id(group) not in self._prints:
                self._prints[id(group)] = fingerprint(group.state_dict())
            mark = self._prints[id(group)]
            if mark is not None:
                marks[mark] = self._adapter.get(id(group), "?")
        return marks
