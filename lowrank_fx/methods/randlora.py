"""RandLoRA (Albert et al. 2025): a full-rank update from fixed random bases.

For W (out, in), D = max(out, in), d = min(out, in), N = ceil(d / r):

    ΔW = s · Σ_{n=1..N} B_n Λ_n A Γ_n        (transposed when out < in)

B_n (D, r) and A (r, d) are fixed random bases, Λ_n = diag(λ[:, n]) (r) and
Γ_n = diag(γ[n]) (d) are trained: N·(r + d) parameters per target (λ (r, N), γ (N, d)).
N·r ≥ d, so ΔW can be full rank. Layout and slicing: randlora_ops.py.
A rank above d is accepted, as PEFT accepts it: N = 1, one basis pair B_1 (D, r), A (r, d),
whose product already spans every (D, d) matrix; λ (r, 1), γ (1, d).

One pair of bases serves every target of the method: sized for the element-wise largest
(out, in) among them (A (r, d_max), B (D_max, N_max·r)) and sliced per target. They are
non-persistent buffers: never saved, regenerated from `seed` (dense, or `sparse=True`).

Training computes Δy = x ΔWᵀ in one of two forms (randlora_forms.py), keeping only x, λ, γ and
the bases for backward either way: `form="factored"` never builds ΔW (T·N·r·(D + d) per pass);
`form="dense"` builds ΔW once per pass (D·d·N·r) and applies it with one product of W's size;
`form="auto"` (default) takes the cheaper for each call's token count T; compiled, both forms
are in the graph and torch.cond takes one per call (randlora_op.py), so a compiled graph does
not recompile when T crosses the break-even. The
form is only a compute path: ΔW, folding, files and exports do not depend on it.

Defaults as PEFT 0.21.2's RandLoraConfig: r = 32, alpha = 640, s = alpha / r; init
λ = 0 (so ΔW starts at 0) and γ = 1/d. Init "nonzero" draws λ ~ U(-1/√(N·r), 1/√(N·r))
instead, so the update is non-zero from the start (tests, demos).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..options import choice, flag, integer, options, set_options
from .base import AdapterGroup, Method, Unit, adapter_dtype, check_common, dropout_module
from .randlora_forms import FORMS
from .randlora_op import randlora_delta
from .randlora_ops import random_bases, scaled_basis, sliced_bases


class RandLoRAUnit(Unit):
    def __init__(self, in_features: int, out_features: int, rank: int, scale: float,
                 dropout: float, dtype: torch.dtype, init: str, form: str):
        super().__init__()
        self.big, small = max(in_features, out_features), min(in_features, out_features)
        self.tall = out_features >= in_features
        n = math.ceil(small / rank)
        self.lam = nn.Parameter(torch.zeros(rank, n, dtype=dtype))
        self.gamma = nn.Parameter(torch.full((n, small), 1.0 / small, dtype=dtype))
        if init == "nonzero":
            nn.init.uniform_(self.lam, -1.0 / math.sqrt(rank * n), 1.0 / math.sqrt(rank * n))
        self.scale, self.form = scale, form
        self.dropout = dropout_module(dropout)

    def linear_update(self, x: torch.Tensor, basis_A: torch.Tensor, basis_B: torch.Tensor) -> torch.Tensor:
        h = self.dropout(x.to(self.lam.dtype))
        delta = randlora_delta(h, self.lam, self.gamma, basis_A, basis_B, self.big, self.tall, self.scale, self.form)
        return delta.to(x.dtype)

    def delta_weight(self, basis_A: torch.Tensor, basis_B: torch.Tensor) -> torch.Tensor:
        """ΔW (out, in) in fp32, or float64 for float64 diagonals."""
        dtype = torch.promote_types(self.lam.dtype, torch.float32)
        rank, n = self.lam.shape
        A, Bc = sliced_bases(basis_A.to(dtype), basis_B.to(dtype), rank, n, self.gamma.shape[1], self.big)
        product = Bc @ scaled_basis(A, self.lam.to(dtype), self.gamma.to(dtype)) * self.scale  # (D, d)
        return product if self.tall else product.t()

    def output_side(self) -> list[nn.Parameter]:
        """λ: zero at init like LoRA's B, the factor that first moves ΔW off zero."""
        return [self.lam]


class RandLoRAGroup(AdapterGroup):
    """Units of one RandLoRA method plus the random bases they all slice."""

    shared = ("basis_A", "basis_B")

    def __init__(self, units: dict[str, RandLoRAUnit], bases: tuple[torch.Tensor, torch.Tensor],
                 seed: int, sparse: bool):
        super().__init__(units)
        self.register_buffer("basis_A", bases[0], persistent=False)
        self.register_buffer("basis_B", bases[1], persistent=False)
        self.seed, self.sparse = seed, sparse

    def describe(self) -> str:
        kind = "sparse" if self.sparse else "dense"
        (r, d), (big, cols) = self.basis_A.shape, self.basis_B.shape
        return f"RandLoRA {kind} bases A {r}x{d}, B {big}x{cols} (seed {self.seed}; fixed, not saved)"


@options
class RandLoRA(Method):
    """Full-rank update Σ_n B_n Λ_n A Γ_n from fixed random bases (module docstring).

    Args:
        rank: r, each basis's rank (an int >= 1); N = ceil(min(out, in) / r) bases.
        alpha: the scale's numerator: s = alpha / r.
        dropout: dropout on the adapter's input x, in [0, 1).
        seed: the seed the random bases are drawn from (they are not saved).
        sparse: sparse bases (-1 or +1 with probability 1/6 each, else 0) instead of dense
            U(-1, 1) ones.
        init: "default" (λ = 0, as PEFT) or "nonzero".
        form: how Δy is computed in training: "auto", "factored" or "dense" (module docstring).

    Raises:
        SpecError: an option out of range.
    """

    rank: int = 32
    alpha: float = 640.0
    dropout: float = 0.0
    seed: int = 0
    sparse: bool = False
    init: str = "default"
    form: str = "auto"  # "auto" | "factored" | "dense": how Δy is computed (module docstring)

    kind = "randlora"

    def __post_init__(self):
        check_common(self)
        set_options(self, seed=integer("RandLoRA", "seed", self.seed, low=0, high=2**64 - 1),
                    sparse=flag("RandLoRA", "sparse", self.sparse), form=choice("RandLoRA", "form", self.form, FORMS))

    @property
    def scale(self) -> float:
        """The update's scale s.

        Returns:
            alpha / r.
        """
        return self.alpha / self.rank

    def build(self, targets: list) -> dict[str, AdapterGroup]:
        out_max = max(t.out_features for t in targets)
        in_max = max(t.in_features for t in targets)
        d_max, big_max = min(out_max, in_max), max(out_max, in_max)
        dtype = adapter_dtype(targets[0].dtype)
        if torch.get_default_device().type == "meta":  # plan: sizes only
            bases = (torch.empty(self.rank, d_max, device="meta"),
                     torch.empty(big_max, math.ceil(d_max / self.rank) * self.rank, device="meta"))
        else:
            bases = random_bases(self.rank, d_max, big_max, math.ceil(d_max / self.rank), self.seed,
                                 self.sparse, dtype)
        units = {t.name: RandLoRAUnit(t.in_features, t.out_features, self.rank, self.scale, self.dropout,
                                      dtype, self.init, self.form) for t in targets}
        return {"randlora": RandLoRAGroup(units, bases, self.seed, self.sparse)}
