"""Write an ONNX model below 2 GB as ONE file, streaming each weight from its tensor to disk.

`onnx_ir.save` (and `onnx.save`) build the whole ModelProto in memory, every weight copied
into it, then serialize it into a second full copy: for a 1.9 GB model, +4 GB and half a
minute. This writer never holds more than one weight's header:

    file = ModelProto without the main graph's initializers
         + for each initializer t:  [graph = 7] ⟨ [initializer = 5] ⟨ TensorProto(t) ⟩ ⟩

Protocol buffers merge repeated occurrences of an embedded-message field (here ModelProto's
`graph`, field 7), concatenating their repeated fields: parsing the file gives exactly the
model whose graph lists the initializers in this order (onnx.load and ONNX Runtime both do).
Each TensorProto is its header (name, dims, data_type, ...) serialized by protobuf, followed
by `raw_data` (field 9) written from the tensor itself (`tofile`: the exporter's TorchTensor
writes the parameter's memory as it is, a lazy tensor computes its value first). String
tensors, which have no raw form, stay in the first part.
"""

from __future__ import annotations

import os
from pathlib import Path

import onnx
import onnx_ir as ir

from ..errors import ExportError

_GRAPH_FIELD = 7  # ModelProto.graph
_INITIALIZER_FIELD = 5  # GraphProto.initializer
_RAW_DATA_FIELD = 9  # TensorProto.raw_data
_LEN = 2  # wire type of length-delimited fields


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _key(field: int) -> bytes:
    return _varint(field << 3 | _LEN)


def _header(value: ir.Value) -> bytes:
    """The TensorProto of an initializer without its data."""
    tensor = value.const_value
    proto = onnx.TensorProto(name=value.name, data_type=int(tensor.dtype), dims=[int(d) for d in tensor.shape])
    if tensor.doc_string:
        proto.doc_string = tensor.doc_string
    for key, text in tensor.metadata_props.items():
        proto.metadata_props.add(key=key, value=text)
    return proto.SerializeToString()


def _streamed(model: ir.Model) -> list[ir.Value]:
    return [v for v in model.graph.initializers.values()
            if v.const_value is not None and v.const_value.dtype != ir.DataType.STRING]


def _skeleton(model: ir.Model, streamed: list[ir.Value]) -> bytes:
    """The serialized model without the initializers in `streamed` (restored afterwards), but
    with their value infos, as onnx_ir writes them."""
    order = list(model.graph.initializers.values())
    for value in streamed:
        model.graph.initializers.pop(value.name)
    try:
        proto = ir.serde.serialize_model(model)
    finally:
        model.graph.initializers.clear()
        for value in order:
            model.graph.register_initializer(value)
    inputs = {value.name for value in model.graph.inputs}
    infos = [ir.serde.serialize_value(v) for v in streamed if v.name not in inputs and _has_info(v)]
    infos += list(proto.graph.value_info)  # onnx_ir lists initializers' value infos first
    del proto.graph.value_info[:]
    proto.graph.value_info.extend(infos)
    return proto.SerializeToString()


def _has_info(value: ir.Value) -> bool:
    """Whether onnx_ir writes a value_info for this initializer (as its own save does)."""
    return (value.shape is not None or value.type is not None or bool(value.metadata_props)
            or bool(value.doc_string))


def save_streaming(model: ir.Model, path: str | os.PathLike) -> Path:
    """Write `model` to `path` as one .onnx file (see the module docstring)."""
    path = Path(path)
    streamed = _streamed(model)
    with open(path, "wb") as file:
        file.write(_skeleton(model, streamed))
        for value in streamed:
            header = _header(value)
            size = value.const_value.nbytes
            tensor = header + _key(_RAW_DATA_FIELD) + _varint(size)
            tensor_length = len(tensor) + size
            inner = _key(_INITIALIZER_FIELD) + _varint(tensor_length)
            file.write(_key(_GRAPH_FIELD) + _varint(len(inner) + tensor_length) + inner + tensor)
            start = file.tell()
            value.const_value.tofile(file)
            if file.tell() - start != size:
                raise ExportError(f"initializer {value.name} wrote {file.tell() - start} bytes, "
                                  f"its dtype and shape say {size}; the ONNX file {path} is incomplete")
    return path
