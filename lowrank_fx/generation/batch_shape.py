"""One compiled decode graph for every batch size: batch 1 and then 4 rows compile nothing new.

torch.compile specialises a size of 1: traced with one row, a graph guards on batch == 1 and
the next call with 4 rows compiles again. Two things keep the batch symbolic:

- `symbolic_sizes()`, around every compiled call: while tracing, a question whether a size is
  0 or 1 is answered for the general size, with no guard (size-oblivious reasoning), and
  inputs' sizes that happen to be equal get symbols of their own (no duck sizing: a batch of 2
  would otherwise share the symbol of 2 KV heads and become the constant 2 with it). The
  prompt step's graph then serves every batch. Its empty cache's length stays the constant 0
  (`empty_past`): a symbolic length whose example is 0 breaks inductor's concatenation.
- `pad_one_row(...)`: the token step still asks whether batch == 1 (attention's output is
  reshaped, and the reshape asks whether a view suffices), so a single row's token steps run
  as two identical rows; the caller keeps the first row's logits. A token step's matrix
  products are matrix-vector products bound by reading the weights, which happens once per
  step whatever the batch, so the copy costs little. The prompt step is not padded: its
  products are bound by arithmetic, and a second row would double them.

With inductor (compile=True) one graph still differs: lowering the prompt step adds a guard
batch == 1 of its own (dynamo's trace has none; the "aot_eager" backend shares every graph), so
there batch 1 and then 4 rows compile the prompt step once more; the token step is shared.

Shapes: ids / positions (1, new) -> (2, new), mask (1, past + new) -> (2, past + new), every
cache tensor (1, kv_heads, past, head_dim) -> (2, kv_heads, past, head_dim) once (later
steps' caches come back with two rows).
"""

from __future__ import annotations

import torch
import torch._dynamo
import torch.fx.experimental._config as shape_config

ROWS = 2


def symbolic_sizes():
    """A context in which torch.compile treats sizes size-obliviously (see the module docstring)."""
    return shape_config.patch(backed_size_oblivious=True, use_duck_shape=False)


def empty_past(cache: torch.Tensor) -> None:
    """Mark the prompt step's empty cache (batch, kv_heads, 0, head_dim) as having the static length 0."""
    torch._dynamo.mark_static(cache, 2)


def pad_one_row(ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: list[dict]):
    """(ids, mask, positions, cache) of a one-row token step as two identical rows."""
    ids, mask, positions = (t.expand(ROWS, -1) for t in (ids, mask, positions))
    if cache[0]["key"].shape[0] == 1:
        cache = [{part: t.expand(ROWS, -1, -1, -1).contiguous() for part, t in layer.items()} for layer in cache]
    return ids, mask, positions, cache


__all__ = ["symbolic_sizes", "empty_past", "pad_one_row"]
