"""The arithmetic of combining adapters: weighted sums, pruning, sign election, truncated SVD.

Each combination merges n same-shaped tensors T_i with weights w_i (one tensor per adapter):

    sum        Σ_i w_i T_i
    ties       _prune each T_i to its `density` largest |entries|; elect a sign per entry from
               Σ_i T_i ("total") or Σ_i sign(T_i) ("frequency"), ≥ 0 meaning +; then
               Σ_i w_i T_i [sign T_i = elected] / max(1, #{i : sign T_i = elected})
    dare       each T_i keeps an entry with probability `density` (Bernoulli draws from a
               torch generator, entry by entry in the tensor's storage order) and is divided
               by `density`; then the sum, or ties' sign election and disjoint mean
    magnitude  _prune as ties, then the sum

A density ≥ 1 prunes nothing and draws nothing. `svd_factors` turns a merged ΔW (out, in)
into rank-r factors: ΔW ≈ (U_r diag(S_r)) V_rᵀ, B = U_r diag(S_r) (out, r), A = V_rᵀ (r, in),
optionally clamped to the `clamp` quantile of their entries; missing ranks (r > min(out, in))
are zero rows / columns.
"""

from __future__ import annotations

import torch

# combination -> (pruning: None | "magnitude" | "random", disjoint ties merge, via SVD of ΔW)
COMBINATIONS = {
    "linear": (None, False, False),
    "cat": (None, False, False),
    "svd": (None, False, True),
    "ties": ("magnitude", True, False),
    "ties_svd": ("magnitude", True, True),
    "dare_linear": ("random", False, False),
    "dare_ties": ("random", True, False),
    "dare_linear_svd": ("random", False, True),
    "dare_ties_svd": ("random", True, True),
    "magnitude_prune": ("magnitude", False, False),
    "magnitude_prune_svd": ("magnitude", False, True),
}
SIGN_METHODS = ("total", "frequency")


def _prune(tensor: torch.Tensor, density: float | None, how: str | None,
          generator: torch.Generator | None) -> torch.Tensor:
    """`tensor` with all but a `density` fraction of its entries zeroed (module docstring); as it is
    for no pruning (`how` None, density None or 1)."""
    if how is None or density is None or density >= 1:
        return tensor
    if how == "magnitude":
        keep = torch.zeros_like(tensor).reshape(-1)
        largest = torch.topk(tensor.abs().reshape(-1), k=int(density * tensor.numel()), largest=True).indices
        keep[largest] = 1
        return tensor * keep.reshape(tensor.shape)
    drawn = torch.bernoulli(torch.full_like(tensor, density), generator=generator)
    return tensor * drawn / density


def merge(tensors: list[torch.Tensor], weights: torch.Tensor, combination: str, density: float | None,
          sign_method: str, generator: torch.Generator | None) -> torch.Tensor:
    """The tensors merged by `combination` with `weights` (n,), one weight per tensor."""
    pruning, ties, _ = COMBINATIONS[combination]
    stacked = torch.stack([_prune(t, density, pruning, generator) for t in tensors])
    weighted = stacked * weights.view(-1, *(1,) * (stacked.dim() - 1))
    if not ties:
        return weighted.sum(dim=0)
    signs = stacked.sign()
    votes = stacked.sum(dim=0) if sign_method == "total" else signs.sum(dim=0)
    agree = signs == torch.where(votes >= 0, 1, -1)
    return (weighted * agree).sum(dim=0) / torch.clamp(agree.sum(dim=0), min=1.0)


def svd_factors(delta: torch.Tensor, rank: int, clamp: float | None,
                full_matrices: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(A (rank, in), B (out, rank)) with B A the best rank-`rank` approximation of `delta` (out, in)."""
    U, S, Vh = torch.linalg.svd(delta, full_matrices=full_matrices)
    kept = min(rank, S.numel())
    B = U[:, :kept] @ torch.diag(S[:kept])
    A = Vh[:kept, :]
    if clamp is not None:
        high = torch.quantile(torch.cat([B.flatten(), A.flatten()]), clamp)
        B, A = B.clamp(-high, high), A.clamp(-high, high)
    return pad_rank(A, rank, 0), pad_rank(B, rank, 1)


def pad_rank(factor: torch.Tensor, rank: int, axis: int) -> torch.Tensor:
    """`factor` with zeros appended along its rank `axis` up to `rank` (no update from them)."""
    missing = rank - factor.shape[axis]
    if missing <= 0:
        return factor
    shape = list(factor.shape)
    shape[axis] = missing
    return torch.cat([factor, factor.new_zeros(shape)], dim=axis)
