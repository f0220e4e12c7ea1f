"""The module lists of a model that repeat one block, and how much of each capture must trace.

A decoder is a module list of 16-80 blocks that run the same code on their own weights.
Tracing all of them costs time in proportion to depth (about 0.4 s per Qwen2.5-0.5B block on
2 CPU cores) for a graph that repeats itself. So capture traces a *prefix* of each list, with
the model temporarily holding only that prefix (`prefixes`), and `passes/repeat_blocks.py`
then writes the remaining blocks as copies of a traced one over their own weights.

Block kinds. Two children of a list are of one kind when everything their forward can see
but the tensors' values agrees, module by module: class, parameter and buffer names, shapes,
dtypes and grad flags, and every other attribute (an int, a string, a config object by
identity, ...). The one attribute allowed to differ is a layer index (`layer_idx`,
`layer_id`, ... equal to the child's position, or one more): with `use_cache=False` it only
names a cache slot. So a hybrid model's sliding-window and full-attention layers, or
DeepSeek's dense first layers before MoE ones, are different kinds.

The prefix: the shortest run of children, from the first, in which every kind that occurs
after position 0 is seen at a position >= 1 (so its traced copy reads the output of a block
before it). Llama: 2 children; Gemma-2's alternating kinds: 3. When child 0 is of a kind of
its own, at least 3, so that a value child 0 computes for every later child (T5's position
bias) is seen read by a child that does not follow it directly. A prefix keeps the children's
own names and positions, so a forward that indexes the config by position
(`config.layer_types[i]`) still reads the right entry for every traced child.
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch
from torch import nn

INDEX_NAMES = frozenset({"layer_idx", "layer_id", "layer_index", "layer_number", "block_idx", "idx"})


@dataclasses.dataclass
class BlockList:
    """One module list whose children repeat: `path` ("model.layers"), the kind of each child
    (0, 1, ... by first appearance) and `keep`, the number of children capture traces."""

    path: str
    kinds: list[int]
    keep: int

    def template(self, kind: int) -> int:
        """The traced position (>= 1) whose graph the children of `kind` copy: the last one."""
        return max(j for j in range(1, self.keep) if self.kinds[j] == kind)

    @property
    def first_unique(self) -> bool:
        """Whether child 0 is of a kind no other child has (T5's block with the position bias)."""
        return self.kinds[0] not in self.kinds[1:]


def _value(value, index: int, name: str):
    """What an attribute contributes to a block's kind: plain values by value, objects by identity."""
    if name in INDEX_NAMES and isinstance(value, int) and value in (index, index + 1):
        return "<layer index>"
    if value is None or isinstance(value, (bool, int, float, str, torch.dtype, torch.device)):
        return repr(value)
    if isinstance(value, (tuple, list)):
        return tuple(_value(v, index, "") for v in value)
    if isinstance(value, dict):
        return tuple(sorted((repr(k), _value(v, index, "")) for k, v in value.items()))
    return (type(value).__qualname__, id(value))


def _tensor_spec(tensor: torch.Tensor | None):
    if tensor is None:
        return None
    return (tuple(tensor.shape), str(tensor.dtype), str(tensor.device), type(tensor).__qualname__,
            tensor.requires_grad)


def _kind_signature(block: nn.Module, index: int) -> tuple:
    """Everything about `block` (at `index` in its list) that its traced graph can depend on,
    except its tensors' values (see the module docstring)."""
    parts = []
    for name, module in block.named_modules():
        attributes = tuple((key, _value(value, index, key)) for key, value in sorted(vars(module).items())
                           if not key.startswith("_") and key != "training")
        parts.append((name, type(module).__module__, type(module).__qualname__, attributes,
                      tuple((k, _tensor_spec(p)) for k, p in module._parameters.items()),
                      tuple((k, _tensor_spec(b)) for k, b in module._buffers.items()),
                      tuple(sorted(module._non_persistent_buffers_set)),
                      bool(module._forward_hooks or module._forward_pre_hooks)))
    return tuple(parts)


def _prefix(kinds: list[int]) -> int:
    later = {kind: kinds.index(kind, 1) for kind in set(kinds[1:])}
    keep = max(later.values()) + 1
    if kinds[0] not in kinds[1:]:  # child 0 may compute what every later child reads (T5)
        keep = max(keep, 3)
    return max(2, keep)


def repeated_lists(model: nn.Module) -> list[BlockList]:
    """The outermost module lists of `model` with at least 3 children that a shorter prefix covers."""
    found: list[BlockList] = []
    taken: list[str] = []
    for path, module in model.named_modules():
        if any(path.startswith(p + ".") for p in taken) or not isinstance(module, nn.ModuleList):
            continue
        children = list(module._modules.values())
        if len(children) < 3 or any(child is None for child in children) \
                or list(module._modules) != [str(i) for i in range(len(children))]:
            continue
        signatures: dict[tuple, int] = {}
        kinds = [signatures.setdefault(_kind_signature(child, i), len(signatures)) for i, child in enumerate(children)]
        keep = _prefix(kinds)
        if keep < len(children):
            found.append(BlockList(path, kinds, keep))
            taken.append(path)
    return found


@contextlib.contextmanager
def prefixes(model: nn.Module, lists: list[BlockList]):
    """`model` with each list holding only its first `keep` children inside the block."""
    saved = []
    for entry in lists:
        module = model.get_submodule(entry.path)
        saved.append((module, module._modules))
        module._modules = dict(list(module._modules.items())[:entry.keep])
    try:
        yield
    finally:
        for module, children in saved:
            module._modules = children
