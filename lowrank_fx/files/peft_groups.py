"""PEFT's LoRA factors on a conv with groups g, and ours.

PEFT's lora_A is an ungrouped conv, weight (r, in, k...), and its lora_B a 1x1 conv with groups
g, weight (out, r/g, 1...). Rows j·r/g ... (j+1)·r/g of A feed group j's outputs. When those
rows are zero outside group j's input channels (A block-diagonal: what `save_peft` writes for
lowrank_fx's grouped LoRA), the update is a grouped kernel and A's blocks are our grouped A
(r, in/g, k...). Otherwise the update mixes input channels across groups (what PEFT trains),
and the module loads as LoRA(mixed_groups=True), PEFT's layout as is (methods/lora_unit.py).
"""

from __future__ import annotations

import torch


def _grouped_blocks(groups: int, rank: int, channels: int) -> list[tuple[slice, slice]]:
    """(rows, input channels) of each group's block in a full conv factor (r, in, k...)."""
    return [(slice(j * rank // groups, (j + 1) * rank // groups),
             slice(j * channels // groups, (j + 1) * channels // groups)) for j in range(groups)]


def factor_groups(lora_A: torch.Tensor, lora_B: torch.Tensor) -> int:
    """g of a PEFT conv factor pair, from B's (out, r/g, 1...); 1 for linear or embedding factors."""
    if lora_A.dim() <= 2 or lora_B.dim() <= 2 or lora_B.shape[1] == 0:
        return 1
    return max(1, lora_A.shape[0] // lora_B.shape[1])


def mixes_groups(lora_A: torch.Tensor, groups: int) -> bool:
    """Whether PEFT's full A (r, in, k...) has a non-zero outside the blocks of its groups."""
    if groups <= 1:
        return False
    rank, channels = lora_A.shape[:2]
    inside = torch.zeros(lora_A.shape[:2], dtype=torch.bool)
    for rows, cols in _grouped_blocks(groups, rank, channels):
        inside[rows, cols] = True
    return bool(lora_A[~inside].abs().amax() > 0) if (~inside).any() else False


def to_grouped(lora_A: torch.Tensor, groups: int) -> torch.Tensor:
    """Our grouped A (r, in/g, k...) from PEFT's block-diagonal full A (r, in, k...)."""
    rank, channels = lora_A.shape[:2]
    return torch.cat([lora_A[rows, cols] for rows, cols in _grouped_blocks(groups, rank, channels)])


def to_full(lora_A: torch.Tensor, groups: int) -> torch.Tensor:
    """PEFT's full A (r, in, k...), zero outside the groups, from our grouped A (r, in/g, k...)."""
    rank, per_group = lora_A.shape[:2]
    full = lora_A.new_zeros(rank, per_group * groups, *lora_A.shape[2:])
    for rows, cols in _grouped_blocks(groups, rank, per_group * groups):
        full[rows, cols] = lora_A[rows]
    return full
