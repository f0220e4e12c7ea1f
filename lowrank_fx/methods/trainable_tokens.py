"""Trainable token rows (PEFT's `trainable_token_indices`): chosen rows of an embedding table
are trained in full, the others stay frozen.

For a table W (num, dim) and indices I (n,), the unit holds R (n, dim), the new values of
rows I (initially W[I]). With D = R − W[I]:

    Δy = D[slot(ids)]        slot(i) = the position of i in I, or a zero row for other ids
    ΔW = 0 except ΔW[I] = D  (num, dim; the matrix view (dim, num) is its transpose)

so only the looked-up rows cost anything, and folding writes R into the table.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..errors import SpecError
from ..graph.op_kinds import EmbeddingKind
from ..options import options
from .base import AdapterGroup, Method, Unit, adapter_dtype


class TrainableTokensUnit(Unit):
    site_inputs = ("x", "weight")
    uses_base_weight = True

    def __init__(self, target, indices: Sequence[int], dtype: torch.dtype):
        super().__init__()
        num, dim = target.weight_shape
        self.rows = nn.Parameter(torch.zeros(len(indices), dim, dtype=dtype))
        self.register_buffer("indices", torch.tensor(list(indices), dtype=torch.long), persistent=False)
        slot = torch.full((num,), len(indices), dtype=torch.long)
        slot[self.indices] = torch.arange(len(indices))
        self.register_buffer("slot", slot, persistent=False)
        self.weight_path = target.weight

    def init_from_weight(self, weight: torch.Tensor) -> None:
        """R ← W[I]: the adapted model starts equal to the base."""
        with torch.no_grad():
            self.rows.copy_(weight[self.indices.to(weight.device)])

    def _rows_delta(self, table: torch.Tensor) -> torch.Tensor:
        """D (n + 1, dim): R − W[I], and a zero row for ids that are not trained."""
        delta = self.rows - table[self.indices].to(self.rows.dtype)
        return torch.cat([delta, delta.new_zeros(1, delta.shape[1])])

    def forward(self, ids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return self._rows_delta(weight)[self.slot[ids]].to(weight.dtype)

    def delta_weight(self, base: torch.Tensor) -> torch.Tensor:
        """ΔW in the matrix view (dim, num), fp32; `base` is W's matrix view (dim, num)."""
        table = base.t().to(torch.promote_types(base.dtype, torch.float32))
        delta = table.new_zeros(table.shape)
        delta[self.indices] = self._rows_delta(table)[:-1].to(table.dtype)
        return delta.t()

    def neutral_value(self, name: str, gm) -> torch.Tensor | None:
        """R = W[I]: the rows as the base has them."""
        if name != "rows":
            return None
        return gm.get_parameter(self.weight_path).detach()[self.indices].to(self.rows.dtype)

    def output_side(self) -> list[nn.Parameter]:
        return []


@options
class TrainableTokens(Method):
    """Train rows `indices` of an embedding table in full (e.g. new special tokens).

    Args:
        indices: the token ids whose rows train (non-empty, each once, >= 0).

    Raises:
        SpecError: empty, negative or repeated indices.
    """

    indices: Sequence[int] = ()

    kind = "trainable_tokens"

    def __post_init__(self):
        indices = list(self.indices) if not isinstance(self.indices, (str, bytes)) else None
        if not indices or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in indices):
            raise SpecError(f"TrainableTokens indices must be a non-empty list of token ids >= 0, got {self.indices!r}")
        if len(set(indices)) != len(indices):
            raise SpecError(f"TrainableTokens indices {indices} name a token twice; give each id once")
        object.__setattr__(self, "indices", tuple(indices))

    def build(self, targets: list) -> dict[str, AdapterGroup]:
        units = {}
        for t in targets:
            if not isinstance(t.kind, EmbeddingKind):
                raise SpecError(f"TrainableTokens trains rows of an embedding table, but {t.name} is a {t.op}; "
                                "give it another method in a mixed spec")
            if max(self.indices) >= t.weight_shape[0]:
                raise SpecError(f"TrainableTokens index {max(self.indices)} is outside {t.name}'s table of "
                                f"{t.weight_shape[0]} rows")
            units[t.name] = TrainableTokensUnit(t, self.indices, adapter_dtype(t.dtype))
        return {"tokens": AdapterGroup(units)}
