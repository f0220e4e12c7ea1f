"""Comparisons with an oracle shared by the tests: norm-relative errors, and gradients tensor by tensor.

A norm-relative error ‖got − want‖ / ‖want‖ holds a small tensor to the same standard as a
large one, where an absolute tolerance would let a gradient whose entries all lie below it
be zero or of the wrong sign.
"""

from __future__ import annotations

import torch


def rel(got: torch.Tensor, want: torch.Tensor) -> float:
    """‖got − want‖ / ‖want‖ (Frobenius norms, in float64); `want` must not be zero."""
    got, want = got.detach().double(), want.detach().double()
    norm = float(want.norm())
    assert norm > 0, "the oracle is zero: a relative error means nothing"
    return float((got - want).norm()) / norm


def assert_grads_match(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], tol: float = 1e-5) -> None:
    """The same parameters have gradients, each non-zero in `want` and within `tol` of it (norm-relative)."""
    assert got.keys() == want.keys()
    assert want, "no gradients to compare"
    errors = {name: rel(got[name], want[name]) for name in want}
    worst = max(errors, key=errors.get)
    assert errors[worst] <= tol, f"{worst}: relative error {errors[worst]:.3g} > {tol:g}"
