"""The on-disk capture cache: a rerun in a new process loads the finished graph of a capture
instead of tracing the model again.

Where: `cache_dir=` of `rewrite` / `plan`, else the environment variable `LOWRANK_FX_CACHE`;
`cache_dir=False` turns it off. One file per key, `<digest>.lfx-capture`.

The key (capture_key.py) holds what the graph depends on: the model's class (qualified name)
and every module class's source digest, its Hugging Face config (`config.to_dict()`), every
parameter and buffer name with shape, dtype, device and tying, the examples' structure,
shapes, dtypes and non-tensor values, the dynamic-shape choice, the Python, torch,
transformers and lowrank_fx versions, a digest of lowrank_fx's own source (its passes made the
stored graph), and this file's format. The file starts with that key in
full, then the payload's length and SHA-256, then the payload: the graph as capture finishes
it (exported, the traced blocks copied over the others, call defaults, mode switches; before
any adapter), pickled by torch's own graph pickler (`torch.fx._graph_pickler.GraphPickler`,
what torch's compile caches use) with lean shape records (capture_pickle.py). It keeps every
node's metadata (shapes with their symbols, module paths), so a hit runs none of the steps
after exporting: it unpickles the nodes and generates the graph's code. On the Qwen2.5-0.5B
shape (24 layers, about 2,000 nodes) that is about 0.3 s of CPU time against 0.54-0.7 s when
the exported program was stored (its FakeTensors rebuilt one per node value, then the block copy, call
defaults and the memo's copy run again). Unpickling runs with the garbage collector skipping
the objects the process held before (_collector_paused). Being a pickle, an entry is code that
runs on load: keep the cache directory as private as your own Python files.

Weights are never stored. Every parameter and buffer of the model is written as a reference
(its name, shape and dtype); a hit puts the model's own tensor of that name there while
unpickling. So a cache file is small and holds no data, the graph of a hit reads the model's
tensors (no new memory; an in-place edit of a weight changes its output) and a file can never
bring in stale weights. Constants the forward itself creates (`torch.tensor(0.5)`) are part of
the graph and are kept.

A stale or corrupt entry (bad bytes, truncated, another key, a graph that does not load or
does not fit the model) is never trusted: a warning says what was wrong and the caller
captures again and overwrites it. Writes are atomic (a temporary file, then a rename).
Models whose tensors are quantized subclasses, bitsandbytes layers, and models with forward
hooks (their code is in no key) bypass the cache; a GraphModule passed in is never exported.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import os
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import fx, nn
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from ..errors import SpecError
from ..graph.quant_formats import bitsandbytes_layers, is_quantized
from . import capture_key, capture_pickle

ENV = "LOWRANK_FX_CACHE"
MAGIC = b"lowrank_fx capture cache 2 (the finished graph)\n"
FORMAT = 2  # in the key too: an entry of another format is another file, a quiet miss
SUFFIX = ".lfx-capture"


class _Stale(Exception):
    """What is wrong with a cache entry, in words."""


def cache_key(model: nn.Module, args: tuple, kwargs: dict, dynamic: bool, dynamic_shapes, trace_blocks: bool) -> dict:
    """The disk key of this capture (see the module docstring)."""
    cls = type(model)
    return {"model": f"{cls.__module__}.{cls.__qualname__}", "code": capture_key.code_spec(model),
            "config": capture_key.config_spec(model), "tensors": capture_key.tensors_spec(model),
            "examples": capture_key.examples_spec(args, kwargs),
            "dynamic": capture_key.shapes_spec(dynamic, dynamic_shapes), "blocks": trace_blocks,
            "versions": capture_key.versions(),
            "library": capture_key.library(), "format": FORMAT}


def cacheable(model: nn.Module) -> bool:
    """False for models whose capture depends on more than the key: quantized tensors,
    bitsandbytes layers, forward hooks."""
    tensors = [*model.parameters(), *model.buffers()]
    if any(is_quantized(t) or is_traceable_wrapper_subclass(t) for t in tensors) or bitsandbytes_layers(model):
        return False
    return not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())


def cache_directory(cache_dir) -> Path | None:
    """`cache_dir`, else $LOWRANK_FX_CACHE, else None; False (or "") turns the cache off."""
    from_env = cache_dir is None
    if from_env:
        cache_dir = os.environ.get(ENV) or None
    if not cache_dir:
        return None
    directory = Path(cache_dir)
    if directory.exists() and not directory.is_dir():
        where = f"${ENV}" if from_env else "cache_dir"
        raise SpecError(f"{where} {directory} is a file, not a folder; give a folder for the capture cache "
                        "(it is created if missing), or cache_dir=False for none")
    return directory


class CaptureCache:
    """One entry of the cache: the file for `key` in `directory`."""

    def __init__(self, directory: Path, key: dict):
        self.key = capture_key.text(key)
        self.path = Path(directory) / (hashlib.sha256(self.key.encode()).hexdigest()[:32] + SUFFIX)

    def load(self, model: nn.Module) -> fx.GraphModule | None:
        """The cached graph over `model`'s own tensors, or None (no entry, or a bad one: then a
        warning says what was wrong)."""
        payload = self.payload()
        return self.graph(payload, model_tensors(model)) if payload is not None else None

    def payload(self) -> bytes | None:
        """The stored graph's bytes, checked against the key and the checksum, or None (no entry,
        or a bad one: then a warning says what was wrong)."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as err:
            self._distrust(f"unreadable ({err})")
            return None
        try:
            return self._checked(data)
        except _Stale as err:
            self._distrust(str(err))
            return None

    def graph(self, payload: bytes, tensors: Mapping[str, torch.Tensor]) -> fx.GraphModule | None:
        """The graph in `payload` over `tensors` (name -> tensor: the model's), or None (then a
        warning says why it does not load)."""
        try:
            with _collector_paused():
                return capture_pickle.loads(payload, tensors)
        except capture_pickle.Unfit as err:
            self._distrust(f"a graph that does not fit the model ({err})")
            return None
        except Exception as err:
            self._distrust(f"a graph that does not load ({type(err).__name__}: {err})")
            return None

    def save(self, gm: fx.GraphModule, model: nn.Module) -> None:
        """Store `gm` without any of `model`'s tensors (a failure to serialize it is a warning)."""
        names: dict[int, str] = {}
        for name, tensor in model_tensors(model).items():
            names.setdefault(id(tensor), name)
        try:
            payload = capture_pickle.dumps(gm, names)
        except Exception as err:
            warnings.warn(f"lowrank_fx capture cache: cannot store this graph ({type(err).__name__}: {err}); "
                          "captures of this model will not be cached", stacklevel=4)
            return
        digest = hashlib.sha256(payload).hexdigest()
        header = json.dumps({"key": self.key, "bytes": len(payload), "sha256": digest}).encode() + b"\n"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _write_atomic(self.path, MAGIC + header + payload)

    def _distrust(self, why: str) -> None:
        warnings.warn(f"lowrank_fx capture cache: {self.path} is {why}; capturing again and overwriting it",
                      stacklevel=5)
        return None

    def _checked(self, data: bytes) -> bytes:
        """The payload of `data` (the bytes of this entry's file); raises _Stale saying what is
        wrong with them."""
        if not data.startswith(MAGIC):
            raise _Stale("not a lowrank_fx capture cache file (bad first bytes)")
        line_end = data.find(b"\n", len(MAGIC))
        try:
            header = json.loads(data[len(MAGIC):line_end])
            payload = data[line_end + 1:]
            key, size, digest = header["key"], header["bytes"], header["sha256"]
        except (ValueError, KeyError, TypeError):
            raise _Stale("corrupt (its header does not read)") from None
        if key != self.key:
            raise _Stale("for another capture (its key differs)")
        if len(payload) != size:
            raise _Stale(f"truncated ({len(payload)} of {size} bytes)")
        if hashlib.sha256(payload).hexdigest() != digest:
            raise _Stale("corrupt (its checksum does not match)")
        return payload


def model_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of `model` by every name it has."""
    return dict([*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)])


@contextlib.contextmanager
def _collector_paused():
    """Python's cyclic garbage collector skips the objects that exist now, meanwhile (gc.freeze,
    then gc.unfreeze: they are collectable again after). Unpickling builds tens of thousands of
    small objects (nodes, their metadata, symbolic sizes) that trigger full collections, and each
    walked every object of a process that holds torch and transformers: on bench_capture.py's
    Llama that was half the load. A process that froze objects itself is left
    as it is."""
    mine = gc.get_freeze_count() == 0
    if mine:
        gc.freeze()
    try:
        yield
    finally:
        if mine:
            gc.unfreeze()


def _write_atomic(path: Path, data: bytes) -> None:
    """`path` holds its old bytes or all of `data`, never part (files/atomic.py is a higher wing)."""
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(temp, 0o644)
        os.replace(temp, path)
    except BaseException:
        if os.path.exists(temp):
            os.unlink(temp)
        raise
