"""RandLoRA's two ways to compute Δy = x ΔWᵀ and its gradients, what each costs, and the choice.

Notation as randlora_ops.py, for one call: x (T, in) (T tokens: every leading axis of the
activation), D = max(out, in), d = min(out, in), R = N·r basis columns, Bc (D, R), the scaled
basis times the scale Ŝ = s·Â (R, d), and g = dL/dΔy (T, out).

Factored: never forms a (D, d) matrix.
    tall: Δy = (x Ŝᵀ) Bcᵀ     backward: h = g Bc,  dŜ = hᵀ x,       dx = h Ŝ
    wide: Δy = (x Bc) Ŝ       backward: h = g Ŝᵀ,  dŜ = (x Bc)ᵀ g,  dx = h Bcᵀ
    (wide recomputes x Bc (T, R): only x is kept for backward.)
Dense: P = Bc Ŝ (D, d) is ΔW (tall) or ΔWᵀ (wide); built in forward, built again in backward.
    tall: Δy = x Pᵀ           backward: dP = gᵀ x,  dx = g P,   dŜ = Bcᵀ dP
    wide: Δy = x P            backward: dP = xᵀ g,  dx = g Pᵀ,  dŜ = Bcᵀ dP
    P and dP are weight-sized and live only inside their pass.
Either way dÂ = s·dŜ, from which dλ and dγ follow (randlora_ops.diagonal_grads).

Multiply-adds of one pass (element-wise work, R·d, is the same in both and left out):

                          factored               dense
    forward               T·R·(D + d)            D·d·(R + T)
    backward with dx      tall T·R·(D + 2d)      2·D·d·(R + T)
                          wide 2·T·R·(D + d)
    backward without dx   T·R·(D + d)            D·d·(R + T)     (dense: no P, only dP)

The dense form pays D·d·R once per pass to build P, then less per token, so it wins past T*:

    T* = D·d·R / (R·(D + d) − D·d) = ρ·R / (R − ρ),   ρ = D·d / (D + d)

for the forward and for every backward except a tall target's backward with dx, where

    T* = 2·D·d·R / (R·(D + 2d) − 2·D·d),   and never when R·(D + 2d) ≤ 2·D·d

(the factored tall backward shares h = g Bc between dŜ and dx). ρ is the rank at which a
factored pair costs one dense product of W's size; RandLoRA's R ≥ d > ρ, so per token the
factored form always costs more, and T* is finite. With R = d: T* = D (forward), e.g. a square
d x d target switches at T = d in forward and T = 2d in backward; a tall target with D ≥ 2d
keeps the factored backward at any T. `form="auto"` picks the cheaper form per pass from
these counts, so forward and backward of one call may use different forms.

At a site y' = x Wᵀ + b + g·Δy on a plain dense linear, fuse_sites' training form can also add
g·ΔW to W before the base product (randlora_merged.py): one product of W's size in all, whose
counts are the dense column's above (building P, then y', dx and dP each one T·D·d product).
Against it stands the base product (T·D·d forward, and T·D·d for dx) plus the factored form:

    forward               T* = D·d / (D + d) = ρ
    backward with dx      tall T* = 2·D·d·R / (R·(D + 2d) − D·d),  wide T* = 2·D·d·R / (2·R·(D + d) − D·d)
    backward without dx   T* = ρ·R / (R − ρ)  (as above: no base product)

all finite, since R ≥ d. For a square d x d target (tall) with R = d: d/2 forward, d backward with dx.
`merged_costs` gives both sides; `form="auto"` merges where it is cheaper, per pass.
"""

from __future__ import annotations

import torch

FORMS = ("auto", "factored", "dense")


def pass_costs(tokens: int, big: int, small: int, cols: int, tall: bool, backward: bool = False,
               input_grad: bool = True) -> tuple[int, int]:
    """(factored, dense) multiply-adds of one pass: T = tokens, D = big, d = small, R = cols."""
    if backward and input_grad:
        factored = tokens * cols * (big + 2 * small if tall else 2 * (big + small))
        return factored, 2 * big * small * (cols + tokens)
    return tokens * cols * (big + small), big * small * (cols + tokens)


def merged_costs(tokens: int, big: int, small: int, cols: int, tall: bool, backward: bool = False,
                 input_grad: bool = True) -> tuple[int, int]:
    """(base product + factored Δy, merged product) multiply-adds of one pass at a site; the merged
    form's are pass_costs' dense ones."""
    factored, dense = pass_costs(tokens, big, small, cols, tall, backward, input_grad)
    base = tokens * big * small if not backward or input_grad else 0
    return factored + base, dense


def use_dense(form: str, costs: tuple[int, int]) -> bool:
    """Whether a pass of `costs` = (factored, dense) runs in the dense form under `form` (for
    merged_costs: whether it merges)."""
    if form == "auto":
        return costs[1] < costs[0]
    return form == "dense"


def choose(dense, dense_form, factored_form, operands: tuple):
    """dense_form(*operands) where `dense` holds, else factored_form(*operands). Under
    torch.compile `dense` may be symbolic (`use_dense` on a symbolic token count, with
    dynamic=True): torch.cond then puts both forms into the graph and takes one per call at run
    time, so the choice adds no guard and no recompile, and the compiler sees each form's own
    ops (a constant `dense`, as every fixed form's, is one form only). Each form returns a tensor
    or a tuple of tensors, of the same shapes as the other's."""
    if torch.compiler.is_compiling() and not torch.compiler.is_exporting():
        return torch.cond(dense, dense_form, factored_form, operands)
    return dense_form(*operands) if dense else factored_form(*operands)


def forward(x: torch.Tensor, Bc: torch.Tensor, S: torch.Tensor, tall: bool, dense) -> torch.Tensor:
    """Δy (T, out) for x (T, in), Bc (D, R), S = s·Â (R, d); `dense` as `choose` takes it."""

    def dense_form(x, Bc, S):
        P = Bc @ S  # (D, d)
        return x @ P.t() if tall else x @ P

    def factored_form(x, Bc, S):
        return (x @ S.t()) @ Bc.t() if tall else (x @ Bc) @ S

    return choose(dense, dense_form, factored_form, (x, Bc, S))


def backward(g: torch.Tensor, x: torch.Tensor, Bc: torch.Tensor, S: torch.Tensor, tall: bool, dense,
             input_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(dS (R, d), dx (T, in) or None) for g = dL/dΔy (T, out); `dense` as `choose` takes it."""

    def dense_form(g, x, Bc, S):
        grad_P = g.t() @ x if tall else x.t() @ g  # (D, d)
        if not input_grad:
            return (Bc.t() @ grad_P,)
        P = Bc @ S
        return Bc.t() @ grad_P, (g @ P if tall else g @ P.t())

    def factored_form(g, x, Bc, S):
        if tall:
            h = g @ Bc  # (T, R)
            return (h.t() @ x, h @ S) if input_grad else (h.t() @ x,)
        grad_S = (x @ Bc).t() @ g
        return (grad_S, (g @ S.t()) @ Bc.t()) if input_grad else (grad_S,)

    grads = choose(dense, dense_form, factored_form, (g, x, Bc, S))
    return grads[0], (grads[1] if input_grad else None)
