"""LoRA on a stack of experts W (E, out, in) (graph/experts.py): one rank-r update per expert,

    ΔW[e] = s · B[e] A[e]          A (E, r, in), B (E, out, r)   (PEFT's target_parameters layout)

or, with `shared_experts=True`, one update every expert gets, ΔW[e] = s · B A, A (r, in), B (out, r).

At a site each routed pair s (activation x_s, expert e_s) gets Δy_s = s · B[e_s] A[e_s] x_s. All the
experts' first factors are applied at once and the other experts' rows masked out,

    h = (x Aᵀ_all) ⊙ onehot(e)     (S, E·r),  A_all = A reshaped (E·r, in)
    Δy = s · h B_allᵀ              (S, out),  B_all (out, E·r): B_all[:, e·r + k] = B[e, :, k]

two dense matmuls of rank E·r with no gather of per-pair factors: what batched, grouped and ONNX
graphs all run. The masked entries add exact zeros. A grouped site gives each row's expert
through the offsets: e_s = #{j : offs_j ≤ s}. Init as LoRA: A Kaiming-uniform, B = 0.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import SpecError
from ..graph.experts import ExpertsKind
from .base import Unit, dropout_module


class ExpertsLoRAUnit(Unit):
    site_inputs = ("x", "route")
    op_kind: ExpertsKind  # set by passes.inject.build_groups: an expert stack's sites

    def __init__(self, target, rank: int, scale: float, dropout: float, dtype: torch.dtype, init: str,
                 shared_experts: bool = False):
        super().__init__()
        self.op_kind = kind = target.kind
        self.experts = kind.experts
        self.layout = target.layout
        self.shared_experts = shared_experts
        lead = () if shared_experts else (kind.experts,)
        self.lora_A = nn.Parameter(torch.empty(*lead, rank, target.in_features, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(*lead, target.out_features, rank, dtype=dtype))
        self.rank_axes = {"lora_A": len(lead), "lora_B": len(lead) + 1}
        self.scale = scale
        self.dropout = dropout_module(dropout)
        for e in range(kind.experts if not shared_experts else 1):  # each expert's A as a LoRA A (r, in)
            nn.init.kaiming_uniform_(self.lora_A[e] if not shared_experts else self.lora_A, a=math.sqrt(5))
        if init == "nonzero":
            for e in range(kind.experts if not shared_experts else 1):
                nn.init.kaiming_uniform_(self.lora_B[e] if not shared_experts else self.lora_B, a=math.sqrt(5))

    def _expert_of_rows(self, route: torch.Tensor, rows: int) -> torch.Tensor:
        """Each row's expert (S,): the ids themselves, or from a grouped site's offsets."""
        if self.op_kind.route == "ids":
            return route
        positions = torch.arange(rows, device=route.device, dtype=route.dtype)
        return torch.searchsorted(route, positions, right=True)

    def _pairs(self, x: torch.Tensor) -> torch.Tensor:
        """The site's activations as (S, in): a batched site's are (S, in, 1) or (S, 1, in)."""
        if self.op_kind.route == "offsets":
            return x
        return x.squeeze(-1) if self.layout == "out_in" else x.squeeze(1)

    def _site_shape(self, delta: torch.Tensor) -> torch.Tensor:
        if self.op_kind.route == "offsets":
            return delta
        return delta.unsqueeze(-1) if self.layout == "out_in" else delta.unsqueeze(1)

    def forward(self, x: torch.Tensor, route: torch.Tensor) -> torch.Tensor:
        pairs = self.dropout(self._pairs(x).to(self.lora_A.dtype))
        if self.shared_experts:
            delta = F.linear(F.linear(pairs, self.lora_A), self.lora_B)
        else:
            experts, rank, width = self.lora_A.shape
            rows = pairs.shape[0]  # not -1: an ONNX adapter input may have rank 0 (no update)
            h = F.linear(pairs, self.lora_A.reshape(experts * rank, width)).view(rows, experts, rank)
            chosen = self._expert_of_rows(route, rows)
            mask = (chosen.unsqueeze(-1) == torch.arange(experts, device=chosen.device)).to(h.dtype)
            h = (h * mask.unsqueeze(-1)).reshape(rows, experts * rank)
            delta = F.linear(h, self.lora_B.permute(1, 0, 2).reshape(self.lora_B.shape[1], experts * rank))
        return self._site_shape(delta * self.scale).to(x.dtype)

    def lora_matrix(self) -> torch.Tensor:
        """B A per expert (E, out, in) in fp32 (float64 for float64 factors), unscaled."""
        dtype = torch.promote_types(self.lora_A.dtype, torch.float32)
        product = self.lora_B.to(dtype) @ self.lora_A.to(dtype)
        return product.expand(self.experts, *product.shape[-2:]).contiguous() if self.shared_experts else product

    def delta_weight(self) -> torch.Tensor:
        """ΔW = s · B A per expert, (E, out, in), in fp32 (float64 for float64 factors)."""
        return self.lora_matrix().mul_(self.scale)

    def delta_bound(self) -> float | None:
        """max |ΔW| ≤ |s| · max_{e,i} Σ_k |B_eik| · max |A| (as LoRA's bound, per expert)."""
        if self.lora_A.numel() == 0 or self.lora_B.numel() == 0:
            return 0.0
        with torch.no_grad():
            rows = torch.linalg.vector_norm(self.lora_B.detach(), ord=1, dim=-1).max()
            entries = torch.linalg.vector_norm(self.lora_A.detach(), ord=float("inf"))
            return abs(self.scale) * float(rows) * float(entries)

    def output_side(self) -> list[nn.Parameter]:
        return [self.lora_B]


def check_experts(method, target) -> None:
    """SpecError for the LoRA options an expert stack cannot take."""
    refused = {"dora": "DoRA's column norms are per matrix, and PEFT's target_parameters refuse it too",
               "bias": "the stack's experts have no shared bias for a LoRA bias to fold into"}
    for option, why in refused.items():
        if getattr(method, option):
            raise SpecError(f"LoRA({option}=True) cannot adapt the expert stack {target.name}: {why}; "
                            f"use {option}=False for it (a mixed spec can give other targets their own LoRA)")
    if method.init not in ("default", "nonzero"):
        raise SpecError(f"LoRA(init={method.init!r}) cannot adapt the expert stack {target.name}: expert stacks take "
                        "the default init only; use init='default' for it (a mixed spec can give other targets "
                        "their own LoRA)")
    if method.rank > min(target.in_features, target.out_features):
        raise SpecError(f"LoRA rank {method.rank} on the expert stack {target.name} is larger than its experts' "
                        f"matrices ({target.out_features} x {target.in_features}) allow; use rank <= "
                        f"{min(target.in_features, target.out_features)}")
