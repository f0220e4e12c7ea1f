"""What lowrank_fx knows about quantized weight formats: names, sizes, requantizing, and the
bitsandbytes layers it swaps before capture.

Finding a quantized layer never depends on a format (graph/quantized.py finds it as the region
of nodes recorded under one Linear module). This module only

  - names the scheme of a quantized tensor for `plan` ("int8", "nf4", "int4", "int4 packed",
    "bnb-nf4", ...) and counts its bytes;
  - requantizes a dense weight into the format of an existing quantized one (folding with
    `requantize=True`, `load_merged` into a quantized model), with the format's own API:
    torchao's `from_hp` / `to_nf4` with the old tensor's block sizes, bitsandbytes'
    `quantize_4bit` / `int8_vectorwise_quant`;
  - swaps bitsandbytes' `Linear4bit` / `Linear8bitLt` for `BnbLinear4bit` / `BnbLinear8bit`
    while the model is captured (their parameters do not export: FakeTensor has no `CB` or
    `quant_state`). The swapped layer holds the same packed tensors (no copy) and computes
    `F.linear(x, torch.ops.bitsandbytes.dequantize_4bit(...))` (or the 8-bit dequantize): the
    weight-only semantics bitsandbytes' own backward uses. On CUDA bitsandbytes' 8-bit *forward*
    also quantizes the activation to int8 (LLM.int8()); the swapped layer never does.

torchao and bitsandbytes are imported only when a tensor of theirs is met.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from ..errors import QuantizedBaseError
from .quant_int4 import int4_opaque_dense


def inner_tensors(tensor: torch.Tensor) -> list[torch.Tensor]:
    """The plain tensors a tensor subclass is made of (recursively), or [tensor]."""
    if not is_traceable_wrapper_subclass(tensor):
        return [tensor]
    names, _ = tensor.__tensor_flatten__()
    return [t for name in names for t in inner_tensors(getattr(tensor, name))]


def stored_bytes(tensor: torch.Tensor) -> int:
    """Bytes a (possibly quantized) tensor occupies: the sum over its inner tensors."""
    return sum(t.numel() * t.element_size() for t in inner_tensors(tensor))


def is_quantized(tensor) -> bool:
    """A tensor subclass (torchao's quantized weights) or an integer tensor (packed bytes)."""
    if not isinstance(tensor, torch.Tensor):
        return False
    return is_traceable_wrapper_subclass(tensor) or not (tensor.is_floating_point() or tensor.is_complex())


def scheme_name(tensor: torch.Tensor, module_type: str = "") -> str:
    """A short name for the format of a quantized tensor, for `plan` and messages."""
    kind = type(tensor).__name__
    if kind == "Int8Tensor":
        return "int8 dynamic activation" if getattr(tensor, "act_quant_kwargs", None) is not None else "int8"
    if kind == "NF4Tensor":
        return "nf4"
    if kind == "IntxUnpackedToInt8Tensor":
        dtype = str(getattr(tensor, "target_dtype", "intx")).replace("torch.", "")
        quantized_activation = getattr(tensor, "activation_quantization", None) is not None
        return f"{dtype} dynamic activation" if quantized_activation else dtype
    if kind in ("Int4OpaqueTensor", "Int4TilePackedTo4dTensor", "Int4Tensor"):
        return "int4 packed" if getattr(tensor, "act_mapping_type", None) is None else "int4 dynamic activation"
    for swapped in (BnbLinear4bit, BnbLinear8bit):
        if module_type == f"{swapped.__module__}.{swapped.__qualname__}":
            return swapped.scheme_label
    return kind if is_traceable_wrapper_subclass(tensor) else f"{str(tensor.dtype).replace('torch.', '')} packed"


# (scheme, device type) -> what its kernel costs there, for `plan` (measured: benchmarks/RESULTS.md)
SLOW_KERNELS = {
    ("int4 packed", "cpu"): "torchao has no fast CPU kernel for it (aten._weight_int4pack_mm_for_cpu runs "
                            "tens of times slower than an fp32 matmul of the same size); a training step "
                            "over it is far slower than over fp32, int8 or nf4. Use it for its size, or "
                            "quantize with 'int8' / 'nf4' to train on a CPU",
}


def row_scaled(kind: type, inner: dict[str, torch.Tensor], size) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(q (out, in) integer codes, s (out, 1)) with W = s · q, for torchao's per-row int8 without
    zero point; None for any other format."""
    if kind.__name__ != "Int8Tensor" or inner.get("zero_point") is not None or "scale" not in inner:
        return None
    scale = inner["scale"]
    return (inner["qdata"], scale.reshape(-1, 1)) if scale.numel() == size[0] else None


def torchao_dense(kind: Any, inner: dict[str, torch.Tensor], context, size, stride) -> torch.Tensor | None:
    """The dense weight of a torchao tensor rebuilt from its inner tensors (optional ones may
    be missing), by the format's own dequantize (packed int4 on the CPU: its own pack order,
    graph/quant_int4.py); None when the format has none."""
    names = list(getattr(kind, "tensor_data_names", [])) + list(getattr(kind, "optional_tensor_data_names", []))
    values: dict[str, Any] = {name: inner.get(name) for name in names} if names else inner
    try:
        factors = row_scaled(kind, values, size)
        if factors is not None:  # W = s · q, one pass (dequantize_affine takes three)
            return factors[0].to(factors[1].dtype) * factors[1]
        tensor = kind.__tensor_unflatten__(values, context, size, stride)
        if kind.__name__ == "Int4OpaqueTensor" and getattr(tensor, "act_mapping_type", None) is None:
            return int4_opaque_dense(tensor.qdata, tensor.scale_and_zero, tensor.shape, int(tensor.block_size[1]))
        return tensor.get_original_weight() if kind.__name__ == "NF4Tensor" else tensor.dequantize()
    except (KeyError, TypeError, NotImplementedError, RuntimeError, AttributeError):
        return None


# --- requantizing a dense weight into the format of an existing quantized one --------------

def _torchao_requantize(old: Any, dense: torch.Tensor) -> torch.Tensor:
    """`old` is a torchao tensor subclass: its block sizes and constructors are its own."""
    kind = type(old).__name__
    if kind == "NF4Tensor":
        from torchao.quantization import to_nf4
        return to_nf4(dense, old.block_size, old.scaler_block_size)
    if kind == "Int8Tensor":
        from torchao.quantization.granularity import PerRow, PerTensor
        block = list(old.block_size)
        if block == [1, dense.shape[1]]:
            granularity = PerRow()
        elif block == list(dense.shape):
            granularity = PerTensor()
        else:
            raise NotImplementedError(f"int8 block size {block}")
        return type(old).from_hp(dense, granularity)
    if kind == "IntxUnpackedToInt8Tensor":
        from torchao.quantization.quant_primitives import MappingType
        mapping = MappingType.SYMMETRIC if not bool(old.zero_point.any()) else MappingType.ASYMMETRIC
        return type(old).from_hp(dense, tuple(old.block_size), old.target_dtype, mapping_type=mapping)
    if kind == "Int4OpaqueTensor":
        return type(old).from_hp(dense, list(old.block_size))
    raise NotImplementedError(kind)


def requantize(old: Any, dense: torch.Tensor) -> torch.Tensor:
    """`dense` (out, in) quantized in the format of the torchao tensor `old` (same block sizes).

    Raises NotImplementedError (naming the format) for a format lowrank_fx cannot rebuild."""
    try:
        new = _torchao_requantize(old, dense.to(old.dtype).contiguous())
    except NotImplementedError as err:
        raise NotImplementedError(
            f"lowrank_fx cannot requantize a {type(old).__name__} ({err}); fold to dense weights instead "
            "(lfx.merge(gm) / lfx.merged_state_dict(gm) without requantize)"
        ) from None
    return new


def requantize_bitsandbytes(module: nn.Module, dense: torch.Tensor) -> nn.Parameter:
    """A new weight for a bitsandbytes Linear4bit / Linear8bitLt holding `dense` (out, in),
    quantized as the old one (4-bit: same quant type, block size, nested statistics)."""
    import bitsandbytes as bnb
    old: Any = module.weight  # a bitsandbytes Params4bit / Int8Params
    new: Any
    if isinstance(module, bnb.nn.Linear4bit):
        state = old.quant_state
        new = bnb.nn.Params4bit(dense.detach().to("cpu", state.dtype).contiguous(), requires_grad=False,
                                quant_type=state.quant_type, blocksize=state.blocksize,
                                compress_statistics=state.nested, quant_storage=old.quant_storage)
        return new.to(old.device)  # bitsandbytes quantizes when a Params4bit moves to its device
    new = bnb.nn.Int8Params(dense.detach().to("cpu").contiguous(), requires_grad=False, has_fp16_weights=False)
    matmul_state: Any = module.state
    matmul_state.CB = matmul_state.SCB = None  # the layer takes CB / SCB from its new weight on first use
    return new.to(old.device)


# --- bitsandbytes, swapped before capture ---------------------------------------------------

class BnbLinear4bit(nn.Linear):
    """bitsandbytes' Linear4bit as dequantize_4bit + F.linear, on the same packed tensors."""

    scheme_label = "bnb-4bit"
    absmax: torch.Tensor
    absmax_scale: torch.Tensor
    absmax_code: torch.Tensor
    absmax_offset: torch.Tensor

    def __init__(self, source: nn.Module):
        nn.Module.__init__(self)
        weight: Any = source.weight  # a bitsandbytes Params4bit
        state = weight.quant_state
        self.out_features, self.in_features = int(state.shape[0]), int(state.shape[1])
        self.weight = nn.Parameter(weight.data, requires_grad=False)  # the packed bytes, shared
        self.bias = source.bias  # type: ignore[assignment]  # a Parameter or None, as nn.Linear's
        self.blocksize, self.quant_type = int(state.blocksize), str(state.quant_type)
        self.shape, self.dtype = [int(s) for s in state.shape], state.dtype
        self.nested = bool(state.nested)
        if self.nested:
            self.register_buffer("absmax", state.absmax)
            self.register_buffer("absmax_scale", state.state2.absmax)
            self.register_buffer("absmax_code", state.state2.code)
            self.register_buffer("absmax_offset", torch.as_tensor(state.offset, dtype=torch.float32).reshape(()))
            self.absmax_blocksize = int(state.state2.blocksize)
        else:
            self.register_buffer("absmax", state.absmax)
        self.scheme_label = f"bnb-{self.quant_type}"

    def dense_weight(self, tensors: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """W (out, in) in the layer's dtype; `tensors` by name replace the layer's own."""
        get = lambda name: (tensors or {}).get(name, getattr(self, name, None))  # noqa: E731
        absmax: Any = get("absmax")
        if self.nested:
            absmax = torch.ops.bitsandbytes.dequantize_blockwise(
                absmax, get("absmax_scale"), get("absmax_code"), self.absmax_blocksize, torch.float32
            ) + get("absmax_offset")
        return torch.ops.bitsandbytes.dequantize_4bit(get("weight"), absmax.float(), self.blocksize,
                                                     self.quant_type, self.shape, self.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dense_weight().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def requantize(self, dense: torch.Tensor) -> dict[str, torch.Tensor]:
        """New packed tensors for `dense` (out, in), by this layer's tensor names."""
        import bitsandbytes.functional as bnbf
        packed, state = bnbf.quantize_4bit(dense.to(self.dtype).contiguous(), blocksize=self.blocksize,
                                           compress_statistics=self.nested, quant_type=self.quant_type)
        new = {"weight": packed.reshape(self.weight.shape), "absmax": state.absmax}
        if self.nested:
            new.update(absmax_scale=state.state2.absmax, absmax_code=state.state2.code,
                       absmax_offset=torch.as_tensor(state.offset, dtype=torch.float32).reshape(()))
        return new


class BnbLinear8bit(nn.Linear):
    """bitsandbytes' Linear8bitLt (inference weights) as int8_vectorwise_dequant + F.linear."""

    scheme_label = "bnb-int8"
    SCB: torch.Tensor

    def __init__(self, source: nn.Module):
        nn.Module.__init__(self)
        weight: Any = source.weight  # a bitsandbytes Int8Params
        scales = getattr(weight, "SCB", None)
        if scales is None:
            scales = getattr(source, "state").SCB  # noqa: B009  # the layer's MatmulLtState
        self.out_features, self.in_features = int(weight.shape[0]), int(weight.shape[1])
        self.weight = nn.Parameter(weight.data, requires_grad=False)  # int8 rows, shared
        self.register_buffer("SCB", scales)
        self.bias = source.bias  # type: ignore[assignment]  # a Parameter or None, as nn.Linear's

    def dense_weight(self, tensors: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """W (out, in) = CB · SCB / 127; `tensors` by name replace the layer's own."""
        tensors = tensors or {}
        return torch.ops.bitsandbytes.int8_vectorwise_dequant(tensors.get("weight", self.weight),
                                                              tensors.get("SCB", self.SCB))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dense_weight().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def requantize(self, dense: torch.Tensor) -> dict[str, torch.Tensor]:
        import bitsandbytes.functional as bnbf
        rows, scales, _ = bnbf.int8_vectorwise_quant(dense.to(torch.float16).contiguous())
        return {"weight": rows, "SCB": scales.float()}


SWAPPED = {"Linear4bit": BnbLinear4bit, "Linear8bitLt": BnbLinear8bit}


def bitsandbytes_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every bitsandbytes Linear4bit / Linear8bitLt in `model`."""
    if "bitsandbytes" not in sys.modules:
        return []
    import bitsandbytes as bnb
    kinds = (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)
    return [(name, m) for name, m in model.named_modules() if isinstance(m, kinds)]


def _swap_one(module: nn.Module) -> nn.Module:
    import bitsandbytes as bnb
    if isinstance(module, bnb.nn.Linear4bit):
        if getattr(module.weight, "quant_state", None) is None:
            raise QuantizedBaseError("a bitsandbytes Linear4bit whose weight is not quantized yet (move it to its "
                                     "device first)")
        return BnbLinear4bit(module)
    if getattr(module.weight, "SCB", None) is None and getattr(getattr(module, "state", None), "SCB", None) is None:
        raise QuantizedBaseError("a bitsandbytes Linear8bitLt with fp16 training weights (has_fp16_weights=True) or "
                                 "not quantized yet: create it with has_fp16_weights=False and move it to its device")
    return BnbLinear8bit(module)


@contextlib.contextmanager
def bitsandbytes_swapped(model: nn.Module):
    """Within the block, every bitsandbytes layer of `model` is its BnbLinear4bit / BnbLinear8bit;
    the block gets {name: swapped layer}."""
    layers = bitsandbytes_layers(model)
    swapped = []
    try:
        for name, module in layers:
            parent_name, _, leaf = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            replacement = _swap_one(module)
            replacement.train(module.training)
            parent._modules[leaf] = replacement
            swapped.append((parent, leaf, module))
        yield {name: parent._modules[leaf] for (name, _), (parent, leaf, _) in zip(layers, swapped)}
    finally:
        for parent, leaf, module in swapped:
            parent._modules[leaf] = module
