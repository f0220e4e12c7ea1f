"""The torch tensor behind an onnx_ir tensor, without a copy where the data is already torch's.

The exporter's initializers are `TorchTensor`s wrapping the model's own parameters; lazy
initializers (optimize.py, merged_weights.py) return one when evaluated; anything else is
read through numpy (bfloat16 through a uint16 view, numpy having no bfloat16 of its own).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import torch


def torch_view(tensor: ir.TensorProtocol) -> torch.Tensor:
    """`tensor`'s data as a torch tensor (shared with it where possible)."""
    if isinstance(tensor, ir.LazyTensor):
        return torch_view(tensor.raw())
    raw = getattr(tensor, "raw", None)
    if isinstance(raw, torch.Tensor):
        return raw.detach()
    array = np.asarray(tensor.numpy())
    if tensor.dtype == ir.DataType.BFLOAT16:
        return torch.from_numpy(array.view(np.uint16)).view(torch.bfloat16)
    return torch.from_numpy(array)
