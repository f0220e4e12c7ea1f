"""The integer form of a quantized weight: the codes ONNX Runtime's quantized matmuls read.

A quantized layer's dense weight W (out N, in K) is what its region computes on the identity
(graph/quantized.py). Every supported format is one of two integer forms of it:

  affine    W[n, k] = (q[n, k] - z[n, j]) · s[n, j],  j = k // block        (MatMulNBits)
            q unsigned `bits`-bit codes (N, K), s (N, K/block), z (N, K/block) unsigned
            codes or floats; None means the midpoint 2^(bits-1).
  codebook  W.flat[i] = table[q.flat[i]] · absmax[i // block]               (MatMulBnb4)
            q 4-bit codes (N, K), table the 16 NF4 (or FP4) values, absmax (N·K/block,).

The scales and zero points come from the format's own tensors (torchao's `scale`,
`zero_point`, `scale_and_zero`; bitsandbytes' `SCB`); the codes are recovered from W,
q = round(W / s + z), or the nearest table entry of W / absmax. For a codebook whose table
holds ±1 (NF4, FP4) a block's absmax is max |W| over the block: its largest element is coded
±1. `integer_form` checks that the form, decoded as ONNX Runtime decodes it, gives W back
(relative 1e-6; 1e-5 with float zero points; 1e-4 for torchao's NF4, whose table differs
from the runtime's by up to 5e-5 per code) and raises NotImplementedError naming the format
otherwise, so nothing further off is ever exported as the base.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from .quant_formats import BnbLinear4bit, BnbLinear8bit

EXACT = 1e-6
TABLE_DRIFT = 1e-4  # torchao's NF4 values differ from bitsandbytes' (and ONNX Runtime's) by up to 5e-5
# The NF4 code values ONNX Runtime's MatMulBnb4 decodes with (bitsandbytes' table)
RUNTIME_NF4 = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0])


@dataclasses.dataclass
class IntegerWeight:
    form: str  # "affine" | "codebook"
    bits: int
    block: int  # affine: along in, per row; codebook: along the flattened weight
    codes: torch.Tensor  # uint8 (N, K), unsigned
    scales: torch.Tensor  # affine: (N, K / block); codebook: absmax (N·K / block,)
    zero_points: torch.Tensor | None = None  # affine: uint8 or float (N, K / block)
    table: torch.Tensor | None = None  # codebook: (16,)
    quant_type: int = 1  # codebook: 1 NF4, 0 FP4 (ONNX Runtime's numbering)

    def dense(self) -> torch.Tensor:
        """W (N, K) in fp32, from the codes."""
        codes = self.codes.float()
        if self.form == "codebook":
            assert self.table is not None, "a codebook form carries its table"
            values = self.table.float()[self.codes.long()]
            return (values.reshape(-1, self.block) * self.scales.float()[:, None]).reshape(codes.shape)
        k = codes.shape[1]
        zero = (torch.full_like(self.scales, 2 ** (self.bits - 1)) if self.zero_points is None
                else self.zero_points.float())
        expand = lambda t: t.float().repeat_interleave(self.block, dim=1)[:, :k]  # noqa: E731
        return (codes - expand(zero)) * expand(self.scales)


def _per_block(values: torch.Tensor, k: int, block: int) -> torch.Tensor:
    """Per-row values (N, 1) or per-group values (N, k / group) as (N, ceil(k / block))."""
    blocks = -(-k // block)
    if values.shape[1] == 1:
        return values.expand(-1, blocks).contiguous()
    if values.shape[1] == blocks:
        return values
    raise NotImplementedError(f"{values.shape[1]} scale groups over {k} inputs do not fit blocks of {block}")


def _row_block(k: int) -> int:
    """The block size for a per-row scale: a power of two from 16 to 128, covering k if it can."""
    block = 16
    while block < min(k, 128):
        block *= 2
    return block


def _group_block(k: int, groups: int) -> int:
    size = k // groups
    if groups == 1:
        return _row_block(k)
    if size * groups != k or size < 16 or size & (size - 1):
        raise NotImplementedError(f"group size {k}/{groups} is not a power of two >= 16")
    return size


def _affine(dense: torch.Tensor, bits: int, scale: torch.Tensor, zero: torch.Tensor | None,
            float_zero: bool = False) -> IntegerWeight:
    """Codes for W = (q - z) s, with s and z (N, groups) given in the format's own terms."""
    _n, k = dense.shape
    block = _group_block(k, scale.shape[1])
    scales = _per_block(scale.float(), k, block)
    zeros = None if zero is None else _per_block(zero.float(), k, block)
    expand = lambda t: t.repeat_interleave(block, dim=1)[:, :k]  # noqa: E731
    midpoint = 2 ** (bits - 1)
    shift = expand(zeros) if zeros is not None else torch.full_like(dense, float(midpoint))
    codes = torch.round(dense.float() / expand(scales).clamp_min(1e-30) + shift)
    codes = codes.clamp(0, 2**bits - 1).to(torch.uint8)
    if zeros is not None and not float_zero:
        zeros = zeros.round().to(torch.uint8)
    return IntegerWeight("affine", bits, block, codes, scales, zeros)


def _codebook(dense: torch.Tensor, block: int, table: torch.Tensor, quant_type: int) -> IntegerWeight:
    flat = dense.float().reshape(-1, block)
    absmax = flat.abs().amax(dim=1)
    normal = flat / absmax.clamp_min(1e-30)[:, None]
    codes = (normal[..., None] - table.float()).abs().argmin(dim=-1).to(torch.uint8)
    return IntegerWeight("codebook", 4, block, codes.reshape(dense.shape), absmax, table=table.float(),
                         quant_type=quant_type)


def _bnb_table(quant_type: str) -> torch.Tensor:
    import bitsandbytes.functional as bnbf
    return bnbf.get_4bit_type(quant_type, device="cpu").float()


def _of_torchao(tensor: Any, dense: torch.Tensor) -> IntegerWeight:
    kind = type(tensor).__name__
    if kind == "Int8Tensor":  # W = q s, q signed 8-bit, s per row: codes q + 128, midpoint zero
        return _affine(dense, 8, tensor.scale.reshape(dense.shape[0], -1), None)
    if kind == "IntxUnpackedToInt8Tensor":  # W = (q - z) s, q and z signed: both + 2^(bits-1)
        bits = int(str(tensor.target_dtype).replace("torch.int", "") or 8)
        bits = 4 if bits <= 4 else 8
        zero = tensor.zero_point.float() + 2 ** (bits - 1)
        symmetric = not bool(tensor.zero_point.any())
        return _affine(dense, bits, tensor.scale, None if symmetric else zero)
    if kind == "Int4OpaqueTensor":  # W = (q - 8) s + z, q unsigned: zero point 8 - z / s (a float)
        scale = tensor.scale_and_zero[..., 0].t().float()
        zero = 8 - tensor.scale_and_zero[..., 1].t().float() / scale
        return _affine(dense, 4, scale, zero, float_zero=True)
    if kind == "NF4Tensor":
        return _codebook(dense, int(tensor.block_size), tensor.nf4, 1)
    raise NotImplementedError(kind)


def integer_form(weight, dense: torch.Tensor) -> IntegerWeight:
    """The integer form of `weight` (a torchao tensor, or a swapped bitsandbytes layer) whose dense
    value is `dense` (N, K). Raises NotImplementedError (naming the format) when there is none
    or it does not reproduce `dense`."""
    if isinstance(weight, BnbLinear4bit):
        if weight.quant_type != "nf4":
            raise NotImplementedError(f"bitsandbytes 4-bit {weight.quant_type} (only nf4 is checked against ONNX "
                                      "Runtime)")
        form = _codebook(dense, weight.blocksize, _bnb_table(weight.quant_type), 1)
    elif isinstance(weight, BnbLinear8bit):
        form = _affine(dense, 8, weight.SCB.float()[:, None] / 127.0, None)
    else:
        form = _of_torchao(weight, dense)
    tolerance = EXACT * (10 if form.zero_points is not None and form.zero_points.is_floating_point() else 1)
    if form.form == "codebook":
        tolerance = EXACT if form.table is not None and torch.equal(form.table, RUNTIME_NF4) else TABLE_DRIFT
        form = dataclasses.replace(form, table=RUNTIME_NF4.clone())
    error = float((form.dense() - dense.float()).abs().max() / dense.float().abs().max().clamp_min(1e-30))
    if error > tolerance:
        raise NotImplementedError(f"its integer form gives the weight back only to {error:.1e} (relative)")
    return form
