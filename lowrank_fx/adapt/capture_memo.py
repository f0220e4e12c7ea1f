"""Capture once per process: `plan` then `rewrite` on the same model and examples trace once.

The memo maps a model (held weakly: it never keeps a model alive) to its latest capture, the
pristine graph before any adapter, under a key of

  - every parameter and buffer: its name, identity and `_version` (an in-place edit or a
    replaced tensor misses), shape, dtype and device;
  - the model's forward hooks and pre-hooks (by identity), its config and its classes' code;
  - the examples' structure, shapes, dtypes and non-tensor values (not their tensor values:
    the graph does not depend on them; a quantized model's graph keeps the first call's
    examples for `fold(requantize=True)` to measure on), and the dynamic-shape choice.

Every caller gets its own copy of that graph (`passes.fold.shared_copy`): a new graph and
new small modules (mode switches, records), the model's own tensors. So `rewrite` injects
into its copy only, `plan` never sees another caller's adapters, and no weight is copied.
A capture loaded from the disk cache is memoised as a function that loads its bytes again
(capture.py): each caller gets a graph of its own that way too, and the first caller, the
one loaded graph, without a copy made for a second caller that may never come.
One entry per model: a capture that misses replaces it (the tensors an old entry holds are
the model's, or ones it had before a weight was replaced, until then).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

from torch import fx, nn

from ..passes.fold import shared_copy
from . import capture_key

Pristine = fx.GraphModule | Callable[[nn.Module], fx.GraphModule | None]
_MEMO: weakref.WeakKeyDictionary[nn.Module, tuple[str, Pristine]] = weakref.WeakKeyDictionary()


def _hooks(model: nn.Module) -> list:
    return [[name, kind, [id(hook) for hook in getattr(module, kind).values()]]
            for name, module in model.named_modules()
            for kind in ("_forward_pre_hooks", "_forward_hooks") if getattr(module, kind)]


def memo_key(model: nn.Module, args: tuple, kwargs: dict, dynamic: bool, dynamic_shapes, trace_blocks: bool) -> str:
    """The key of this capture in the memo (see the module docstring)."""
    tensors = [[name, id(t), t._version, list(t.shape), str(t.dtype), str(t.device)]
               for name, t in [*model.named_parameters(remove_duplicate=False),
                               *model.named_buffers(remove_duplicate=False)]]
    return capture_key.text([tensors, _hooks(model), capture_key.config_spec(model), capture_key.code_spec(model),
                             capture_key.examples_spec(args, kwargs),
                             capture_key.shapes_spec(dynamic, dynamic_shapes), trace_blocks])


def handout(gm: fx.GraphModule, training: bool) -> fx.GraphModule:
    """A caller's own copy of a pristine graph, sharing its tensors, in mode `training`."""
    copy = shared_copy(gm, every_tensor=True)
    copy.train(training)
    return copy


def recall(model: nn.Module, key: str) -> fx.GraphModule | None:
    """A graph of its own of the capture memoised for `model` under `key`, or None."""
    entry = _MEMO.get(model)
    if entry is None or entry[0] != key:
        return None
    if isinstance(entry[1], fx.GraphModule):
        return handout(entry[1], model.training)
    return entry[1](model)  # loads the disk cache's bytes again (None if they no longer fit the model)


def remember(model: nn.Module, key: str, pristine: Pristine) -> None:
    """Keep `pristine` as `model`'s capture under `key` (replacing any earlier one): a graph no
    caller changes, or a function that makes a new graph of the capture for `model`, in its mode,
    at each call, and holds no reference to `model`."""
    _MEMO[model] = (key, pristine)


def forget(model: nn.Module | None = None) -> None:
    """Drop `model`'s memoised capture, or every one (benchmarks time a capture from scratch)."""
    if model is None:
        _MEMO.clear()
    else:
        _MEMO.pop(model, None)
