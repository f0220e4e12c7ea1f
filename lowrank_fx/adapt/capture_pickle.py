"""Pickling a finished capture for the disk cache (capture_cache.py): torch's GraphPickler with
the model's tensors left out and lean shape metadata.

`dumps(gm, tensors)` pickles the GraphModule `gm` with torch's own graph pickler
(`torch.fx._graph_pickler.GraphPickler`, what torch's compile caches use): every node, its
metadata (module paths, stack traces) and the code generator. Two things differ:

  - a tensor of the model (`tensors`: id -> name) is written as a reference `(name, shape,
    dtype)`, never as data; `loads` puts the model's own tensor of that name there, after
    checking its shape and dtype (a mismatch or a missing name raises Unfit);
  - each node's `val`, the FakeTensor that passes read for shapes, dtypes and symbolic sizes,
    is written as (sizes, strides, dtype, device, requires_grad), its sizes and strides
    SymInts as torch pickles them, and node values with the same record share one rebuilt
    FakeTensor, as the blocks that capture copies share their template's (passes/repeat_blocks.py).
    Rebuilding a FakeTensor with symbolic sizes costs about half a millisecond (sympy
    reasoning about its strides), torch's own reducer rebuilds one per value, and a decoder's
    values take a few dozen records: on the Qwen2.5-0.5B shape 51 records for its 1,982 nodes.
    Values that are views, have a storage offset, or are not plain strided tensors go through
    torch's reducer unchanged;
  - the input guards that torch.export's `.module()` puts first in the graph (a `_guards_fn`
    submodule whose forward asserts the sizes the export assumed, generated code with no
    source file) are written as that code, marshalled, and rebuilt as `.module()` builds them
    (so the key holds Python's version: marshal's format is Python's own).
"""

from __future__ import annotations

import io
import marshal
import math
import types
from collections.abc import Mapping

import torch
from torch import fx
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.fx.experimental.symbolic_shapes import ShapeEnv
from torch.utils._mode_utils import no_dispatch
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from ..graph.module_copy import over_graph


class Unfit(Exception):
    """A stored reference names a tensor the model lacks, or one of another shape or dtype."""


def _lean(value: FakeTensor) -> bool:
    """True for a FakeTensor that (sizes, strides, dtype, device, requires_grad) describe fully."""
    return (value.layout is torch.strided and not value._is_view() and value.storage_offset() == 0
            and not value.is_conj() and not value.is_neg() and (not value.is_leaf or value.grad is None)
            and value.constant is None and not is_traceable_wrapper_subclass(value))


class _Record:
    """A node value's shape record; on load, the one FakeTensor every node with it shares."""

    def __init__(self, value: FakeTensor, state):
        self.size, self.stride = tuple(value.shape), tuple(value.stride())
        self.dtype, self.device, self.requires_grad = value.dtype, value.device, value.requires_grad
        self.state = state  # torch's unpickle state (its fake mode), a persistent reference

    def rebuilt(self) -> FakeTensor:
        if "tensor" not in self.__dict__:  # as torch's meta converter does, without a view or base to replay
            with no_dispatch():
                meta = torch.empty_strided(self.size, self.stride, dtype=self.dtype, device="meta")
                self.tensor = FakeTensor(self.state.fake_mode, meta, self.device)
            self.tensor.requires_grad_(self.requires_grad)
        return self.tensor


def _guards_code(module) -> bytes:
    """The marshalled code of a `_guards_fn` module's generated function (torch wraps it in a
    closure that turns tracing into it on for Dynamo)."""
    cells = [cell.cell_contents for cell in (module.forward.__closure__ or ())]
    found = [f for f in cells if isinstance(f, types.FunctionType) and f.__code__.co_name == "_"]
    if len(found) != 1 or found[0].__closure__ or found[0].__defaults__:
        raise TypeError("torch.export's input guards are not the generated function this cache knows")
    return marshal.dumps(found[0].__code__)


def _guards_fn(code: bytes, training: bool):
    """A `_guards_fn` module as torch.export's `.module()` makes it (torch/export/_unlift.py)."""
    from torch.export._unlift import GuardsFn
    from torch.fx.experimental.symbolic_shapes import SYMPY_INTERP

    function = types.FunctionType(marshal.loads(code), {**SYMPY_INTERP, "math": math, "inf": float("inf")}, "_")
    module = GuardsFn()
    module.forward = torch._dynamo.dont_skip_tracing(function)
    module._is_impure = True
    return module.train(training)


def _pickler_class():
    """The pickler, defined on first use: torch's graph pickler module imports torch._inductor,
    seconds that `import lowrank_fx` should not cost."""
    from torch.fx._graph_pickler import GraphPickler

    class Pickler(GraphPickler):
        def __init__(self, file, tensors: dict[int, str]):
            from torch.fx._graph_pickler import Options

            super().__init__(file, Options(ops_filter=None, node_metadata_key_filter=None))
            self.tensors = tensors
            self.records: dict[tuple, _Record] = {}

        def persistent_id(self, obj):
            if isinstance(obj, torch.Tensor) and not isinstance(obj, FakeTensor) and id(obj) in self.tensors:
                return ("tensor", self.tensors[id(obj)], tuple(obj.shape), str(obj.dtype))
            return super().persistent_id(obj)

        def reducer_override(self, obj):
            from torch.export._unlift import GuardsFn

            if type(obj) is GuardsFn:
                return _guards_fn, (_guards_code(obj), obj.training)
            if isinstance(obj, FakeTensor) and _lean(obj):
                key = (tuple(map(str, obj.shape)), tuple(map(str, obj.stride())), obj.dtype, str(obj.device),
                       obj.requires_grad)
                record = self.records.get(key)
                if record is None:
                    record = self.records[key] = _Record(obj, self._unpickle_state)
                return _Record.rebuilt, (record,)
            return super().reducer_override(obj)

    return Pickler


def dumps(gm: fx.GraphModule, tensors: dict[int, str]) -> bytes:
    """`gm` pickled, each tensor in `tensors` (id -> the model's name for it) by reference."""
    from torch.fx._graph_pickler import patch_pytree_map_over_slice

    with patch_pytree_map_over_slice(), io.BytesIO() as stream:
        _pickler_class()(stream, tensors).dump(gm)
        return stream.getvalue()


def loads(data: bytes, tensors: Mapping[str, torch.Tensor]) -> fx.GraphModule:
    """The GraphModule pickled in `data`, over `tensors` (the model's, by name); its node values
    are FakeTensors of a new fake mode. Raises Unfit, or whatever unpickling raises."""
    from torch.fx._graph_pickler import (
        _GraphUnpickler,
        _UnpickleState,
        patch_pytree_map_over_slice,
    )

    class Unpickler(_GraphUnpickler):
        def persistent_load(self, pid):
            if isinstance(pid, tuple) and len(pid) == 4 and pid[0] == "tensor":
                _, name, shape, dtype = pid
                tensor = tensors.get(name)
                if tensor is None or tuple(tensor.shape) != shape or str(tensor.dtype) != dtype:
                    raise Unfit(name)
                return tensor
            return super().persistent_load(pid)

    state = _UnpickleState(FakeTensorMode(shape_env=ShapeEnv()))
    with patch_pytree_map_over_slice(), io.BytesIO(data) as stream:
        loaded = Unpickler(stream, state).load()
    if not isinstance(loaded, fx.GraphModule):
        raise TypeError(f"the entry holds a {type(loaded).__name__}, not a GraphModule")
    return over_graph(loaded, loaded.graph)  # a GraphModule of its own class, its code generated
