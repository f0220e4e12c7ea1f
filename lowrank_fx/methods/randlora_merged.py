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
product plus the factored Δy. As in randlora_op.py, a compiled "auto" runs the custom op
`lowrank_fx::randlora_linear` (its backward the op `randlora_linear_grads`, which returns dŜ:
dλ and dγ are traced around it), in which the sizes are plain ints, so the choice adds no guard;
eager calls and compiled "dense" run the same implementations through `_Merged`, an
autograd.Function with the same saved tensors. Each op call runs its Python and its small
element-wise ops eagerly (about 0.2 ms per call on one CPU core at hidden 256), so the ops hold
products only, and W + g·ΔW is one addmm.
Dtypes as randlora_op.py: products in `compute` with autocast off, y' and dx in x's dtype.
"""

from __future__ import annotations

from typing import Optional

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


def linear_forward(x: torch.Tensor, W: torch.Tensor, b: Optional[torch.Tensor], lam_s: torch.Tensor,
                   gamma: torch.Tensor, basis_A: torch.Tensor, basis_B: torch.Tensor, gate: torch.Tensor,
                   big: int, tall: bool, form: str, compute: torch.dtype) -> torch.Tensor:
    """y' (..., out) for x (..., in), W (out, in), b (out,) or None, s·λ (r, N), γ (N, d)."""
    x2 = x.reshape(-1, x.shape[-1])
    costs = forms.merged_costs(x2.shape[0], big, gamma.shape[1], lam_s.numel(), tall)
    with torch.autocast(x.device.type, enabled=False):
        _, Bc, S = _operands(lam_s, gamma, basis_A, basis_B, big, compute)
        xc, bias = x2.to(compute), (None if b is None else b.to(compute))
        if forms.use_dense(form, costs):
            y = F.linear(xc, merged_weight(W, Bc, S, gate, tall), bias)
        else:
            y = torch.addcmul(F.linear(xc, W.to(compute), bias), forms.forward(xc, Bc, S, tall, False),
                              gate.to(compute))
    return y.to(x.dtype).reshape(*x.shape[:-1], y.shape[-1])


_linear_op = torch.library.custom_op("lowrank_fx::randlora_linear", linear_forward, mutates_args=())


@_linear_op.register_fake
def _(x, W, b, lam_s, gamma, basis_A, basis_B, gate, big, tall, form, compute):
    return x.new_empty((*x.shape[:-1], W.shape[0]))


def linear_backward(grad: torch.Tensor, x: torch.Tensor, W: torch.Tensor, lam_s: torch.Tensor, gamma: torch.Tensor,
                    basis_A: torch.Tensor, basis_B: torch.Tensor, gate: torch.Tensor, big: int, tall: bool,
                    form: str, compute: torch.dtype, input_grad: bool, bias_grad: bool) -> list[torch.Tensor]:
    """[dŜ (R, d) in s·λ's dtype], then dx when `input_grad`, then db when `bias_grad`, for
    grad = dL/dy' (..., out). dλ and dγ follow from dŜ outside the op (`_gradients`), where a
    compiler fuses their element-wise work into the graph."""
    x2, g2 = x.reshape(-1, x.shape[-1]), grad.reshape(-1, grad.shape[-1])
    costs = forms.merged_costs(x2.shape[0], big, gamma.shape[1], lam_s.numel(), tall, backward=True,
                               input_grad=input_grad)
    merged = forms.use_dense(form, costs)
    with torch.autocast(x.device.type, enabled=False):
        _, Bc, S = _operands(lam_s, gamma, basis_A, basis_B, big, compute, backward=True)
        gc, xc, gate_c = g2.to(compute), x2.to(compute), gate.to(compute)
        # dL/dΔy = g·dy, and dŜ and Δy's dx are linear in it: the dense form's dŜ = Bcᵀ dP when merged,
        # the factored form's dŜ (and its dx) when not, taken for dy and scaled by g after
        grad_S, grad_x = forms.backward(gc, xc, Bc, S, tall, merged, input_grad and not merged)
        if input_grad:
            grad_x = (gc @ merged_weight(W, Bc, S, gate, tall) if merged
                      else torch.addcmul(gc @ W.to(compute), grad_x, gate_c))
        grads = [(grad_S * gate_c).to(lam_s.dtype).contiguous()]
    if input_grad:
        grads.append(grad_x.to(x.dtype).reshape(x.shape))
    return grads + ([g2.sum(0)] if bias_grad else [])


_backward_op = torch.library.custom_op("lowrank_fx::randlora_linear_grads", linear_backward, mutates_args=())


@_backward_op.register_fake
def _(grad, x, W, lam_s, gamma, basis_A, basis_B, gate, big, tall, form, compute, input_grad, bias_grad):
    grad_scaled = gamma.new_empty((lam_s.shape[0] * lam_s.shape[1], gamma.shape[1]))  # dŜ (R, d)
    return ([grad_scaled] + ([x.new_empty(x.shape)] if input_grad else [])
            + ([grad.new_empty(grad.shape[-1:])] if bias_grad else []))


def _setup(ctx, inputs, output=None):
    x, W, _, lam_s, gamma, basis_A, basis_B, gate, *options = inputs  # options: big, tall, form, compute
    ctx.save_for_backward(x, W, lam_s, gamma, basis_A, basis_B, gate)
    ctx.options = options


def _gradients(ctx, grad, backward=torch.ops.lowrank_fx.randlora_linear_grads):
    input_grad, bias_grad = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
    x, W, lam_s, gamma, basis_A, basis_B, gate = ctx.saved_tensors
    grads = backward(grad, x, W, lam_s, gamma, basis_A, basis_B, gate, *ctx.options, input_grad, bias_grad)
    A = basis_A[:lam_s.shape[0], :gamma.shape[1]]  # (r, d)
    grad_lam, grad_gamma = diagonal_grads(grads[0], A, lam_s, gamma)
    grad_x = grads[1] if input_grad else None
    grad_b = grads[-1] if bias_grad else None
    return grad_x, None, grad_b, grad_lam, grad_gamma, None, None, None, None, None, None, None


_linear_op.register_autograd(_gradients, setup_context=_setup)


class _Merged(torch.autograd.Function):
    """The op's autograd as a traceable Function, for eager calls and compiled "dense"."""

    @staticmethod
    def forward(ctx, *inputs):
        _setup(ctx, inputs)
        return linear_forward(*inputs)

    @staticmethod
    def backward(ctx, grad):
        return _gradients(ctx, grad, linear_backward)


def randlora_linear(x: torch.Tensor, W: torch.Tensor, b: torch.Tensor | None, lam: torch.Tensor, gamma: torch.Tensor,
                    basis_A: torch.Tensor, basis_B: torch.Tensor, gate: torch.Tensor, big: int, tall: bool,
                    scale: float, form: str) -> torch.Tensor:
    """y' = x (W + g·ΔW)ᵀ + b (..., out): the custom op when compiling form="auto", else `_Merged`."""
    run = torch.ops.lowrank_fx.randlora_linear if form == "auto" and torch.compiler.is_compiling() else _Merged.apply
    return run(x, W, b, lam * scale, gamma, basis_A, basis_B, gate, big, tall, form, compute_dtype(x))
