"""LoRA (Hu et al. 2021): a rank-r update of a frozen weight.

    Δy = s · (dropout(x) Aᵀ) Bᵀ        x (..., in), A (r, in), B (out, r)
    ΔW = s · B A                         (out, in)
    s  = alpha / r, or alpha / sqrt(r) with rslora

Init ("default"): A ~ Kaiming-uniform(a=√5), B = 0, so the adapted model starts equal to
the base. Init "nonzero" draws B like A, so the update is non-zero from the first step
(for tests and demos that need gradients on both factors).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import SpecError
from ..options import options
from .base import AdapterGroup, Method, Unit, adapter_dtype, check_common, dropout_module


class LoRAUnit(Unit):
    rank_axes = {"lora_A": 0, "lora_B": 1}

    def __init__(self, in_features: int, out_features: int, rank: int, scale: float,
                 dropout: float, dtype: torch.dtype, init: str):
        super().__init__()
        self.lora_A = nn.Parameter(torch.empty(rank, in_features, dtype=dtype))
        self.lora_B = nn.Parameter(torch.empty(out_features, rank, dtype=dtype))
        self.scale = scale
        self.dropout = dropout_module(dropout)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        if init == "nonzero":
            nn.init.kaiming_uniform_(self.lora_B, a=math.sqrt(5))
        else:
            nn.init.zeros_(self.lora_B)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.dropout(x.to(self.lora_A.dtype))
        return (F.linear(F.linear(h, self.lora_A), self.lora_B) * self.scale).to(x.dtype)

    def delta_weight(self) -> torch.Tensor:
        """ΔW = s · B A (out, in), in fp32, or float64 for float64 factors."""
        dtype = torch.promote_types(self.lora_A.dtype, torch.float32)
        return (self.lora_B.to(dtype) @ self.lora_A.to(dtype)) * self.scale

    def output_side(self) -> list[nn.Parameter]:
        return [self.lora_B]


@options
class LoRA(Method):
    """Low-rank adaptation: W + (alpha / r) · B A with A (r, in), B (out, r)."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    rslora: bool = False
    init: str = "default"

    kind = "lora"

    def __post_init__(self):
        check_common("LoRA", self.rank, self.dropout, self.init)

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    def build(self, targets: list) -> dict[str, AdapterGroup]:
        units = {}
        for t in targets:
            if self.rank > min(t.in_features, t.out_features):
                raise SpecError(
                    f"LoRA rank {self.rank} is larger than {t.name} allows: its weight is "
                    f"{t.out_features}x{t.in_features}, so the rank can be at most "
                    f"{min(t.in_features, t.out_features)}"
                )
            units[t.name] = LoRAUnit(t.in_features, t.out_features, self.rank, self.scale,
                                     self.dropout, adapter_dtype(t.dtype), self.init)
        return {"lora": AdapterGroup(units)}
