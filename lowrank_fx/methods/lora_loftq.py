"""LoftQ (Li et al. 2023): a quantized base Q and LoRA factors that together approximate W.

With quant = dequantize ∘ quantize of the chosen scheme and SVD_r the best rank-r split
(L = U_r √S_r (out, r), R = √S_r Vᵀ_r (r, in)), starting from R₀ L₀ = 0:

    for t = 1..T:   Q_t = quant(W − L_{t−1} R_{t−1}),   L_t R_t = SVD_r(W − Q_t)
    base ← Q_T,  A = R_T / √s,  B = L_T / √s          so Q_T + s · B A = Q_T + L_T R_T ≈ W

The schemes are those PEFT's LoftQ uses (through bitsandbytes):
    4 bits   NF4 in blocks of 64 values of W (row-major), one fp32 absmax per block: each value
             becomes absmax · the nearest of the 16 NF4 levels
    8 bits   int8 per row: round(127 · w / absmax_row) · absmax_row / 127
PEFT sets A = R, B = L whatever the scale; dividing by √s keeps Q + s · B A ≈ W for any alpha,
and equals PEFT's factors at alpha = r (s = 1).
"""

from __future__ import annotations

import torch

# The 16 levels of the NormalFloat4 data type (QLoRA), ascending.
NF4 = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
       -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
       0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
       0.7229568362236023, 1.0)
BLOCK = 64


def _nf4_blocks(blocks: torch.Tensor, levels: torch.Tensor, divide: bool) -> torch.Tensor:
    """Blocks (n, size) to the nearest NF4 level times their absmax."""
    absmax = blocks.abs().amax(dim=1, keepdim=True).clamp(min=1e-38)
    scaled = torch.clamp(blocks / absmax if divide else blocks * (1.0 / absmax), -1, 1)
    return levels[torch.bucketize(scaled, (levels[1:] + levels[:-1]) / 2)] * absmax


def _nf4_round_trip(weight: torch.Tensor) -> torch.Tensor:
    """W (fp32) quantized to NF4 in blocks of 64 values and back; a short last block has its own
    absmax (bitsandbytes divides by it there, and multiplies by the reciprocal elsewhere)."""
    flat = weight.reshape(-1)
    levels = torch.tensor(NF4, dtype=torch.float32, device=weight.device)
    full = flat.numel() - flat.numel() % BLOCK
    parts = [_nf4_blocks(flat[:full].reshape(-1, BLOCK), levels, divide=False).reshape(-1)]
    if full < flat.numel():
        parts.append(_nf4_blocks(flat[full:].reshape(1, -1), levels, divide=True).reshape(-1))
    return torch.cat(parts).reshape(weight.shape)


def _int8_round_trip(weight: torch.Tensor) -> torch.Tensor:
    """W (fp32) quantized to int8 per row (scale absmax / 127) and back."""
    absmax = weight.abs().amax(dim=1, keepdim=True)
    quantized = torch.round(weight * (127.0 / absmax)).to(torch.int8)
    return quantized.to(torch.float32) * absmax * (1 / 127)


def loftq(weight: torch.Tensor, rank: int, scale: float, bits: int, iters: int):
    """(A (r, in), B (out, r), Q (out, in)) in fp32 for W (out, in)."""
    weight = weight.to(torch.float32)
    round_trip = _nf4_round_trip if bits == 4 else _int8_round_trip
    target = weight
    for step in range(iters):
        base = round_trip(target)
        left, values, rows = torch.linalg.svd(weight - base, full_matrices=False)
        root = torch.sqrt(values[:rank])
        low_left, low_right = left[:, :rank] * root, root[:, None] * rows[:rank]
        if step + 1 < iters:
            target = weight - low_left @ low_right
    factor = scale ** -0.5
    return low_right * factor, low_left * factor, base
