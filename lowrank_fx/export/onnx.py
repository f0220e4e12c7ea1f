"""`lfx.export_onnx`: a graph to an ONNX model for ONNX Runtime, merged or with its adapters.

Modes (`mode="auto"` picks "merged" for a graph without adapters, else "adapters"):

  merged    the dense graph (a graph with adapters is folded first, `lfx.merge`).
  adapters  base weights as constants, ONE adapter's tensors as inputs, each with a
            same-named default initializer meaning "no update" (ORT's adapter layout;
            names and defaults: adapter_graph.py). Every adapter of the graph with the same
            structure gets an `.onnx_adapter` file (`<stem>.<adapter>.onnx_adapter`); one
            session serves the base model and all of them (`AdapterSession`).
  per_row   all adapters as constants, plus an `adapter_ids` (batch,) int64 input: row b
            uses adapter adapter_ids[b], -1 for none (per_row.py).

Inputs are named like the forward's arguments, outputs by their keys (`logits`,
`last_hidden_state`). Every axis of every input is dynamic unless the graph fixes it
(`dynamic_shapes={input name: {axis: Dim}}` overrides); dims are named `batch`,
`sequence`, `<input>_dim<axis>` and `<target>.rank`. A quantized base stays integer in every
mode but a dense "merged" fold: each quantized layer becomes ONNX Runtime's MatMulNBits (int8,
int4) or MatMulBnb4 (NF4) over its uint8 codes (quantized_ops.py). The graph is exported in eval mode
and keeps its own mode. Weights go to `<path>.data` above 2 GB (or with external_data=True).
Weights are streamed to disk one at a time; a merged export computes each folded weight
as it is written (merged_weights.py) and optimize=True runs a clean-up whose cost grows
linearly with the graph (optimize.py), not onnxscript's full optimizer.
A `<stem>.lowrank_fx.json` sidecar records what was exported (manifest.py). The graph's runtime
assertions (a model's checks on values, such as LLaVA's image-token count) are left out of the
ONNX model, which has no such op (passes/drop_assertions.py); the PyTorch graph keeps them.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import fx, nn
from torch.export import Dim

from ..deprecation import api_options
from ..errors import ExportError
from ..files.atomic import check_writable
from ..graph.experts import grouped_sites
from ..graph.gates import active_adapters
from ..graph.record import require_graph
from ..options import flag
from ..passes.drop_assertions import drop_assertions, has_assertions
from ..passes.layers import flat_view
from ..passes.quantized_base import is_quantized_call
from .adapter_graph import (
    AdapterInput,
    adapter_graph,
    adapter_inputs,
    adapter_names,
    adapter_tensors,
    check_adapter,
    copy_graph,
    shared_graph_problem,
)
from .exporter import all_axes, eval_mode, name_dims, run_exporter, save
from .manifest import write_manifest
from .merged_weights import MergedGraph, attach_merged, merged_graph
from .optimize import optimize_graph
from .ort_adapter import SUFFIX, check_adapter_file, layout_fingerprint, model_slots, write_adapter_file
from .per_row import IDS, NONE_ID, per_row_graph, row_swap
from .quantized_ops import integer_base, translations
from .session import AdapterSession
from .signature import FlatCall, Signature, flat_outputs, signature

if TYPE_CHECKING:
    import onnx_ir as ir

MODES = ("auto", "merged", "adapters", "per_row")
MIN_OPSET = 18  # the oldest opset torch.onnx's dynamo exporter translates to


@dataclasses.dataclass
class OnnxExport:
    """What `export_onnx` wrote.

    Args:
        path: the .onnx model.
        mode: the export mode used: "merged", "adapters" or "per_row".
        inputs: the model's inputs, in order (plus "adapter_ids" for "per_row").
        outputs: the model's outputs, in order.
        adapter_inputs: mode "adapters": the swappable adapter inputs; else empty.
        adapters: mode "adapters": adapter name -> its .onnx_adapter file; else empty.
        row_adapters: mode "per_row": the adapters of id 0, 1, ... (-1 is none); else empty.
        files: every file written, the sidecar included.
    """

    path: Path
    mode: str
    inputs: list[str]
    outputs: list[str]
    adapter_inputs: list[str]
    adapters: dict[str, Path]
    row_adapters: list[str]
    files: list[Path]

    def session(self, *, adapters: Mapping[str, str | os.PathLike] | None = None,
                providers: Sequence[str] | None = None, session_options: Any = None) -> AdapterSession:
        """An ONNX Runtime session over this export, with its adapter files loaded.

        Args:
            adapters: extra {name: .onnx_adapter file} to load besides the export's own.
            providers: ONNX Runtime execution providers (default: CUDA when available, else CPU).
            session_options: an `onnxruntime.SessionOptions` (thread counts, ...).

        Returns:
            An `AdapterSession` over `path`.

        Raises:
            ExportError: ONNX Runtime cannot load the model.
            AdapterFileError: an adapter file does not fit the model, or onnxruntime is not installed.
        """
        return AdapterSession(self.path, adapters=adapters, providers=providers, session_options=session_options)


@dataclasses.dataclass
class _Graph:
    """What to hand the exporter beyond the model inputs."""

    module: FlatCall
    extra: list[tuple[str, torch.Tensor, dict]]  # (input name, example, dynamic axes)
    dim_names: dict[tuple[str, int], str]


def _pick_mode(model: nn.Module, mode: str) -> str:
    if mode not in MODES:
        raise ExportError(f"mode must be one of {MODES}, got {mode!r}")
    has_adapters = isinstance(model, fx.GraphModule) and bool(adapter_names(model))
    if mode == "auto":
        return "adapters" if has_adapters else "merged"
    if mode != "merged" and not has_adapters:
        raise ExportError(
            f"mode={mode!r} needs a graph with adapters (from lfx.rewrite); this one has none, "
            "so export it with mode='merged'"
        )
    return mode


def _chosen(model: fx.GraphModule, adapters: str | Sequence[str] | None) -> list[str]:
    names = adapter_names(model) if adapters is None else [adapters] if isinstance(adapters, str) else list(adapters)
    for name in names:
        check_adapter(model, name)
    if not names:
        raise ExportError("adapters=[] selects nothing; name at least one adapter of the graph")
    return names


def _rank_example(tensor: torch.Tensor, axis: int | None) -> torch.Tensor:
    """The tensor, zero-padded to size 2 along a rank axis of size 1 (export fixes size-1 dims)."""
    if axis is None or tensor.shape[axis] >= 2:
        return tensor
    pad = list(tensor.shape)
    pad[axis] = 2 - tensor.shape[axis]
    return torch.cat([tensor, tensor.new_zeros(pad)], dim=axis)


def _adapters_graph(model: fx.GraphModule, sig: Signature, names: list[str]) -> tuple[_Graph, list[AdapterInput]]:
    template = names[0]
    for other in names[1:]:
        problem = shared_graph_problem(model, template, other)
        if problem:
            raise ExportError(
                f"adapter {other!r} cannot share the ONNX graph of {template!r}: {problem}. "
                f"Export it to its own file: lfx.export_onnx(gm, other_path, adapters=[{other!r}])"
            )
    layout = adapter_inputs(model, template)
    values = adapter_tensors(model, template)
    paths = [entry.path for entry in layout]
    module = FlatCall(adapter_graph(model, template), sig, swap=lambda inputs, extra: dict(zip(paths, extra)))
    extra = [(e.name, _rank_example(values[e.name], e.rank_axis),
              {} if e.rank_axis is None else {e.rank_axis: Dim.DYNAMIC}) for e in layout]
    dims = {(e.name, e.rank_axis): f"{e.owner}.rank" for e in layout if e.rank_axis is not None}
    return _Graph(module, extra, dims), layout


def _per_row_graph(model: fx.GraphModule, sig: Signature, names: list[str]) -> _Graph:
    batch = sig.examples[0].shape[0]
    ids = torch.arange(batch, dtype=torch.int64) % len(names)
    module = FlatCall(per_row_graph(model, names), sig, swap=row_swap(len(names)))
    return _Graph(module, [(IDS, ids, {0: Dim.AUTO})], {(IDS, 0): "batch"})


def _model_dims(sig: Signature, dynamic_shapes: dict | None) -> tuple[list[dict], dict]:
    given = dict(dynamic_shapes or {})
    unknown = [name for name in given if name not in sig.names]
    if unknown:
        raise ExportError(f"dynamic_shapes names {unknown}, which are not inputs; the inputs are {sig.names}")
    dynamic = [given.get(name, all_axes(t)) for name, t in zip(sig.names, sig.examples)]
    first = sig.examples[0] if sig.examples else None
    if first is not None and any(first.shape[axis] == 1 for axis in range(min(2, first.dim()))):
        warnings.warn(
            f"example input {sig.names[0]} has size 1 in its batch or sequence axis; the exporter "
            "fixes size-1 axes, so the ONNX model would accept only size 1 there. Use examples "
            "with sizes >= 2.", stacklevel=3,
        )
    names = {(sig.names[0], 0): "batch", (sig.names[0], 1): "sequence"} if sig.names else {}
    for name, tensor in zip(sig.names, sig.examples):
        for axis in range(tensor.dim()):
            names.setdefault((name, axis), f"{name}_dim{axis}")
    return dynamic, names


def _integer_base(graph: _Graph, model: nn.Module) -> bool:
    """Make the quantized layers of the graph to export ONNX Runtime's integer matmuls (on a
    copy: the caller's graph keeps its own). Whether there were any."""
    inner = graph.module.model
    if not isinstance(inner, fx.GraphModule) or not any(is_quantized_call(n) for n in inner.graph.nodes):
        return False
    if inner is model:
        inner = graph.module.model = copy_graph(model, [])[0]
    integer_base(inner)
    return True


def _drop_assertions(graph: _Graph, model: nn.Module) -> None:
    """Remove the graph's runtime assertions, which ONNX cannot express (passes/drop_assertions.py),
    on a copy: the caller's graph keeps them."""
    inner = graph.module.model
    if not isinstance(inner, fx.GraphModule) or not has_assertions(inner.graph):
        return
    if inner is model:
        inner = graph.module.model = copy_graph(model, [])[0]
    drop_assertions(inner)


def _output_names(model: nn.Module, sig: Signature) -> list[str]:
    args, kwargs = sig.rebuild(sig.examples)
    with eval_mode(model), torch.no_grad():
        try:
            result = model(*args, **kwargs)
        except Exception as err:
            raise ExportError(
                f"the graph fails in PyTorch on the example inputs ({type(err).__name__}: {err}); "
                "pass example_inputs / example_kwargs it accepts (as for lfx.rewrite)"
            ) from err
    return flat_outputs(result, reserved=[*sig.names, IDS])[0]


def _add_defaults(model: ir.Model, layout: list[AdapterInput]) -> None:
    """Give each adapter input a same-named initializer: its default (a trained module's base
    values), else empty along its rank axis, else zeros."""
    import onnx_ir as ir

    inputs = {value.name: value for value in model.graph.inputs}
    for entry in layout:
        value = inputs[entry.name]
        shape = [0 if i == entry.rank_axis else int(d) for i, d in enumerate(value.shape)]
        default = entry.default.cpu() if entry.default is not None else None
        if default is not None and default.dtype == torch.bfloat16:
            default = default.float()  # numpy has no bfloat16; cast back below
        array = (default.numpy().astype(value.dtype.numpy()) if default is not None
                 else np.zeros(shape, dtype=value.dtype.numpy()))
        value.const_value = ir.tensor(array, name=entry.name)
        model.graph.register_initializer(value)


@api_options(positional=2)
def export_onnx(model: nn.Module | fx.GraphModule, path: str | os.PathLike, *,
                example_inputs: tuple[Any, ...] | None = None, example_kwargs: dict[str, Any] | None = None,
                mode: str = "auto", adapters: str | Sequence[str] | None = None,
                dynamic_shapes: dict[str, dict[int, Any]] | None = None, external_data: bool | None = None,
                opset: int | None = None, custom_translation_table: dict[Any, Any] | None = None,
                optimize: bool = True) -> OnnxExport:
    """Export `model` to the ONNX file `path` (modes and layout: this module's docstring).

    The graph is exported in eval mode and keeps its own mode; it is not changed.

    Args:
        model: a GraphModule from `lfx.rewrite` / `lfx.merge`, or any module.
        path: the .onnx file to write; adapter files and the sidecar go beside it.
        example_inputs: positional example inputs, a call the model accepts (as for
            `lfx.rewrite`); tensors become ONNX inputs, other values are fixed.
        example_kwargs: keyword example inputs (decoders: {"use_cache": False}).
        mode: "auto" (the default: "merged" for a graph without adapters, else "adapters"),
            "merged", "adapters" or "per_row".
        adapters: which adapters to export: a name, a list, or None for the default of the
            mode. "merged" folds them into the weights (default: the graph's active set,
            `lfx.set_active_adapters`); "adapters" (default: all) exports the first one's
            graph, and the others must have the same structure (ranks may differ); "per_row"
            (default: all) gives them the ids 0, 1, ... in this order.
        dynamic_shapes: {input name: {axis: torch.export.Dim}} overriding the default, which
            makes every axis of every input dynamic.
        external_data: write the weights to `<path>.data` (default: only above 2 GB).
        opset: the ONNX opset, >= 18 (default: the exporter's).
        custom_translation_table: extra torch op -> onnxscript function translations for the exporter.
        optimize: run the linear-cost clean-up of optimize.py on the exported graph.

    Returns:
        An `OnnxExport` listing the model, its inputs and outputs, adapter files and every file written.

    Raises:
        ExportError: no example inputs, an unknown mode or adapter, a mode that needs
            adapters on a graph without them, adapters that cannot share one graph, a bad
            opset or dynamic_shapes entry, `path` a folder, or the exporter fails.
        FileWriteError: `path`'s folder cannot be written.
        SpecError: `external_data` is not a bool or None.
    """
    if Path(path).is_dir():
        raise ExportError(f"{path} is a folder; give the .onnx file to write, e.g. {Path(path) / 'model.onnx'}")
    if example_inputs is None and example_kwargs is None:
        raise ExportError("export_onnx needs example_inputs (and/or example_kwargs): a call the model accepts")
    if external_data is not None:
        flag("export_onnx", "external_data", external_data)
    if opset is not None and not (isinstance(opset, int) and not isinstance(opset, bool) and opset >= MIN_OPSET):
        raise ExportError(f"export_onnx opset must be an int >= {MIN_OPSET} (torch's ONNX exporter writes opset "
                          f"{MIN_OPSET} and up), got {opset!r}; leave it None for the exporter's default")
    check_writable(Path(path).parent, path)
    model = flat_view(model) if isinstance(model, fx.GraphModule) else model  # layer blocks inlined
    if isinstance(model, fx.GraphModule) and grouped_sites(model):
        raise ExportError(
            f"this graph runs its experts through grouped matmuls ({grouped_sites(model)[0]}, ...), which ONNX has no "
            "op for: it was captured inside lfx.experts_implementation('grouped_mm'). Capture the model again outside "
            "that block (batched_mm, the default) and load the adapter into it (lfx.save_adapters / lfx.load_adapters)"
        )
    mode = _pick_mode(model, mode)
    sig = signature(model, example_inputs if example_inputs is not None else (), example_kwargs)
    outputs = _output_names(model, sig)
    dynamic, dim_names = _model_dims(sig, dynamic_shapes)
    layout: list[AdapterInput] = []
    names: list[str] = []
    merged = None
    if mode == "merged":
        merged = MergedGraph(model, {})
        if isinstance(model, fx.GraphModule) and adapter_names(model):
            merged = merged_graph(model, _chosen(model, adapters) if adapters is not None else active_adapters(model))
        graph = _Graph(FlatCall(merged.graph, sig), [], {})
    elif mode == "adapters":
        names = _chosen(model, adapters)
        graph, layout = _adapters_graph(model, sig, names)
    else:
        names = _chosen(model, adapters)
        graph = _per_row_graph(model, sig, names)
    _drop_assertions(graph, model)
    if _integer_base(graph, model):
        custom_translation_table = {**translations(), **(custom_translation_table or {})}
    onnx_model = run_exporter(
        graph.module, sig.examples + [e[1] for e in graph.extra], sig.names + [e[0] for e in graph.extra], outputs,
        dynamic + [e[2] for e in graph.extra], opset, custom_translation_table,
    )
    if merged is not None:
        attach_merged(onnx_model, merged)
    if optimize:
        optimize_graph(onnx_model)
    name_dims(onnx_model, {**dim_names, **graph.dim_names})
    _add_defaults(onnx_model, layout)
    files = save(onnx_model, path, external_data)
    path = Path(path)
    adapter_files = {}
    if mode == "adapters":
        adapter_files = {name: export_onnx_adapter(model, path.with_name(f"{path.stem}.{name}{SUFFIX}"), adapter=name)
                         for name in names}
    sidecar = write_manifest(path, {
        "mode": mode, "inputs": sig.names, "outputs": outputs,
        "adapter_inputs": [e.name for e in layout],
        "adapters": {name: file.name for name, file in adapter_files.items()},
        **({"row_adapters": names, "none_id": NONE_ID} if mode == "per_row" else {}),
    })
    return OnnxExport(path, mode, sig.names + ([IDS] if mode == "per_row" else []), outputs,
                      [e.name for e in layout], adapter_files, names if mode == "per_row" else [],
                      files + list(adapter_files.values()) + [sidecar])


@api_options(positional=2, renamed={"model": "model_path"})
def export_onnx_adapter(gm: fx.GraphModule, path: str | os.PathLike, *, adapter: str = "default",
                        model_path: str | os.PathLike | None = None) -> Path:
    """Write adapter `adapter` of `gm` as an ONNX Runtime `.onnx_adapter` file.

    It fits any model exported (mode "adapters") from a graph of the same structure, for
    instance one trained later with the same spec.

    Args:
        gm: a graph from `lfx.rewrite` with the adapter.
        path: the file to write (suffix `.onnx_adapter` by convention).
        adapter: the adapter to write (default "default").
        model_path: an exported .onnx model to check the file against; a file that does not
            fit it is removed again. Replaces `model=`, which is still accepted for one release.

    Returns:
        The path written.

    Raises:
        ExportError: `gm` has no adapter `adapter`, or `model_path` is not a file.
        AdapterFileError: the file does not fit `model_path`'s model, or onnxruntime is not installed.
        ModelTypeError: `gm` is not a lowrank_fx graph.
    """
    require_graph(gm, "lfx.export_onnx_adapter")
    if model_path is not None and not Path(model_path).is_file():
        raise ExportError(f"model_path={model_path}: no such .onnx file; pass the model exported with "
                          "lfx.export_onnx(gm, path, mode='adapters') to check the adapter file against")
    gm = flat_view(gm)
    check_adapter(gm, adapter)
    tensors = adapter_tensors(gm, adapter)
    axes = {e.name: e.rank_axis for e in adapter_inputs(gm, adapter)}
    written = write_adapter_file(path, tensors, layout_fingerprint(tensors, axes))
    if model_path is not None:
        try:
            check_adapter_file(written, model_slots(model_path))
        except Exception:
            written.unlink()
            raise
    return written
