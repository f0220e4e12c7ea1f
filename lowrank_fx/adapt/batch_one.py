"""A batch of 1 is captured as a batch of 2.

torch.export fixes every example dimension of size 1, so examples of batch 1 (a tokenizer's
output for one text) would give a graph that takes batch 1 only. When every example tensor
has batch 1, capture traces them repeated to batch 2 (`widened`) and keeps that graph if its
guards take the examples as given (`takes`): it then serves batch 1 and every other batch.
Otherwise (the model's code needs batch 1, or the export fails) the examples are traced as
given, with a warning.

As for any graph called at a batch other than its examples', the batch-2 graph is right at
batch 1 unless the model's Python code branches on the batch size itself (`if x.shape[0] > 1:`):
torch.export takes a dynamic size to be 2 or more and records no guard for such a branch.
"""

from __future__ import annotations

import torch
from torch import fx
from torch.fx import _pytree as fx_pytree
from torch.utils import _pytree as pytree


def widened(args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    """(args, kwargs) with every tensor repeated to 2 along its first dimension, or None unless
    every tensor with a dimension has size 1 in it and one of them has two or more dimensions."""
    tensors = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor) and t.dim()]
    if not tensors or any(t.shape[0] != 1 for t in tensors) or all(t.dim() < 2 for t in tensors):
        return None

    def repeat(value):
        if isinstance(value, torch.Tensor) and value.dim():
            return value.repeat(2, *[1] * (value.dim() - 1))
        return value

    return pytree.tree_map(repeat, (args, kwargs))


def takes(gm: fx.GraphModule, args: tuple, kwargs: dict) -> bool:
    """Whether the guards torch.export wrote into `gm` (its `_guards_fn`) accept these examples."""
    guards = getattr(gm, "_guards_fn", None)
    if guards is None:
        return True
    try:
        guards(*fx_pytree.tree_flatten_spec((list(args), kwargs), gm._in_spec))
    except AssertionError:
        return False
    return True
