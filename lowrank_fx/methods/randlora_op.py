"""`randlora_delta`: RandLoRA's Δy = x ΔWᵀ (randlora_ops.py) as one custom op with its own backward.

Why an op: `form="auto"` picks the factored or the dense form from the call's token count
(randlora_forms.py). Under torch.compile(dynamic=True) a Python `if tokens > k` on the
symbolic token count would add a guard, and a recompile on the other side of k. Inside a
torch.library custom op the sizes are plain ints: the compiler sees only the op and its fake
implementation (the output's shape), so the choice costs no guard and no recompile. The op
also fixes what autograd keeps, eager and compiled alike: x, s·λ, γ and the two shared bases,
never ΔW (D, d) or Â (N·r, d), which no compiler pass can move out of an opaque op. Its
backward is a second op, `randlora_delta_backward`, which rebuilds what it needs and chooses
the form of the backward pass by that pass's own costs. `delta_forward` and `delta_backward`
are the two ops' implementations. Only a compiled `form="auto"` needs the op: eager calls,
and compiled calls with a fixed form (no choice, so no guard), run the same implementations
through `_Delta`, an autograd.Function with the same saved tensors. That spares them the op's
dispatch, which costs more than its products at small sizes, and lets the compiler fuse the
element-wise work (Â, dλ, dγ) into the graph around it.

    lowrank_fx::randlora_delta(x (..., in), s·λ (r, N), γ (N, d), basis_A, basis_B,
                               big, tall, form, compute) -> Δy (..., out)

The scale s enters through λ (Â is linear in λ, so Â(s·λ) = s·Â(λ)): the op has no float
argument for the compiler to specialise or to make symbolic, and autograd takes dλ = s·d(s·λ).

Dtypes: the products run in `compute` with autocast switched off inside the op, so forward,
backward, eager and compiled agree: the autocast dtype when autocast is on for x's device
and x is fp32 (the unit casts x to the adapter's dtype), else x's dtype. Â, dÂ and the
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


def delta_forward(x: torch.Tensor, lam_s: torch.Tensor, gamma: torch.Tensor, basis_A: torch.Tensor,
                  basis_B: torch.Tensor, big: int, tall: bool, form: str, compute: torch.dtype) -> torch.Tensor:
    """Δy (..., out)."""
    x2 = x.reshape(-1, x.shape[-1])
    dense = forms.use_dense(form, forms.pass_costs(x2.shape[0], big, gamma.shape[1], lam_s.numel(), tall))
    with torch.autocast(x.device.type, enabled=False):
        _, Bc, S = _operands(lam_s, gamma, basis_A, basis_B, big, compute)
        delta = forms.forward(x2.to(compute), Bc, S, tall, dense)
    return delta.to(x.dtype).reshape(*x.shape[:-1], delta.shape[-1])


_delta_op = torch.library.custom_op("lowrank_fx::randlora_delta", delta_forward, mutates_args=())


@_delta_op.register_fake
def _(x, lam_s, gamma, basis_A, basis_B, big, tall, form, compute):
    return x.new_empty((*x.shape[:-1], big if tall else gamma.shape[1]))


def delta_backward(grad: torch.Tensor, x: torch.Tensor, lam_s: torch.Tensor, gamma: torch.Tensor,
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


_backward_op = torch.library.custom_op("lowrank_fx::randlora_delta_backward", delta_backward, mutates_args=())


@_backward_op.register_fake
def _(grad, x, lam_s, gamma, basis_A, basis_B, big, tall, form, compute, input_grad):
    return [lam_s.new_empty(lam_s.shape), gamma.new_empty(gamma.shape)] + ([x.new_empty(x.shape)] if input_grad else [])


def _setup(ctx, inputs, output=None):
    x, lam_s, gamma, basis_A, basis_B, *options = inputs  # options: big, tall, form, compute
    ctx.save_for_backward(x, lam_s, gamma, basis_A, basis_B)
    ctx.options = options


def _gradients(ctx, grad, backward=torch.ops.lowrank_fx.randlora_delta_backward):
    input_grad = ctx.needs_input_grad[0]
    grads = backward(grad, *ctx.saved_tensors, *ctx.options, input_grad)
    return (grads[2] if input_grad else None), grads[0], grads[1], None, None, None, None, None, None


_delta_op.register_autograd(_gradients, setup_context=_setup)


class _Delta(torch.autograd.Function):
    """The op's autograd as a traceable Function, for eager calls and compiled fixed forms."""

    @staticmethod
    def forward(ctx, *inputs):
        _setup(ctx, inputs)
        return delta_forward(*inputs)

    @staticmethod
    def backward(ctx, grad):
        return _gradients(ctx, grad, delta_backward)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the op's products run in for x: autocast's for fp32 x under autocast, else x's."""
    device = x.device.type
    if x.dtype == torch.float32 and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


def randlora_delta(x: torch.Tensor, lam: torch.Tensor, gamma: torch.Tensor, basis_A: torch.Tensor,
                   basis_B: torch.Tensor, big: int, tall: bool, scale, form: str) -> torch.Tensor:
    """Δy (..., out) for x (..., in) and the scale s (a float, or a (1,) tensor as
    export/adapter_graph.py makes it): plain ops when exporting, the custom op when compiling
    form="auto", else `_Delta`."""
    lam_s = lam * scale
    if torch.compiler.is_exporting():
        _, Bc, S = _operands(lam_s, gamma, basis_A, basis_B, big, x.dtype)
        delta = forms.forward(x.reshape(-1, x.shape[-1]), Bc, S, tall, form == "dense")
        return delta.reshape(*x.shape[:-1], delta.shape[-1])
    run = torch.ops.lowrank_fx.randlora_delta if form == "auto" and torch.compiler.is_compiling() else _Delta.apply
    return run(x, lam_s, gamma, basis_A, basis_B, big, tall, form, compute_dtype(x))
