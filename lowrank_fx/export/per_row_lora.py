"""Per-row LoRA, stacked: the K LoRA adapters of one call site as one rank-ΣR pair.

Instead of K separate updates, each weighted per row over the output width, a site whose
adapters are all LoRA runs one matmul pair on the adapters concatenated along r:

    A_cat (ΣR, in) = [A_1; ...; A_K]          B_cat (out, ΣR) = [s_1 B_1, ..., s_K B_K]
    h  = x A_catᵀ                             (rows, ..., ΣR)
    Δy = (h ⊙ m) B_catᵀ                       m[row, j] = mask[row, adapter of column j]

so masking touches ΣR columns, not K · out. Same result as Σ_k mask[row, k] · Δ_k(x)
(per_row.py), up to rounding. Inference only: LoRA dropout is left out.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..graph.op_kinds import LinearKind
from ..methods.lora_unit import LoRAUnit


def row_weights(columns: torch.Tensor, rows: int) -> torch.Tensor:
    """(batch, C) per-row weights -> (rows, C), each batch row repeated rows // batch times."""
    batch, width = columns.shape
    return columns[:, None, :].expand(batch, rows // batch, width).reshape(rows, width)


class StackedLoRA(nn.Module):
    """Σ_k mask[row, k] · LoRA_k(x) for the LoRA units of one site, as one rank-ΣR pair."""

    A: torch.Tensor  # buffers (set in __init__)
    B: torch.Tensor
    columns: torch.Tensor

    def __init__(self, units: list[LoRAUnit], adapter_index: list[int]):
        super().__init__()
        with torch.no_grad():
            self.register_buffer("A", torch.cat([u.lora_A for u in units]))
            self.register_buffer("B", torch.cat([u.lora_B * u.scale for u in units], dim=1))
        columns = [k for u, k in zip(units, adapter_index) for _ in range(u.lora_A.shape[0])]
        self.register_buffer("columns", torch.tensor(columns, dtype=torch.int64))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = F.linear(x.to(self.A.dtype), self.A)  # (rows, ..., ΣR)
        weights = row_weights(mask.to(h.dtype)[:, self.columns], h.shape[0])
        h = h * weights.reshape((h.shape[0],) + (1,) * (h.dim() - 2) + (h.shape[-1],))
        return F.linear(h, self.B).to(x.dtype)


def stackable(unit: nn.Module) -> bool:
    """Plain LoRA on a linear site, without a bias: its factors concatenate along r."""
    return type(unit) is LoRAUnit and isinstance(unit.op_kind, LinearKind) and unit.lora_B_bias is None
