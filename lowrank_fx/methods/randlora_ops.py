"""RandLoRA's numerics: the shared random bases and a memory-lean Δy.

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

`RandLoRAProduct` computes Δy = x ΔWᵀ without ΔW and without keeping Â for backward:

    tall: Δy = s · (x Âᵀ) Bcᵀ        wide: Δy = s · (x Bc) Â

It saves only x, λ, γ and the two shared bases (which exist anyway); backward re-slices
the bases and rebuilds Â, and the (N·r, d) gradient of Â lives only inside backward.
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


def _diagonal_grads(grad_scaled, A, A_gamma, lam):
    """dλ (r, N) and dγ (N, d) from dÂ (N·r, d), by the product rule on Â = λ ⊗ (A ⊙ γ);
    A_gamma (r, N, d) = A[k] ⊙ γ[n]."""
    g = grad_scaled.reshape(A_gamma.shape)
    grad_lam = (g * A_gamma).sum(-1)
    grad_gamma = ((g * lam[:, :, None]) * A[:, None, :]).sum(0)
    return grad_lam, grad_gamma


class RandLoRAProduct(torch.autograd.Function):
    """Δy (..., out) = x ΔWᵀ for x (..., in); see the module docstring."""

    @staticmethod
    def forward(ctx, x, lam, gamma, basis_A, basis_B, big: int, tall: bool, scale: float):
        rank, n = lam.shape
        A, Bc = sliced_bases(basis_A, basis_B, rank, n, gamma.shape[1], big)
        scaled = scaled_basis(A, lam, gamma)
        ctx.save_for_backward(x, lam, gamma, basis_A, basis_B)
        ctx.big, ctx.tall, ctx.scale = big, tall, scale
        if tall:
            return (x @ scaled.t()) @ Bc.t() * scale
        return (x @ Bc) @ scaled * scale

    @staticmethod
    def backward(ctx, grad_y):
        x, lam, gamma, basis_A, basis_B = ctx.saved_tensors
        rank, n = lam.shape
        A, Bc = sliced_bases(basis_A, basis_B, rank, n, gamma.shape[1], ctx.big)
        # Â again, multiplied in another order on purpose: torch.compile merges identical
        # expressions of forward and backward (CSE), and would then keep forward's Â alive
        # until backward, which is what this Function exists to avoid.
        A_gamma = A[:, None, :] * gamma[None, :, :]  # (r, N, d)
        scaled = (lam[:, :, None] * A_gamma).reshape(rank * n, -1)
        x2 = x.reshape(-1, x.shape[-1])
        g2 = grad_y.reshape(-1, grad_y.shape[-1]) * ctx.scale
        if ctx.tall:  # Δy = (x Âᵀ) Bcᵀ
            grad_h = g2 @ Bc  # (T, N·r)
            grad_scaled = grad_h.t() @ x2
            grad_x = grad_h @ scaled if ctx.needs_input_grad[0] else None
        else:  # Δy = (x Bc) Â
            grad_h = g2 @ scaled.t()
            grad_scaled = (x2 @ Bc).t() @ g2
            grad_x = grad_h @ Bc.t() if ctx.needs_input_grad[0] else None
        grad_lam, grad_gamma = _diagonal_grads(grad_scaled, A, A_gamma, lam)
        if grad_x is not None:
            grad_x = grad_x.reshape(x.shape)
        return grad_x, grad_lam, grad_gamma, None, None, None, None, None
