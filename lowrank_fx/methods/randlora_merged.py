"""`randlora_linear`: a RandLoRA site y' = x Wᵀ + b + g·Δy computed as one product with W + g·ΔW.

The rewritten graph (passes/inject.py) computes the base product y = x Wᵀ + b (T·D·d
multiply-adds for T tokens) and then Δy = x ΔWᵀ in a form of randlora_forms.py. Merging ΔW
into W first needs one product of W's size in all (notation as randlora_forms.py: x (T, in),
Bc (D, R), Ŝ = s·Â (R, d), P = Bc Ŝ (D, d), ΔW = P (tall) or Pᵀ (wide), gate g (0-dim)):

    forward:   W' = W + g·ΔW  (out, in)            y' = x W'ᵀ + b              (T, out)
    backward:  dx = dy W'  (T, in)                 dΔW = g·dyᵀ x  (out, in)
               dP = dΔW (tall) or dΔWᵀ (wide),     dŜ = Bcᵀ dP                 (R, d)
               db = Σ_T dy  (when the bias is trained; W is frozen: no dW)

from which dλ and dγ follow as in randlora_ops.diagonal_grads. W' is built from (s·λ, γ, bases)
in forward and again in backward and lives only inside its pass: saved are x, s·λ, γ, the
bases, W (a parameter, so no memory) and the gate, never ΔW or W'. g = 0 gives W' = W
exactly, so the base output exactly. Its multiply-adds are the dense form's, D·d·(R + T) per
product; against the base product plus the factored Δy (randlora_forms.merged_costs) it wins
past T ≈ D·d / (D + d) tokens in forward.

`form="dense"` always merges; `form="auto"` takes the cheaper per pass, merged or the base
product plus the factored Δy. `_Merged`, an autograd.Function, runs both passes, eager and
compiled; as in randlora_op.py, a compiled "auto" puts both forms of a pass into the graph and
torch.cond takes one per call by the symbolic token count (randlora_forms.choose): no guard, no
recompile, and the compiler fuses the element-wise work (Ŝ, dλ, dγ) with the graph around it
(an earlier opaque custom op ran its Python and small ops eagerly, about 0.2 ms per call on one
CPU core at hidden 256). W + g·ΔW is one addmm.
Dtypes as randlora_op.py: products in `compute` with autocast off, y' and dx in x's dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import randlora_forms as forms
from .randlora_op import _operands, compute_dtype
from .randlora_ops import diagonal_grads


def merged_weight(W: torch.Tensor, Bc: torch.Tensor, S: torch.Tensor, gate: torch.Tensor, tall: bool) -> torch.Tensor:
    """W + g·ΔW (out, in) in S's dtype, ΔW = Bc S (tall) or (Bc S)ᵀ (wide): one addmm, g scaling
    the small factor S (R, d), not a (D, d) product."""
    gated = gate.to(S.dtype) * S
    W = W.to(S.dtype)
    return torch.addmm(W, Bc, gated) if tall else torch.addmm(W, gated.t(), Bc.t())


def _linear_forward(x: torch.Tensor, W: torch.Tensor, b: torch.Tensor | None, lam_s: torch.Tensor,
                   gamma: torch.Tensor, basis_A: torch.Tensor, basis_B: torch.Tensor, gate: torch.Tensor,
                   big: int, tall: bool, form: str, compute: torch.dtype) -> torch.Tensor:
    """y' (..., out) for x (..., in), W (out, in), b (out,) or None, s·λ (r, N), γ (N, d)."""
    x2 = x.reshape(-1, x.shape[-1])
    costs = forms.merged_costs(x2.shape[0], big, gamma.shape[1], lam_s.numel(), tall)
    with torch.autocast(x.device.type, enabled=False):
        _, Bc, S = _operands(lam_s, gamma, basis_A, basis_B, big, compute)
        xc, bias = x2.to(compute), (None if b is None else b.to(compute))

        def merged(xc, W, Bc, S, gate):
            return F.linear(xc, merged_weight(W, Bc, S, gate, tall), bias)

        def separate(xc, W, Bc, S, gate):
            return torch.addcmul(F.linear(xc, W.to(compute), bias), forms.forward(xc, Bc, S, tall, False),
                                 gate.to(compute))

        y = forms.choose(forms.use_dense(form, costs), merged, separate, (xc, W, Bc, S, gate))
    return y.to(x.dtype).reshape(*x.shape[:-1], y.shape[-1])


def _linear_backward(grad: torch.Tensor, x: torch.Tensor, W: torch.Tensor, lam_s: torch.Tensor, gamma: torch.Tensor,
                    basis_A: torch.Tensor, basis_B: torch.Tensor, gate: torch.Tensor, big: int, tall: bool,
                    form: str, compute: torch.dtype, input_grad: bool, bias_grad: bool) -> list[torch.Tensor]:
    """[dŜ (R, d) in s·λ's dtype], then dx when `input_grad`, then db when `bias_grad`, for
    grad = dL/dy' (..., out). dλ and dγ follow from dŜ (`_Merged.backward`)."""
    x2, g2 = x.reshape(-1, x.shape[-1]), grad.reshape(-1, grad.shape[-1])
    costs = forms.merged_costs(x2.shape[0], big, gamma.shape[1], lam_s.numel(), tall, backward=True,
                               input_grad=input_grad)
    with torch.autocast(x.device.type, enabled=False):
        _, Bc, S = _operands(lam_s, gamma, basis_A, basis_B, big, compute, backward=True)

        # dL/dΔy = g·dy, and dŜ and Δy's dx are linear in it: taken for dy and scaled by g after
        def merged(gc, xc, W, Bc, S, gate):  # the dense form's dŜ = Bcᵀ dP, dx = dy W'
            grad_S, _ = forms.backward(gc, xc, Bc, S, tall, True, False)
            return (grad_S, gc @ merged_weight(W, Bc, S, gate, tall)) if input_grad else (grad_S,)

        def separate(gc, xc, W, Bc, S, gate):  # the factored form's dŜ and dx, plus the base's dx
            grad_S, grad_x = forms.backward(gc, xc, Bc, S, tall, False, input_grad)
            return (grad_S, torch.addcmul(gc @ W.to(compute), grad_x, gate.to(compute))) if input_grad else (grad_S,)

        found = forms.choose(forms.use_dense(form, costs), merged, separate,
                             (g2.to(compute), x2.to(compute), W, Bc, S, gate))
        grads = [(found[0] * gate.to(compute)).to(lam_s.dtype).contiguous()]
        grad_x = found[1] if input_grad else None
    if input_grad:
        grads.append(grad_x.to(x.dtype).reshape(x.shape))
    return grads + ([g2.sum(0)] if bias_grad else [])


class _Merged(torch.autograd.Function):
    """y' with the saved tensors of the module docstring (x, W, s·λ, γ, the bases, g); traced by
    torch.compile."""

    @staticmethod
    def forward(ctx, x, W, b, lam_s, gamma, basis_A, basis_B, gate, *options):  # options: big, tall, form, compute
        ctx.save_for_backward(x, W, lam_s, gamma, basis_A, basis_B, gate)
        ctx.options = options
        return _linear_forward(x, W, b, lam_s, gamma, basis_A, basis_B, gate, *options)

    @staticmethod
    def backward(ctx, grad):
        input_grad, bias_grad = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
        x, W, lam_s, gamma, basis_A, basis_B, gate = ctx.saved_tensors
        grads = _linear_backward(grad, x, W, lam_s, gamma, basis_A, basis_B, gate, *ctx.options, input_grad, bias_grad)
        A = basis_A[:lam_s.shape[0], :gamma.shape[1]]  # (r, d)
        grad_lam, grad_gamma = diagonal_grads(grads[0], A, lam_s, gamma)
        grad_x = grads[1] if input_grad else None
        grad_b = grads[-1] if bias_grad else None
        return grad_x, None, grad_b, grad_lam, grad_gamma, None, None, None, None, None, None, None


def randlora_linear(x: torch.Tensor, W: torch.Tensor, b: torch.Tensor | None, lam: torch.Tensor, gamma: torch.Tensor,
                    basis_A: torch.Tensor, basis_B: torch.Tensor, gate: torch.Tensor, big: int, tall: bool,
                    scale: float, form: str) -> torch.Tensor:
    """y' = x (W + g·ΔW)ᵀ + b (..., out), by `_Merged`."""
    return _Merged.apply(x, W, b, lam * scale, gamma, basis_A, basis_B, gate, big, tall, form, compute_dtype(x))
