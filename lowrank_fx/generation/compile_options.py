"""What `lfx.generate(compile=...)` asks of torch.compile, and when a compiled decode graph still holds.

A token step of a small model spends about a third of its time outside the matrix products:
the compiled graph's wrapper, dynamo's guard check and the kernels around the products.
So the compiled decode graph is built with

- every backend: a guard filter that drops dynamo's guards on module attributes. A decode
  graph reads a few hundred parameters and buffers (base weights, every adapter's factors,
  gates), and dynamo would check each one's shape, dtype, device and the modules' Python
  attributes on every token. `state_key(graph)` checks the same things once per
  `generate` call instead, and the compiled graph is kept per key: a parameter of another
  shape, dtype or device, or a changed Python attribute (a unit's scale, training mode),
  compiles again. Tensor values are inputs, never guarded: training gm in place recompiles
  nothing.
- inductor (compile=True, "inductor"): `cpp_wrapper`, the generated code calling its kernels,
  views and allocations from C++ rather than from a Python function (a few hundred calls per
  token), and no `size_asserts` (a stride check per extern kernel input per call; the
  shapes are those the graph was traced with, guarded on its inputs).

Batches of 2 and more share one graph (one row compiles its own: torch specialises a size of 1)
because `traced_sizes()`, around every compiled call, turns duck sizing off: inputs' sizes
that happen to be equal would share one symbol, so a batch of 2 would share the symbol of 2
KV heads and become the constant 2 with it.

A dict is passed to torch.compile as given, with the guard filter added to its `options`
unless it sets `mode` (torch.compile takes one of the two); `dynamic` defaults to True.
"""

from __future__ import annotations

import torch
import torch.fx.experimental._config as shape_config
from torch import nn

from ..errors import SpecError
from ..options import compile_backend

INDUCTOR = {"cpp_wrapper": True, "size_asserts": False}
SCALARS = (bool, int, float, str, type(None))


def compile_kwargs(option) -> dict:
    """torch.compile's keyword arguments for generate's `compile` option (True, a backend name or a dict)."""
    if option is True:
        kwargs = {"options": dict(INDUCTOR)}
    elif isinstance(option, str):
        compile_backend("lfx.generate", "compile", option)
        kwargs = {"backend": option, "options": dict(INDUCTOR) if option == "inductor" else {}}
    elif isinstance(option, dict):
        kwargs = dict(option)
        if "mode" not in kwargs:
            kwargs["options"] = dict(kwargs.get("options") or {})
    else:
        raise SpecError("compile must be False, True, a backend name or a dict of torch.compile options, got "
                        f"{option!r}")
    if "options" in kwargs:
        kwargs["options"].setdefault("guard_filter_fn", torch.compiler.skip_guard_on_all_nn_modules_unsafe)
    kwargs.setdefault("dynamic", True)
    return kwargs


def traced_sizes():
    """A context in which torch.compile gives equal input sizes symbols of their own (no duck sizing)."""
    return shape_config.patch(use_duck_shape=False)


def _meta(tensor: torch.Tensor) -> tuple:
    return tuple(tensor.shape), tensor.dtype, tensor.device, tensor.requires_grad


# flags torch.compile itself sets on the module it compiles (the first call would key differently
# from every later one)
_SET_BY_COMPILE = frozenset({"_is_torch_compile"})


def state_key(graph: nn.Module) -> int:
    """A hash of what dynamo's module guards would check: every module's tensors' shape, dtype,
    device and requires_grad, and its Python scalar attributes (training, a unit's scale, ...)."""
    entries = []
    for name, module in graph.named_modules():
        for attr, value in vars(module).items():
            if attr in _SET_BY_COMPILE:
                continue
            if isinstance(value, SCALARS):
                entries.append((name, attr, value))
            elif isinstance(value, torch.Tensor):
                entries.append((name, attr, _meta(value)))
        for attr, tensor in (*module._parameters.items(), *module._buffers.items()):
            entries.append((name, attr, None if tensor is None else _meta(tensor)))
    return hash(tuple(entries))


__all__ = ["compile_kwargs", "state_key", "traced_sizes"]
