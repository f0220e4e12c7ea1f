"""ONNX Runtime adapter files (`.onnx_adapter`): writing them and checking them against a model.

A file is ORT's own format (`onnxruntime.AdapterFormat`): a set of named tensors, one per
adapter input of the model (see adapter_graph.py for the names). We also set ORT's
adapter version (`LAYOUT_VERSION`, the naming scheme of this library) and model version (a
31-bit fingerprint of the adapter-input layout: names, dtypes and fixed dimensions).

Checking needs no sidecar: the file's tensors are read back with
`AdapterFormat.read_adapter` and compared with the session's overridable initializers
(`InferenceSession.get_overridable_initializers()`: name, shape with symbolic rank axes,
type). A file is rejected, before any run, when it names an input the model lacks, when a
dtype or a fixed dimension differs, when one rank axis takes two sizes, or when it covers
only part of one target's inputs.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch

from ..errors import AdapterFileError, nearest

LAYOUT_VERSION = 1
SUFFIX = ".onnx_adapter"


def load_ort():
    """The onnxruntime module, or an error saying how to install it."""
    try:
        import onnxruntime
    except ImportError as err:
        raise AdapterFileError(
            "onnxruntime is not installed; pip install 'lowrank-fx[onnxruntime]' "
            "(or [onnxruntime-gpu], never both)"
        ) from err
    return onnxruntime


def layout_fingerprint(tensors: dict[str, torch.Tensor], rank_axes: dict[str, int | None]) -> int:
    """A 31-bit number naming the layout: input names, dtypes, and dims other than rank axes."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        shape = ["r" if i == rank_axes.get(name) else d for i, d in enumerate(tensors[name].shape)]
        digest.update(f"{name}|{tensors[name].dtype}|{shape};".encode())
    return int.from_bytes(digest.digest()[:4], "big") & 0x7FFFFFFF


def write_adapter_file(path: str | os.PathLike, tensors: dict[str, torch.Tensor], model_version: int) -> Path:
    """Write `tensors` ({ONNX input name: tensor}) as an ONNX Runtime adapter file."""
    ort = load_ort()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    values = {name: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(t.detach().cpu().numpy()))
              for name, t in tensors.items()}
    adapter = ort.AdapterFormat()
    adapter.set_adapter_version(LAYOUT_VERSION)
    adapter.set_model_version(model_version)
    adapter.set_parameters(values)
    adapter.export_adapter(str(path))
    return path


def _read_adapter_file(path: str | os.PathLike) -> dict[str, tuple[list[int], str]]:
    """{name: (shape, ORT type such as 'tensor(float)')} of an adapter file's tensors."""
    ort = load_ort()
    if not Path(path).is_file():
        raise AdapterFileError(f"adapter file {str(path)!r} does not exist")
    try:
        params = ort.AdapterFormat.read_adapter(str(path)).get_parameters()
    except Exception as err:
        raise AdapterFileError(
            f"{str(path)!r} is not an ONNX Runtime adapter file ({err}); write one with "
            "lfx.export_onnx(...) or lfx.export_onnx_adapter(gm, path)"
        ) from err
    return {name: (list(value.shape()), value.data_type()) for name, value in params.items()}


def slots(session) -> dict[str, tuple[list, str]]:
    """{adapter input: (shape, type)} of an InferenceSession: its overridable initializers."""
    return {i.name: (i.shape, i.type) for i in session.get_overridable_initializers()}


def model_slots(model_path: str | os.PathLike) -> dict[str, tuple[list, str]]:
    """`slots` of the ONNX model at `model_path` (opens a CPU session to read them)."""
    ort = load_ort()
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return slots(ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"]))


def check_adapter_file(path: str | os.PathLike, slots: dict[str, tuple[list, str]]) -> None:
    """Raise AdapterFileError unless the file fits `slots` ({input name: (shape, type)})."""
    found = _read_adapter_file(path)
    if found and not set(found) & set(slots):
        raise AdapterFileError(
            f"adapter file {str(path)!r} is for another model: none of its {len(found)} tensors "
            f"(e.g. {min(found)}) is an adapter input of this ONNX model"
            + (f" (they are named like {min(slots)})" if slots else "")
            + ". Use the files written with this model's export, or lfx.export_onnx_adapter(gm, path, "
            "adapter=...) from the graph it was exported from."
        )
    problems = []
    sizes: dict[str, int] = {}
    for name, (shape, dtype) in sorted(found.items()):
        if name not in slots:
            hint = nearest(name, slots, n=1)
            problems.append(f"{name}: the model has no such adapter input"
                            + (f" (nearest: {hint[0]})" if hint else ""))
            continue
        want_shape, want_type = slots[name]
        if dtype != want_type:
            problems.append(f"{name}: type {dtype}, the model takes {want_type}")
        if len(shape) != len(want_shape):
            problems.append(f"{name}: shape {shape}, the model takes {want_shape}")
            continue
        for size, want in zip(shape, want_shape):
            if isinstance(want, int) and size != want:
                problems.append(f"{name}: shape {shape}, the model takes {want_shape}")
                break
            if isinstance(want, str) and sizes.setdefault(want, size) != size:
                problems.append(f"{name}: axis {want} is {size} here but {sizes[want]} in another tensor")
                break
    owners = {name.rpartition(".")[0] for name in found if name in slots}
    missing = sorted(n for n in slots if n.rpartition(".")[0] in owners and n not in found)
    if missing:
        problems.append(f"missing {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''} "
                        "(a target's inputs must come together)")
    if problems:
        shown = "; ".join(problems[:6]) + (f"; and {len(problems) - 6} more" if len(problems) > 6 else "")
        raise AdapterFileError(
            f"adapter file {str(path)!r} does not fit this ONNX model: {shown}. Was it written for "
            "another model or another export? Write it from the graph this model was exported "
            "from: lfx.export_onnx_adapter(gm, path, adapter=...)."
        )
