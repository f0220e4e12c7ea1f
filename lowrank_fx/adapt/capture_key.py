"""What a capture depends on, as plain data: the parts of the in-process memo's key
(capture_memo.py) and of the on-disk cache's key (capture_cache.py).

A graph from torch.export depends on the model's code and structure, the examples' shapes,
dtypes and non-tensor values, and the dynamic-shape choice, never on the weights' values.
Every function here returns JSON-ready data (lists, strings, numbers), so the disk key can
be written next to the program and compared on load, and the memo key is its hashable text.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import sys
from functools import cache
from pathlib import Path

import torch
from torch import nn
from torch.utils import _pytree as pytree

from ..version import __version__
from .experts_impl import chosen, has_experts


def _value(value) -> list:
    """A non-tensor example leaf (`use_cache=False`): its type and repr."""
    return ["value", f"{type(value).__module__}.{type(value).__qualname__}", repr(value)]


def _tensor(tensor: torch.Tensor) -> list:
    return ["tensor", list(tensor.shape), str(tensor.dtype), tensor.device.type]


def examples_spec(args: tuple, kwargs: dict) -> list:
    """The examples' structure (argument names) and, per leaf, shape/dtype/device or value."""
    leaves, spec = pytree.tree_flatten((args, kwargs))
    return [str(spec), [_tensor(v) if isinstance(v, torch.Tensor) else _value(v) for v in leaves]]


def shapes_spec(dynamic: bool, dynamic_shapes) -> list:
    """The dynamic-shape choice: every dimension Dim.AUTO, all static, or the caller's own."""
    if dynamic_shapes is not None:
        return ["given", repr(dynamic_shapes)]
    return ["auto"] if dynamic else ["static"]


def tensors_spec(model: nn.Module) -> list:
    """Every parameter and buffer by every name it has: shape, dtype, device, and which name
    it shares its tensor with (tied weights make another graph)."""
    first: dict[int, str] = {}
    spec = []
    for name, tensor in [*model.named_parameters(remove_duplicate=False),
                         *model.named_buffers(remove_duplicate=False)]:
        owner = first.setdefault(id(tensor), name)
        spec.append([name, list(tensor.shape), str(tensor.dtype), tensor.device.type, owner])
    return spec


def config_spec(model: nn.Module):
    """A Hugging Face model's `config.to_dict()` (None for other models), JSON-safe, with the
    attention implementation (sdpa, eager, ...), which to_dict leaves out and the graph shows, and
    for a mixture-of-experts model the experts implementation the capture traces."""
    config = getattr(model, "config", None)
    to_dict = getattr(config, "to_dict", None)
    if not callable(to_dict):
        return None
    spec = json.loads(json.dumps(to_dict(), sort_keys=True, default=repr))
    spec["_attn_implementation"] = repr(getattr(config, "_attn_implementation", None))
    if has_experts(model):  # the implementation the capture traces, not the model's own (experts_impl.py)
        spec["_experts_implementation"] = chosen()
    return spec


@cache
def _file_digest(path: str, mtime_ns: int) -> str:
    with open(path, "rb") as file:
        return hashlib.sha256(file.read()).hexdigest()[:16]


def code_spec(model: nn.Module) -> list:
    """Each module class of the model by qualified name, with a digest of its source file, so
    editing a model's Python code misses (a library's version alone would not say so)."""
    spec = {}
    for module in model.modules():
        cls = type(module)
        name = f"{cls.__module__}.{cls.__qualname__}"
        if name in spec:
            continue
        try:
            path = inspect.getsourcefile(cls)
            spec[name] = _file_digest(path, os.stat(path).st_mtime_ns) if path else None
        except (TypeError, OSError):
            spec[name] = None
    return sorted(spec.items())


@cache
def library() -> str:
    """A digest of lowrank_fx's own source, read once per process: the disk cache stores graphs
    its passes finished (call defaults, mode switches, copied blocks), so editing lowrank_fx
    without changing its version misses too."""
    root = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def versions() -> dict:
    """Python, torch, transformers (when imported) and lowrank_fx versions."""
    transformers = sys.modules.get("transformers")
    return {"python": ".".join(map(str, sys.version_info[:3])), "torch": torch.__version__, "lowrank_fx": __version__,
            "transformers": getattr(transformers, "__version__", None)}


def text(data) -> str:
    """The canonical JSON text of a key (sorted keys, no spaces)."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"))
