"""DoRA (Liu et al. 2024): LoRA on the direction of W, with a trained magnitude per output row.

In the weight's matrix view (out, in) (graph/op_kinds.py), with V = W + s · B A:

    W' = m ⊙ V / ‖V‖         ‖V‖ (out,): the norm of each row, detached (treated as a constant)
    Δy = (m / ‖V‖ − 1) ⊙ (y − b) + (m / ‖V‖) ⊙ s · B(A(x))        (⊙ along y's output axis)

where y − b is the base op's output without its bias (recomputed from dropout(x) while
dropout is active, as PEFT does). m starts at ‖W + s · B A‖, so the model starts equal to
LoRA's. Folding: ΔW = W' − W.
"""

from __future__ import annotations

import torch
from torch import nn

from ..graph.op_kinds import ConvKind
from .lora_unit import LoRAUnit


class DoRAUnit(LoRAUnit):
    site_inputs = ("x", "y", "weight", "bias")
    uses_base_weight = True

    def __init__(self, target, rank: int, scale: float, dropout: float, dtype: torch.dtype, init: str,
                 bias: bool = False):
        super().__init__(target, rank, scale, dropout, dtype, init, bias=bias)
        self.layout, self.weight_shape, self.weight_path = target.layout, target.weight_shape, target.weight
        self.lora_magnitude = nn.Parameter(torch.ones(target.out_features, dtype=dtype))

    def init_from_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """m ← ‖W + s · B A‖ per row, for the base weight W as the graph stores it (the residual
        W − s · B₀ A₀ after a base-changing init, so m = ‖W‖ there too)."""
        weight = super().init_from_weight(weight)
        with torch.no_grad():
            self.lora_magnitude.copy_(self._norm(self._matrix(weight)))
        return weight

    def _matrix(self, weight: torch.Tensor) -> torch.Tensor:
        return self.op_kind.to_matrix(weight, self.layout).to(torch.promote_types(weight.dtype, torch.float32))

    def neutral_value(self, name: str, gm) -> torch.Tensor | None:
        """m = ‖W‖ per row: with no LoRA factors (empty along r), W' = W."""
        if name != "lora_magnitude":
            return None
        matrix = self._matrix(gm.get_parameter(self.weight_path).detach())
        return torch.linalg.vector_norm(matrix, dim=1).to(self.lora_magnitude.dtype)

    def _norm(self, matrix: torch.Tensor) -> torch.Tensor:
        """‖W + s · B A‖ (out,) with the LoRA product detached."""
        return torch.linalg.vector_norm(matrix + self.delta_lora().detach().to(matrix.dtype), dim=1)

    def delta_bound(self) -> float | None:
        """None: ΔW = m ⊙ V / ‖V‖ − W also depends on W and on ‖V‖, which may vanish."""
        return None

    def delta_lora(self) -> torch.Tensor:
        return self.lora_matrix() * self.scale

    def _along_out(self, v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """v (out,) shaped to broadcast along the output axis of `like` (channels for convs)."""
        if isinstance(self.op_kind, ConvKind):
            return v.view(1, -1, *(1,) * (like.dim() - 2))
        return v

    def forward(self, x, y, weight, bias) -> torch.Tensor:
        matrix = self._matrix(weight)
        ratio = self.lora_magnitude / self._norm(matrix).detach()  # (out,)
        dropping = self.training and isinstance(self.dropout, nn.Dropout) and x.is_floating_point()
        if dropping:
            h = self.dropout(x.to(self.lora_A.dtype))
            base = self.op_kind.apply(h, matrix.to(h.dtype))
        else:
            h = x if not x.is_floating_point() else x.to(self.lora_A.dtype)
            base = (y if bias is None else y - self._along_out(bias, y)).to(self.lora_A.dtype)
        ratio = self._along_out(ratio.to(self.lora_A.dtype), base)
        delta = (ratio - 1) * base + ratio * self.factored(h)
        return delta.to(y.dtype)

    def delta_weight(self, base: torch.Tensor) -> torch.Tensor:
        """ΔW = m ⊙ V / ‖V‖ − W with V = W + s · B A, in fp32 (out, in); `base` is W (out, in)."""
        matrix = base.to(torch.promote_types(base.dtype, torch.float32))
        direction = matrix + self.delta_lora().to(matrix.dtype)
        norm = torch.linalg.vector_norm(direction, dim=1, keepdim=True)
        return self.lora_magnitude.to(matrix.dtype)[:, None] * direction / norm - matrix

    def output_side(self) -> list[nn.Parameter]:
        return [*super().output_side(), self.lora_magnitude]
