"""LoRA (Hu et al. 2021): a rank-r update of a frozen weight.

    Δy = s · (dropout(x) Aᵀ) Bᵀ  (+ s · b_B with bias=True)   x (..., in), A (r, in), B (out, r)
    ΔW = s · B A                                                 (out, in)
    s  = alpha / r, or alpha / sqrt(r) with rslora

On other ops the factors keep PEFT's shapes and the update stays factored:
  - conv with groups g: A is a conv with the base's kernel, stride, padding, dilation and
    groups, in → r (weight (r, in/g, k...)), B a 1x1 conv r → out with groups g (weight
    (out, r/g, 1...)); group j's ΔW is B_j A_j, so ΔW has the base kernel's own shape;
  - conv with groups g and `mixed_groups` (PEFT's own layout): A is an ungrouped conv in → r
    (weight (r, in, k...)), B the same grouped 1x1 conv. Output channel o of group j then reads
    Σ_l B[o, l] A[j·r/g + l] over EVERY input channel, an update no grouped kernel holds: it
    runs unmerged (as in PEFT), and folding it is refused (`fold_refusal`);
  - embedding W (num, dim): A (r, num), B (dim, r), Δy = s · A[:, ids]ᵀ Bᵀ, ΔW = s · (B A)ᵀ.
A rank above min(out, in) is allowed (the update is still exact, just not low-rank).

Init ("default"): A ~ Kaiming-uniform(a=√5), B = 0 (for embeddings A = 0, B ~ N(0, 1), as
PEFT), so the adapted model starts equal to the base. Init "nonzero" draws both factors
(for tests and demos that need gradients on both). PEFT's other inits (gaussian, orthogonal,
PiSSA, OLoRA, LoftQ) are in lora_init.py. DoRA (`dora=True`) is in dora.py.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import MergeError
from ..graph.op_kinds import ConvKind, EmbeddingKind
from . import lora_init
from .base import Unit, dropout_module
from .lora_loftq_quantized import residual_factors


class LoRAUnit(Unit):
    lora_B_bias: nn.Parameter | None
    residual: torch.Tensor | None  # weight-based inits: the base the graph holds instead of W
    initial_factors: tuple[torch.Tensor, torch.Tensor] | None  # (A₀, B₀) of the weight-based inits
    covariance: torch.Tensor | None
    def __init__(self, target, rank: int, scale: float, dropout: float, dtype: torch.dtype, init: str,
                 bias: bool = False, mixed_groups: bool = False, over_quantized: bool = False):
        super().__init__()
        self.op_kind = kind = target.kind
        groups = kind.groups if isinstance(kind, ConvKind) else 1
        self.mixed_groups = mixed_groups and groups > 1  # A over every input channel (module docstring)
        if isinstance(kind, ConvKind):
            per_group = target.in_features // kind.kernel_size  # in / g input channels
            a_shape = (rank, per_group * groups if self.mixed_groups else per_group, *kind.kernel)
            b_shape = (target.out_features, rank // groups, *(1,) * kind.dims)
        else:
            a_shape, b_shape = (rank, target.in_features), (target.out_features, rank)
        self.lora_A = nn.Parameter(torch.empty(a_shape, dtype=dtype))
        self.lora_B = nn.Parameter(torch.empty(b_shape, dtype=dtype))
        self.lora_B_bias = nn.Parameter(torch.zeros(target.out_features, dtype=dtype)) if bias else None
        self.scale = scale
        self.groups = groups
        # with groups, B's rank axis holds r / g: no shared rank axis, so ONNX keeps both shapes fixed
        self.rank_axes = {"lora_A": 0, "lora_B": 1} if groups == 1 else {}
        self.table_dtype = target.dtype
        self.dropout = dropout_module(dropout)
        self.init, self.layout, self.residual, self.initial_factors = init, target.layout, None, None
        self.covariance = None  # CorDA: the target's input covariance, set before init_from_weight
        if init not in ("default", "nonzero"):
            self._start(target, rank, init, over_quantized)
            return
        embedding = isinstance(kind, EmbeddingKind)
        if embedding:
            nn.init.zeros_(self.lora_A)
            nn.init.normal_(self.lora_B)
        else:
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B)
        if init == "nonzero":
            nn.init.kaiming_uniform_(self.lora_A if embedding else self.lora_B, a=math.sqrt(5))
            if self.lora_B_bias is not None:
                nn.init.uniform_(self.lora_B_bias, -0.5, 0.5)

    @torch.no_grad()
    def _start(self, target, rank: int, init: str, over_quantized: bool) -> None:
        """Factors of the other inits (lora_init.py); the weight-based ones start at 0 until
        `init_from_weight` (`init_from_quantized` for LoftQ over a bitsandbytes base)."""
        lora_init.check_target(init, target, rank, over_quantized)
        if init == "eva":  # A: the inputs' principal directions, set by the data pass (passes/eva_calibrate.py)
            lora_init.peft_layer_draws(rank, target.in_features, target.out_features)
        if lora_init.changes_base(init) or init == "eva":
            self.lora_A.zero_()
            self.lora_B.zero_()
            return
        a, b = lora_init.random_factors(init, rank, target.in_features, target.out_features)
        self.lora_A.copy_(a)
        self.lora_B.copy_(b)

    @torch.no_grad()
    def init_from_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """Factors from W (as the graph stores it) for the weight-based inits, keeping the residual
        W − s · B A (LoftQ: its quantized Q) for the graph's own base (`self.residual`,
        passes/residual_base.py); returns the base the graph will hold (W for the other inits)."""
        if not lora_init.changes_base(self.init):
            return weight
        matrix = self.op_kind.to_matrix(weight, self.layout)
        a, b, base = lora_init.weight_factors(self.init, matrix, self.lora_A.shape[0], self.scale, self.covariance)
        self.covariance = None
        self.lora_A.copy_(a)
        self.lora_B.copy_(b)
        self.initial_factors = (a, b)  # A₀, B₀: for the conversion to a plain LoRA (files/peft_init.py)
        residual = self.op_kind.to_weight(base.to(weight.dtype), self.layout, weight.shape)
        self.residual = residual
        return residual

    @torch.no_grad()
    def init_from_quantized(self, weight: torch.Tensor, dequantized: torch.Tensor) -> None:
        """LoftQ's factors from the float W and the kept quantized base's Q (lora_loftq_quantized.py)."""
        a, b = residual_factors(weight, dequantized, self.lora_A.shape[0], self.scale)
        self.lora_A.copy_(a)
        self.lora_B.copy_(b)

    def factored(self, h: torch.Tensor) -> torch.Tensor:
        """s · B(A(h)) (+ s · b_B) for an input already cast to the factors' dtype, without dropout."""
        kind = self.op_kind
        if isinstance(kind, ConvKind):
            first = kind.conv(h, self.lora_A, groups=1) if self.mixed_groups else kind.conv(h, self.lora_A)
            out = kind.conv(first, self.lora_B, stride=1, padding=0, dilation=1)
            bias = None if self.lora_B_bias is None else self.lora_B_bias.view(-1, *(1,) * kind.dims)
        else:
            first = kind.lookup(h, self.lora_A.t()) if isinstance(kind, EmbeddingKind) else F.linear(h, self.lora_A)
            out = F.linear(first, self.lora_B)
            bias = self.lora_B_bias
        return (out if bias is None else out + bias) * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.op_kind, EmbeddingKind):  # x are ids; Δy in the table's dtype
            return self.factored(x).to(self.table_dtype)
        return self.factored(self.dropout(x.to(self.lora_A.dtype))).to(x.dtype)

    def fold_refusal(self) -> str | None:
        if not self.mixed_groups:
            return None
        return (f"its LoRA has PEFT's grouped-conv layout (mixed_groups=True): A reads every input channel, so "
                f"the update of each of the {self.groups} groups mixes channels of the others, which no grouped "
                "kernel holds (PEFT cannot merge it either). It runs unmerged: keep the adapted graph, or "
                "export it with its adapters (lfx.export_onnx(..., mode=\"adapters\"))")

    def lora_matrix(self) -> torch.Tensor:
        """B A (out, in) in fp32 (float64 for float64 factors), unscaled; block by block for groups."""
        if self.mixed_groups:
            raise MergeError(f"no dense update: {self.fold_refusal()}")
        dtype = torch.promote_types(self.lora_A.dtype, torch.float32)
        g = self.groups
        A = self.lora_A.to(dtype).reshape(g, self.lora_A.shape[0] // g, -1)  # (g, r/g, in/g · k)
        B = self.lora_B.to(dtype).reshape(g, self.lora_B.shape[0] // g, -1)  # (g, out/g, r/g)
        return (B @ A).reshape(self.lora_B.shape[0], -1)

    def delta_weight(self) -> torch.Tensor:
        """ΔW = s · B A (out, in), in fp32, or float64 for float64 factors (scaled in place: one
        (out, in) tensor, not two)."""
        return self.lora_matrix().mul_(self.scale)

    def delta_bound(self) -> float | None:
        """|ΔW_ij| = |s| · |Σ_k B_ik A_kj| ≤ |s| · max_i Σ_k |B_ik| · max_kj |A_kj| (a group's block
        sums over fewer k): two reductions over the factors, O(r · (out + in)); inf or NaN for a
        non-finite factor, or one too large to sum."""
        if self.lora_A.numel() == 0 or self.lora_B.numel() == 0:
            return 0.0
        with torch.no_grad():
            rows = torch.linalg.vector_norm(self.lora_B.detach().flatten(1), ord=1, dim=1).max()
            entries = torch.linalg.vector_norm(self.lora_A.detach(), ord=float("inf"))
            return abs(float(self.scale)) * float(rows) * float(entries)

    def delta_bias(self) -> torch.Tensor | None:
        if self.lora_B_bias is None:
            return None
        return self.lora_B_bias.to(torch.promote_types(self.lora_B_bias.dtype, torch.float32)) * self.scale

    def output_side(self) -> list[nn.Parameter]:
        return [self.lora_B] + ([self.lora_B_bias] if self.lora_B_bias is not None else [])
