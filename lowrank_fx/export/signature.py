"""A model's calling convention as flat, named ONNX inputs and outputs.

ONNX graphs take and return flat lists of tensors. `Signature` records how the example
`(args, kwargs)` of a forward flatten: every tensor leaf becomes an ONNX input named after
the forward's parameter (`input_ids`, `attention_mask`; nested leaves as `past.0.key`),
every other leaf (`use_cache=False`) is a constant baked into the graph. Outputs are named
by their path in the result: keys and fields (`logits` of a Hugging Face `ModelOutput`,
`sample` of a diffusers `BaseOutput`, a dataclass's or NamedTuple's fields, a dict's keys),
`output_<i>` for tuple entries, `output` for a single tensor; nested as `a.b`.

Where pytree knows a type, its flattening decides which children there are and in what
order; their names come from its key paths, or, for a type registered without a
`flatten_with_keys_fn` (diffusers' `BaseOutput`), from the fields, keys or attributes that
hold each child. Outputs of types pytree does not know are walked as dataclasses, mappings
and sequences; any other non-tensor, non-constant output is an ExportError that says how
to register its type.

`FlatCall` is the module handed to the exporter: `forward(*model_inputs, *extra)` rebuilds
the call, optionally swaps tensors of the graph by name (`torch.func.functional_call`),
and returns the result's tensors as a flat tuple.
"""

from __future__ import annotations

import dataclasses
import enum
import inspect
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from ..errors import ExportError

_TENSOR = object()  # marks where a tensor leaf goes in Signature.leaves


def _key_name(key) -> str:
    for attr in ("key", "idx", "name"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


# Output leaves that are not tensors and need no name: they are left out of the ONNX outputs.
_CONSTANTS = (type(None), bool, int, float, complex, str, bytes, enum.Enum, torch.Size, torch.dtype,
              torch.device, torch.layout, torch.memory_format, torch.SymInt, torch.SymFloat, torch.SymBool)


def _holders(node) -> list[tuple[str, Any]]:
    """(name, value) of what a node holds, for naming children pytree gives no keys for."""
    if isinstance(node, Mapping):
        return [(str(key), value) for key, value in node.items()]
    if dataclasses.is_dataclass(node) and not isinstance(node, type):
        return [(f.name, getattr(node, f.name, None)) for f in dataclasses.fields(node)]
    if isinstance(node, tuple) and hasattr(node, "_fields"):
        return list(zip(node._fields, node))
    return [(str(key), value) for key, value in vars(node).items()] if hasattr(node, "__dict__") else []


def _unkeyed_names(node, children: list) -> list[str]:
    """Names of a node's children, by the field, key or attribute holding each (else its index)."""
    by_id: dict[int, list[str]] = {}
    for name, value in _holders(node):
        by_id.setdefault(id(value), []).append(name)
    names = []
    for index, child in enumerate(children):
        found = by_id.get(id(child))
        names.append(found.pop(0) if found else str(index))
    return names


def _pytree_children(node) -> list[tuple[str, Any]] | None:
    """(name, child) of a node pytree knows, in pytree's order; None for a pytree leaf."""
    def one_level(x) -> bool:  # flatten the node itself, not its children
        return x is not node

    children, _ = pytree.tree_flatten(node, is_leaf=one_level)
    if len(children) == 1 and children[0] is node:
        return None
    try:
        keyed, _ = pytree.tree_flatten_with_path(node, is_leaf=one_level)
    except ValueError:  # registered without a flatten_with_keys_fn
        return list(zip(_unkeyed_names(node, children), children))
    return [(_key_name(path[0]), child) for path, child in keyed]


def _plain_children(node) -> list[tuple[str, Any]] | None:
    """(name, child) of a container pytree does not know: a dataclass, mapping or sequence."""
    if isinstance(node, _CONSTANTS):
        return None
    if dataclasses.is_dataclass(node) and not isinstance(node, type):
        return [(f.name, getattr(node, f.name, None)) for f in dataclasses.fields(node)]
    if isinstance(node, Mapping):
        return [(str(key), value) for key, value in node.items()]
    if isinstance(node, (list, tuple)):
        return [(str(index), value) for index, value in enumerate(node)]
    return None


def _named_leaves(tree, path: tuple[str, ...] = (), plain: bool = False) -> list[tuple[tuple[str, ...], Any]]:
    """(path, leaf) of every leaf of `tree`, in pytree's flattening order.

    plain=True (outputs) also walks containers pytree does not know (their leaves follow
    their own order); plain=False (inputs) keeps pytree's leaves exactly.
    """
    if isinstance(tree, torch.Tensor):
        return [(path, tree)]
    children = _pytree_children(tree)
    if children is None and plain:
        children = _plain_children(tree)
    if children is None:
        return [(path, tree)]
    return [leaf for name, child in children for leaf in _named_leaves(child, (*path, name), plain)]


def _unknown_output(path: tuple[str, ...], value) -> ExportError:
    kind = type(value)
    qualified = f"{kind.__module__}.{kind.__qualname__}"
    where = f"output {'.'.join(path)!r}" if path else "output"
    return ExportError(
        f"the model's {where} is a {qualified}, a type torch's pytree does not know, so the export "
        f"cannot tell which tensors it holds. Fix: register it before capturing and exporting, e.g. "
        f"torch.utils._pytree.register_pytree_node({kind.__qualname__}, flatten_fn, unflatten_fn, "
        "flatten_with_keys_fn=...) (the keys name the outputs; for a dataclass-like type "
        f"torch.export.register_dataclass({kind.__qualname__})), or return its tensors in a tuple, "
        "dict or NamedTuple instead."
    )


def _path_name(parts: tuple[str, ...], parameters: list[str]) -> str:
    """ONNX name of an (args, kwargs) leaf: forward parameter name, then nested keys."""
    where, first, *rest = parts
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
    tree = (args, dict(kwargs or {}))
    _, spec = pytree.tree_flatten(tree)
    parameters = _forward_parameters(model)
    names, examples, leaves = [], [], []
    for path, leaf in _named_leaves(tree):
        if isinstance(leaf, torch.Tensor):
            names.append(_path_name(path, parameters))
            examples.append(leaf)
            leaves.append(_TENSOR)
        else:
            leaves.append(leaf)
    return Signature(names, examples, leaves, spec)


def flat_outputs(result, reserved=()) -> tuple[list[str], list[torch.Tensor]]:
    """Names and tensors of a forward's result, in flattening order (constants left out).

    A name in `reserved` (the ONNX inputs: names must be unique in an ONNX graph) gets the
    prefix `out_`: a UNet's `sample` output beside its `sample` input is `out_sample`.
    Raises ExportError for a leaf that is neither a tensor nor a constant (None, a number,
    a string, ...): a type pytree does not know.
    """
    tensors = []
    for path, leaf in _named_leaves(result, plain=True):
        if isinstance(leaf, torch.Tensor):
            tensors.append((path, leaf))
        elif not isinstance(leaf, _CONSTANTS):
            raise _unknown_output(path, leaf)
    names: list[str] = []
    reserved = set(reserved)
    taken = set(reserved)
    for path, _ in tensors:
        if not path:
            name = "output"
        elif path[0].isdigit():
            name = "output_" + ".".join(path)
        else:
            name = ".".join(path)
        name = "out_" + name if name in reserved else name
        unique, n = name, 1
        while unique in taken:  # keys such as "a.b" beside a nested a -> b
            unique, n = f"{name}_{n}", n + 1
        taken.add(unique)
        names.append(unique)
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
