"""Run torch's dynamo ONNX exporter on a `FlatCall` and turn its failures into ExportErrors.

`run_exporter` exports in eval mode and without autograd, with the dynamic axes given per
input, and returns the `onnx_ir` model for post-processing. Symbolic dimensions get
readable names afterwards (`name_dims`): the exporter's `s72` becomes `batch`.
`save` writes the model, with external data when asked or when it is above 2 GB, streaming
the weights to disk one at a time either way (stream_save.py; onnx_ir's external-data writer).
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch.export import Dim

from ..errors import ExportError
from ..noise import quiet_third_party
from ..progress import stage
from .signature import FlatCall
from .stream_save import save_streaming

if TYPE_CHECKING:
    import onnx_ir as ir

TWO_GB = 2**31


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module):
    """The model in eval mode inside the block; every submodule's own mode restored afterwards."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def all_axes(tensor: torch.Tensor) -> dict:
    """Every axis Dim.AUTO: dynamic unless the graph fixes it."""
    return {axis: Dim.AUTO for axis in range(tensor.dim())}


@stage("exporting ONNX (torch.onnx.export)")
def run_exporter(module: FlatCall, examples: list[torch.Tensor], input_names: list[str],
                 output_names: list[str], dynamic: list[dict], opset: int | None = None,
                 custom_translation_table: dict | None = None) -> ir.Model:
    """The ONNX model of `module(*examples)` (an onnx_ir Model, not yet cleaned up or saved).

    The exporter's own optimizer is off: optimize.py's clean-up runs afterwards, once the
    caller has set lazy weights (merged_weights.py)."""
    with eval_mode(module), torch.no_grad(), quiet_third_party():
        try:
            program = torch.onnx.export(
                module, tuple(examples), dynamo=True, dynamic_shapes=(tuple(dynamic),),
                input_names=input_names, output_names=output_names, opset_version=opset,
                custom_translation_table=custom_translation_table, optimize=False, verbose=False,
            )
        except Exception as err:
            raise explain(err) from err
    return program.model


def _chain(err: BaseException):
    while err is not None:
        yield err
        err = err.__cause__ or err.__context__


def explain(err: Exception) -> ExportError:
    """An ExportError naming the node that failed and what to do about it."""
    messages = [str(e) for e in _chain(err)]
    text = "\n".join(messages)
    node = re.search(r"Error when translating node %(\S+) : .*?target=([\w.:]+)", text)
    if node:
        reason = next((m.splitlines()[0] for m in messages if "No ONNX function found" in m), "")
        reason = re.sub(r"\x1b\[[0-9;]*m", "", reason)
        return ExportError(
            f"ONNX export failed at node {node.group(1)} (op {node.group(2)}): "
            f"{reason or 'the ONNX translation of this op failed'}. Fix: pass "
            f"custom_translation_table={{{node.group(2)}: <onnxscript function>}} to export_onnx, "
            "or express the op with standard torch ops in the model and capture it again."
        )
    summary = re.search(r"## Exception summary\s+(.+?)(?:\n\n|$)", text, re.S)
    detail = summary.group(1).strip() if summary else messages[-1].strip().splitlines()[0]
    detail = re.sub(r"\x1b\[[0-9;]*m", "", detail)
    return ExportError(
        f"ONNX export failed while tracing the graph ({type(err).__name__}): {detail}\n"
        "Fix: the graph runs in PyTorch on these examples, so torch.export could not trace "
        "it: rewrite a data-dependent branch or untraceable op in the model, or pin the "
        "shapes it needs with dynamic_shapes={input: {axis: Dim(...)}}."
    )


def name_dims(model: ir.Model, names: dict[tuple[str, int], str]) -> None:
    """Rename symbolic dims: {(input name, axis): new name}, applied to every value in the graph."""
    import onnx_ir as ir

    inputs = {value.name: value for value in model.graph.inputs}
    renames: dict[str, str] = {}
    for (name, axis), new in names.items():
        dim = inputs[name].shape[axis]
        if isinstance(dim, ir.SymbolicDim) and dim.value is not None and dim.value not in renames:
            renames[dim.value] = new
    values = list(model.graph.inputs) + list(model.graph.outputs)
    values += [out for node in model.graph for out in node.outputs]
    for value in values:
        if value.shape is None:
            continue
        dims = [ir.SymbolicDim(renames[d.value]) if isinstance(d, ir.SymbolicDim) and d.value in renames else d
                for d in value.shape]
        value.shape = ir.Shape(dims)


@stage("writing the ONNX file")
def save(model: ir.Model, path: str | os.PathLike, external_data: bool | None) -> list[Path]:
    """Write `model` to `path`; returns the files written (the .onnx and any .data file).

    external_data=None: weights go to `<path>.data` only when they exceed 2 GB (the
    protobuf limit); True or False forces the choice.
    """
    import onnx_ir as ir

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    size = sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)
    if size > TWO_GB and external_data is False:
        raise ExportError(
            f"the weights are {size / 2**30:.1f} GiB, above protobuf's 2 GiB limit for one .onnx "
            "file: export with external_data=True (or None, the default, which picks it)"
        )
    data = path.with_name(path.name + ".data")
    files = [path, data] if external_data or size > TWO_GB else [path]
    try:
        if len(files) == 2:
            ir.save(model, path, external_data=data.name)
        else:
            save_streaming(model, path)
    except BaseException:  # a lazy weight that failed (MergeError) leaves no partial files
        for file in files:
            file.unlink(missing_ok=True)
        raise
    return files
