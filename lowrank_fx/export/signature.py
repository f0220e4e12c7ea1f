"""A model's calling convention as flat, named ONNX inputs and outputs.

ONNX graphs take and return flat lists of tensors. `Signature` records how the example
`(args, kwargs)` of a forward flatten: every tensor leaf becomes an ONNX input named after
the forward's parameter (`input_ids`, `attention_mask`; nested leaves as `past.0.key`),
every other leaf (`use_cache=False`) is a constant baked into the graph. Outputs are named
by their key path in the result: Hugging Face `ModelOutput` keys (`logits`,
`last_hidden_state`), `output_<i>` for tuple entries, `output` for a single tensor.

`FlatCall` is the module handed to the exporter: `forward(*model_inputs, *extra)` rebuilds
the call, optionally swaps tensors of the graph by name (`torch.func.functional_call`),
and returns the result's tensors as a flat tuple.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Callable

import torch
from torch import nn
from torch.utils import _pytree as pytree

_TENSOR = object()  # marks where a tensor leaf goes in Signature.leaves


def _key_name(key) -> str:
    for attr in ("key", "idx", "name"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _path_name(path, parameters: list[str]) -> str:
    """ONNX name of an (args, kwargs) leaf: forward parameter name, then nested keys."""
    where, first, *rest = (_key_name(k) for k in path)
    if where == "0":  # positional: the forward's own parameter name where it has one
        index = int(first)
        first = parameters[index] if index < len(parameters) else f"input_{index}"
    return ".".join([first, *rest])


def _forward_parameters(model: nn.Module) -> list[str]:
    params = inspect.signature(model.forward).parameters.values()
    return [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]


@dataclasses.dataclass
class Signature:
    """How `model(*args, **kwargs)` maps to flat ONNX inputs."""

    names: list[str]  # ONNX input names of the tensor leaves, in order
    examples: list[torch.Tensor]  # the example tensors, in the same order
    leaves: list  # every leaf of (args, kwargs); _TENSOR where a tensor goes
    spec: pytree.TreeSpec

    def rebuild(self, tensors) -> tuple[tuple, dict]:
        """(args, kwargs) with the tensor leaves replaced by `tensors`, in order."""
        given = iter(tensors)
        leaves = [next(given) if leaf is _TENSOR else leaf for leaf in self.leaves]
        args, kwargs = pytree.tree_unflatten(leaves, self.spec)
        return tuple(args), dict(kwargs)


def signature(model: nn.Module, args, kwargs) -> Signature:
    args = tuple(args) if isinstance(args, (tuple, list)) else (args,)
    flat, spec = pytree.tree_flatten_with_path((args, dict(kwargs or {})))
    parameters = _forward_parameters(model)
    names, examples, leaves = [], [], []
    for path, leaf in flat:
        if isinstance(leaf, torch.Tensor):
            names.append(_path_name(path, parameters))
            examples.append(leaf)
            leaves.append(_TENSOR)
        else:
            leaves.append(leaf)
    return Signature(names, examples, leaves, spec)


def flat_outputs(result) -> tuple[list[str], list[torch.Tensor]]:
    """Names and tensors of a forward's result, in flattening order."""
    flat, _ = pytree.tree_flatten_with_path(result)
    tensors = [(path, leaf) for path, leaf in flat if isinstance(leaf, torch.Tensor)]
    if len(tensors) == 1 and not tensors[0][0]:
        return ["output"], [tensors[0][1]]
    names = []
    for path, _ in tensors:
        parts = [_key_name(k) for k in path]
        names.append(".".join(parts) if not parts[0].isdigit() else "output_" + ".".join(parts))
    return names, [leaf for _, leaf in tensors]


class FlatCall(nn.Module):
    """`forward(*model_inputs, *extra) -> tuple of output tensors` around `model`.

    `swap(model_inputs, extra)` returns {name in model: tensor} to substitute for this
    call (adapter parameters, a per-row mask); an empty dict calls the model as it is.
    """

    def __init__(self, model: nn.Module, sig: Signature,
                 swap: Callable[[tuple, tuple], dict[str, torch.Tensor]] | None = None):
        super().__init__()
        self.model = model
        self.sig = sig
        self.swap = swap

    def forward(self, *flat: torch.Tensor) -> tuple[torch.Tensor, ...]:
        count = len(self.sig.names)
        inputs, extra = flat[:count], flat[count:]
        args, kwargs = self.sig.rebuild(inputs)
        swapped = self.swap(inputs, extra) if self.swap is not None else {}
        if swapped:
            result = torch.func.functional_call(self.model, swapped, args, kwargs)
        else:
            result = self.model(*args, **kwargs)
        return tuple(flat_outputs(result)[1])
