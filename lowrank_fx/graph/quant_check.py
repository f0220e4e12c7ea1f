"""Checks of one quantized layer at capture, each costing O(weights): the layer runs on a few
random rows, never on the identity.

Notation: the region (graph/quantized.py) computes y = f(x) = x Wᵀ + b for rows x (k, in),
W (out, in), b (out,), in the activation's dtype; n = in.

`dequantize_check`: the format's own dequantize W_d (an elementwise pass over the weight)
against the layer. With b = f(0) (exact: every product 0 · W_ij is 0) and x (k, in) random,

    Δ = f(x) - b - x W_dᵀ   (k, out)   must satisfy, for every row r and output i,
    |Δ_ri| ≤ (γ_{n+1}(u_acc) + 3 u) · (Σ_j |x_rj| |W_d,ij| + |b_i|),   γ_m(v) = m v / (1 - m v),

u the unit roundoff of the activation dtype (eps / 2), u_acc that of the accumulation (u, or
fp32's for 16-bit dtypes: PyTorch sums 16-bit products in fp32). Why it holds when the layer
computes with W_d: a dot product of n terms plus a bias, summed in ANY order (blocked, split,
with or without FMA), is within γ_{n+1}(u_acc) · Σ|terms| of the exact sum (Higham, Accuracy and
Stability of Numerical Algorithms, §3.1, the bound for every summation order); the layer may
round W_d to its dtype in its own way (2u |W_ij| each: 2u Σ_j |x_rj| |W_ij|) and rounds its output
once (u |x_r W_iᵀ + b_i|). x W_dᵀ and Σ|x||W_d| are computed here in float64, where each product
of two ≤24-bit significands is exact and the sum is off by n·2⁻⁵³ relative, far inside the bound.
A wrong W_d (another scale, a transpose, another layout) moves Δ by x (W - W_d)ᵀ; for Gaussian x
that is caught as soon as it exceeds the bound at one of the k·out outputs (for W_d = 1.001 W in
fp32: every layer with n up to a few thousand).

`gradient_check`: where a layer has no usable dequantize its backward differentiates the region
itself, so autograd's input gradient must be right. For random x, v (k, in) and g (k, out):
<dL/dx_r, v_r> must equal <g_r, f(v_r) - f(0)> (f(v) - f(0) = v Wᵀ for a weight-only layer). One
call of the layer on [x; v; 0] (2k + 1 rows) and one backward.
"""

from __future__ import annotations

import math

import torch

from .quantized import Region, run_rows

ROWS = 4
GRADIENT_TOLERANCE = 1e-3
CHUNK = 1 << 22  # float64 elements of W_d at a time in dequantize_check (32 MiB)


def random_rows(region: Region, rows: int, seed: int, dtype: torch.dtype, device) -> torch.Tensor:
    """`rows` standard Gaussian rows (rows, in), the same for a given seed on every device."""
    return torch.randn(rows, region.in_features, generator=torch.Generator().manual_seed(seed)).to(device, dtype)


def rounding_factor(dtype: torch.dtype, n: int) -> float:
    """γ_{n+1}(u_acc) + 3u for a dot product of n terms plus a bias in `dtype` (module docstring);
    inf where the bound says nothing (m · u_acc ≥ 1)."""
    u = torch.finfo(dtype).eps / 2
    u_acc = min(u, torch.finfo(torch.float32).eps / 2)
    m = n + 1
    return math.inf if m * u_acc >= 1 else m * u_acc / (1 - m * u_acc) + 3 * u


def dequantize_check(function, region: Region, dense: torch.Tensor, dtype: torch.dtype, device,
                     rows: int = ROWS) -> tuple[bool, float, float]:
    """Whether the layer `function` (x -> y) computes with `dense` (out, in) (module docstring):
    (ok, max |Δ| / bound, max |Δ| / max |x W_dᵀ|)."""
    x = random_rows(region, rows, 1, dtype, device)
    with torch.no_grad():
        y = run_rows(function, region, torch.cat([x, torch.zeros_like(x[:1])]))
    bias, y = y[-1].double(), y[:-1].double()
    factor = rounding_factor(dtype, region.in_features)
    x64, weight = x.double(), dense.to(dtype)
    step = max(1, CHUNK // region.in_features)
    ok, worst, largest, reference_max = True, 0.0, 0.0, 0.0
    for start in range(0, region.out_features, step):
        block = weight[start:start + step].double()
        reference = x64 @ block.t()
        delta = (y[:, start:start + step] - bias[start:start + step] - reference).abs()
        bound = factor * (x64.abs() @ block.abs().t() + bias[start:start + step].abs())
        ok &= bool((delta <= bound).all())
        worst = max(worst, float((delta / bound.clamp_min(torch.finfo(torch.float64).tiny)).max()))
        largest, reference_max = max(largest, float(delta.max())), max(reference_max, float(reference.abs().max()))
    return ok, worst, largest / max(reference_max, torch.finfo(torch.float64).tiny)


def gradient_check(function, region: Region, dtype: torch.dtype, device, rows: int = ROWS) -> tuple[str, float, str]:
    """("ok" | "no backward" | "wrong", measured relative error of <dL/dx, v>, detail) for the
    layer `function` (module docstring)."""
    x, v = random_rows(region, rows, 0, dtype, device), random_rows(region, rows, 2, dtype, device)
    g = torch.randn(rows, region.out_features, generator=torch.Generator().manual_seed(3)).to(device, dtype)
    stacked = torch.cat([x, v, torch.zeros_like(x[:1])]).requires_grad_(True)
    try:
        y = run_rows(function, region, stacked)
        if not y.requires_grad:
            return "wrong", 1.0, "no gradient reaches the layer's input: autograd sees no path through it"
        (grad,) = torch.autograd.grad(y[:rows], stacked, g)
    except (RuntimeError, NotImplementedError) as err:
        return "no backward", float("nan"), str(err).strip().splitlines()[0]
    with torch.no_grad():
        expected = (g * (y[rows:2 * rows] - y[-1])).sum(-1)
        got = (grad[:rows] * v).sum(-1)
        error = float((got - expected).norm() / expected.norm().clamp_min(1e-30))
    return ("ok" if error <= GRADIENT_TOLERANCE else "wrong"), error, ""
