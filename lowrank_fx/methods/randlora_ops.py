"""RandLoRA's numerics: the shared random bases, the scaled basis and its diagonals' gradients.

Notation for one target W (out, in): D = max(out, in), d = min(out, in), N = ceil(d / r).
The shared bases are `basis_A` (r, d_max) and `basis_B` (D_max, N_max · r); a target uses
A = basis_A[:, :d] and Bc = basis_B[:D, :N·r]. Its trainable diagonals are λ (r, N) and
γ (N, d), and its *scaled basis* is

    Â[k·N + n, :] = λ[k, n] · A[k, :] ⊙ γ[n, :]                      Â (N·r, d)

so that, with B_n (D, r) := Bc viewed as (D, r, N) at [:, :, n], Λ_n = diag(λ[:, n]),
Γ_n = diag(γ[n]):

    Bc Â = Σ_n B_n Λ_n A Γ_n                                          (D, d)
    ΔW = s · Bc Â           when out ≥ in ("tall": d = in)
    ΔW = s · (Bc Â)ᵀ        when out < in ("wide": d = out)

This is also PEFT's layout (randlora_A (r, 1, d_max), randlora_B (D_max, N_max, r), its
flattened columns k·N + n pair with Â's rows), so bases and diagonals copy across 1:1.

Δy = x ΔWᵀ and its gradients are computed without keeping ΔW or Â for backward, in a
factored or a dense form (randlora_forms.py), by one autograd.Function (randlora_op.py).
"""

from __future__ import annotations

import torch


def random_bases(rank: int, d_max: int, big_max: int, n_max: int, seed: int, sparse: bool,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(basis_A (rank, d_max), basis_B (big_max, n_max·rank)), the same for the same arguments.

    Dense: entries U(-1, 1); sparse: -1 or +1 with probability 1/6 each, else 0. Each
    basis is then divided by its own standard deviation. Drawn on the CPU in fp32 from a
    generator seeded with `seed` (A first, then B), so any device regenerates them.
    """
    generator = torch.Generator(device="cpu").manual_seed(seed)

    def draw(shape):
        u = torch.rand(shape, generator=generator, device="cpu")
        values = torch.sign(u - 0.5) * ((u < 1 / 6) | (u > 5 / 6)) if sparse else 2 * u - 1
        return (values / values.std()).to(dtype)

    basis_a = draw((rank, d_max))
    return basis_a, draw((big_max, n_max * rank))


def sliced_bases(basis_A, basis_B, rank: int, n: int, d: int, big: int):
    """A (rank, d) and Bc (big, n·rank) of one target."""
    return basis_A[:rank, :d], basis_B[:big, : n * rank]


def scaled_basis(A: torch.Tensor, lam: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """Â (N·r, d), row k·N + n = λ[k, n] · A[k] ⊙ γ[n]."""
    rank, n = lam.shape
    return (lam[:, :, None] * A[:, None, :] * gamma[None, :, :]).reshape(rank * n, -1)


def diagonal_grads(grad_scaled: torch.Tensor, A: torch.Tensor, lam: torch.Tensor,
                   gamma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """dλ (r, N) and dγ (N, d) from dÂ (N·r, d), by the product rule on Â[k, n] = λ[k, n] · A[k] ⊙ γ[n]."""
    rank, n = lam.shape
    g = grad_scaled.reshape(rank, n, -1)
    grad_lam = (g * (A[:, None, :] * gamma[None, :, :])).sum(-1)
    grad_gamma = ((g * lam[:, :, None]) * A[:, None, :]).sum(0)
    return grad_lam, grad_gamma
