"""The dense weight of torchao's packed int4 CPU tensor (`Int4OpaqueTensor`), which has no
`dequantize()` of its own.

Its `qdata` holds the 4-bit codes q (N, K) as `torch.ops.aten._convert_weight_to_int4pack_for_cpu`
packs them: two codes a byte, in a tiled order of the kernel's. The order is a fixed permutation
of the N·K codes for a given (N, K), so it is read off the format's own pack op rather than
assumed: packing the hexadecimal digits of each position's index (4 bits at a time) tells where
every code lands. Unpacking is then one gather. With `scale_and_zero` (K / group, N, 2) holding
s and z per group, tinygemm's affine form gives

    W[n, k] = (q[n, k] - 8) · s[n, j] + z[n, j],   j = k // group

which the capture checks against the layer's own kernel (graph/quant_check.py) before any
backward uses it. The same W also replaces the kernel in the wrapped layer's forward
(`unpack_slow_kernels`): torchao's CPU kernel runs tens of times slower than an fp32 product of
the same size, the unpack and a dense product about twice it. Cost: the order is cached per
(N, K) as one int64 index per code.
"""

from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=32)
def _positions(rows: int, cols: int) -> torch.Tensor:
    """For each code of q (rows, cols), row-major, the index of its nibble in the packed bytes
    (byte b's low nibble is 2b, its high nibble 2b + 1)."""
    index = torch.arange(rows * cols, dtype=torch.int64)
    found = torch.zeros(rows * cols, dtype=torch.int64)  # nibble slot -> code index
    shift = 0
    while (1 << shift) < rows * cols:
        digit = ((index >> shift) & 15).reshape(rows, cols).to(torch.int32)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(digit, 1).reshape(-1).to(torch.int64)
        found += torch.stack([packed & 15, packed >> 4], dim=1).reshape(-1) << shift
        shift += 4
    positions = torch.empty_like(found)
    positions[found] = torch.arange(found.numel())
    return positions


def _unpack_codes(packed: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """q (rows, cols) uint8 in 0..15 from the CPU-packed bytes (rows, cols / 2)."""
    nibbles = torch.stack([packed.reshape(-1) & 15, packed.reshape(-1) >> 4], dim=1).reshape(-1)
    return nibbles[_positions(rows, cols).to(packed.device)].reshape(rows, cols)


def int4_opaque_dense(packed: torch.Tensor, scale_and_zero: torch.Tensor, shape, group: int) -> torch.Tensor:
    """W (N, K) in the scales' dtype, from the packed codes and `scale_and_zero` (K / group, N, 2)."""
    rows, cols = int(shape[0]), int(shape[1])
    codes = _unpack_codes(packed, rows, cols).to(scale_and_zero.dtype)
    scale = scale_and_zero[..., 0].t().repeat_interleave(group, dim=1)[:, :cols]
    zero = scale_and_zero[..., 1].t().repeat_interleave(group, dim=1)[:, :cols]
    return (codes - 8) * scale + zero


def unpacked_mm(x: torch.Tensor, packed: torch.Tensor, group: int, scale_and_zero: torch.Tensor) -> torch.Tensor:
    """What `aten._weight_int4pack_mm_for_cpu(x, packed, group, scale_and_zero)` computes,
    x (M, K) · Wᵀ -> (M, N), as the unpacked W and a dense product: about 2x one fp32 matmul,
    where torchao's CPU kernel takes 30-100x (benchmarks/RESULTS.md)."""
    weight = int4_opaque_dense(packed, scale_and_zero, (scale_and_zero.shape[1], x.shape[-1]), group)
    return torch.mm(x, weight.t().to(x.dtype))


def unpack_slow_kernels(graph: torch.fx.Graph) -> int:
    """Replace every packed int4 CPU kernel call of `graph` by `unpacked_mm`; how many."""
    kernel = getattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu", None)
    found = [n for n in graph.nodes if kernel is not None and n.target is kernel.default]
    for node in found:
        node.target = unpacked_mm
    return len(found)
