"""`randlora_delta`: RandLoRA's Δy = x ΔWᵀ (randlora_ops.py) as an autograd.Function with its own backward.

`_Delta` fixes what autograd keeps, eager and compiled alike: x, s·λ, γ and the two shared
bases, never ΔW (D, d) or Â (N·r, d). Its backward rebuilds what it needs and chooses the form
of the backward pass by that pass's own costs. `_delta_forward` and `_delta_backward` are the
two passes.

`form="auto"` picks the factored or the dense form from the call's token count
(randlora_forms.py). Eager the count is an int and the choice a Python `if`. Under
torch.compile(dynamic=True) the count is symbolic, and a Python `if tokens > k` would add a
guard, and a recompile on the other side of k: there both forms go into the graph and
torch.cond takes one per call (randlora_forms.choose), no guard, no recompile, and the
compiler fuses each form's element-wise work (Â, dλ, dγ) with the graph around it. A fixed
form has no choice to make: its ops alone are traced.

    randlora_delta(x (..., in), s·λ (r, N), γ (N, d), basis_A, basis_B, big, tall, form, compute) -> Δy (..., out)

The scale s enters through λ (Â is linear in λ, so Â(s·λ) = s·Â(λ)), and autograd takes
dλ = s·d(s·λ).

Dtypes: the products run in `compute` with autocast switched off inside the Function, so
forward, backward, eager and compiled agree: the autocast dtype when autocast is on for x's
device and x is fp32 (the unit casts x to the adapter's dtype), else x's dtype. Â, dÂ and the
diagonals' gradients are formed in the parameters' dtype; Δy and dx come back in x's dtype.

Exporting (torch.export, which ONNX export runs under) takes plain torch ops instead, so an
exported graph holds standard ops only: the dense form for `form="dense"`, else the factored
one (an exported graph has one form for every shape).
"""

from __future__ import annotations

import torch

from . import randlora_forms as forms
from .randlora_ops import diagonal_grads, scaled_basis, sliced_bases


def _operands(lam_s, gamma, basis_A, basis_B, big: int, dtype: torch.dtype, backward: bool = False):
    """(A (r, d), and in `dtype` Bc (D, R) and S = Â(s·λ) = s·Â (R, d)) of one target.

    Backward multiplies S's factors in another order on purpose: a compiler tracing both passes
    would otherwise merge the two expressions (CSE) and keep forward's S, or the dense form's
    ΔW built from it, alive until backward, which is what this module exists to avoid."""
    rank, n = lam_s.shape
    A, Bc = sliced_bases(basis_A, basis_B, rank, n, gamma.shape[1], big)
    if backward:
        S = (lam_s[:, :, None] * (A[:, None, :] * gamma[None, :, :])).reshape(rank * n, -1)
    else:
        S = scaled_basis(A, lam_s, gamma)
    return A, Bc.to(dtype), S.to(dtype)


def _delta_forward(x: torch.Tensor, lam_s: torch.Tensor, gamma: torch.Tensor, basis_A: torch.Tensor,
                  basis_B: torch.Tensor, big: int, tall: bool, form: str, compute: torch.dtype) -> torch.Tensor:
    """Δy (..., out)."""
    x2 = x.reshape(-1, x.shape[-1])
    dense = forms.use_dense(form, forms.pass_costs(x2.shape[0], big, gamma.shape[1], lam_s.numel(), tall))
    with torch.autocast(x.device.type, enabled=False):
        _, Bc, S = _operands(lam_s, gamma, basis_A, basis_B, big, compute)
        delta = forms.forward(x2.to(compute), Bc, S, tall, dense)
    return delta.to(x.dtype).reshape(*x.shape[:-1], delta.shape[-1])


def _delta_backward(grad: torch.Tensor, x: torch.Tensor, lam_s: torch.Tensor, gamma: torch.Tensor,
                   basis_A: torch.Tensor, basis_B: torch.Tensor, big: int, tall: bool, form: str,
                   compute: torch.dtype, input_grad: bool) -> list[torch.Tensor]:
    """[d(s·λ), dγ], then dx when `input_grad`."""
    x2, g2 = x.reshape(-1, x.shape[-1]), grad.reshape(-1, grad.shape[-1])
    costs = forms.pass_costs(x2.shape[0], big, gamma.shape[1], lam_s.numel(), tall, backward=True,
                             input_grad=input_grad)
    with torch.autocast(x.device.type, enabled=False):
        A, Bc, S = _operands(lam_s, gamma, basis_A, basis_B, big, compute, backward=True)
        grad_S, grad_x = forms.backward(g2.to(compute), x2.to(compute), Bc, S, tall, forms.use_dense(form, costs),
                                        input_grad)
        grads = list(diagonal_grads(grad_S.to(lam_s.dtype), A, lam_s, gamma))
    return grads + ([grad_x.to(x.dtype).reshape(x.shape)] if input_grad else [])


class _Delta(torch.autograd.Function):
    """Δy with the saved tensors of the module docstring; traced by torch.compile."""

    @staticmethod
    def forward(ctx, x, lam_s, gamma, basis_A, basis_B, *options):  # options: big, tall, form, compute
        ctx.save_for_backward(x, lam_s, gamma, basis_A, basis_B)
        ctx.options = options
        return _delta_forward(x, lam_s, gamma, basis_A, basis_B, *options)

    @staticmethod
    def backward(ctx, grad):
        input_grad = ctx.needs_input_grad[0]
        grads = _delta_backward(grad, *ctx.saved_tensors, *ctx.options, input_grad)
        return (grads[2] if input_grad else None), grads[0], grads[1], None, None, None, None, None, None


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the products run in for x: autocast's for fp32 x under autocast, else x's."""
    device = x.device.type
    if x.dtype == torch.float32 and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


def randlora_delta(x: torch.Tensor, lam: torch.Tensor, gamma: torch.Tensor, basis_A: torch.Tensor,
                   basis_B: torch.Tensor, big: int, tall: bool, scale, form: str) -> torch.Tensor:
    """Δy (..., out) for x (..., in) and the scale s (a float, or a (1,) tensor as
    export/adapter_graph.py makes it): plain ops when exporting, else `_Delta`."""
    lam_s = lam * scale
    if torch.compiler.is_exporting():
        _, Bc, S = _operands(lam_s, gamma, basis_A, basis_B, big, x.dtype)
        delta = forms.forward(x.reshape(-1, x.shape[-1]), Bc, S, tall, form == "dense")
        return delta.reshape(*x.shape[:-1], delta.shape[-1])
    return _Delta.apply(x, lam_s, gamma, basis_A, basis_B, big, tall, form, compute_dtype(x))
