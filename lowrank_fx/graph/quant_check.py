"""Checks of one quantized layer at capture, each costing O(weights): the layer runs on a few
random rows, never on the identity.

Notation: the region (graph/quantized.py) computes y = f(x) = x Wᵀ + b for rows x (k, in),
W (out, in), b (out,), in the activation's dtype; n = in.

`dequantize_check`: the format's own dequantize W_d (an elementwise pass over the weight)
against the layer. With b = f(0) (exact: every product 0 · W_ij is 0), probe rows x (2k, in),
r = x W_dᵀ and S = |x| |W_d|ᵀ + |b| both computed here in the accumulation dtype,

    Δ = f(x) - b - r   (2k, out)   must satisfy, for every row and output,
    |Δ| ≤ c · S,   c = (2 γ + 3 u) / (1 - γ),   γ = γ_{n+1}(u_acc) = (n+1) u_acc / (1 - (n+1) u_acc),

u the unit roundoff of the activation dtype (eps / 2), u_acc that of the accumulation (u, or
fp32's for 16-bit dtypes: PyTorch sums 16-bit products in fp32, and so does r here; float64
activations are summed in float64). Why it holds when the layer computes with W_d: a dot product
of n terms plus a bias, summed in ANY order (blocked, split, with or without FMA), is within
γ · Σ|terms| of the exact sum (Higham, Accuracy and Stability of Numerical Algorithms, §3.1: the
bound holds for every order of evaluation). That covers the layer's sum and r's, hence 2γ; the
layer may round W_d to its dtype in its own way (2u |W_ij| each) and rounds its output once (u),
hence 3u; S itself, a sum of n + 1 positive terms, is computed as S (1 + θ), |θ| ≤ γ, so the
true S is at most the computed one / (1 - γ).

The rows: k Gaussian rows, where an error anywhere in W shows (a transpose, another layout), and
k rows x_r = sign(W_d[i_r]) for k output rows i_r spread evenly. On a Gaussian row the bound's
Σ|x||W| is about √n times |x W_iᵀ|, so only errors above ~n^1.5·u relative show there; on a
sign row all n terms of output i_r are positive, Σ_j |x_rj||W_ij| = x_r W_iᵀ, so a relative
error ε of that row shows once ε > c ≈ (2n + 5) u: W_d = 1.001 W fails for every n up to 8,000 in fp32.

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


def random_rows(region: Region, rows: int, seed: int, dtype: torch.dtype, device) -> torch.Tensor:
    """`rows` standard Gaussian rows (rows, in), the same for a given seed on every device."""
    return torch.randn(rows, region.in_features, generator=torch.Generator().manual_seed(seed)).to(device, dtype)


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype PyTorch sums products of `dtype` in: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def rounding_factor(dtype: torch.dtype, n: int) -> float:
    """c = (2γ + 3u) / (1 - γ), γ = γ_{n+1}(u_acc), for dot products of n terms plus a bias in `dtype`
    (module docstring); inf where the bound says nothing ((n+1) u_acc ≥ 1)."""
    u, u_acc = torch.finfo(dtype).eps / 2, torch.finfo(_accumulation_dtype(dtype)).eps / 2
    m = n + 1
    if m * u_acc >= 1:
        return math.inf
    gamma = m * u_acc / (1 - m * u_acc)
    return (2 * gamma + 3 * u) / (1 - gamma)


def dequantize_check(function, region: Region, dense: torch.Tensor, dtype: torch.dtype, device,
                     rows: int = ROWS) -> tuple[bool, float, float]:
    """Whether the layer `function` (x -> y) computes with `dense` (out, in), on `rows` Gaussian
    and `rows` sign rows (module docstring): (ok, max |Δ| / bound, max |Δ| / max |r|)."""
    weight = dense.to(device, dtype)
    picked = torch.linspace(0, region.out_features - 1, rows, device=device).round().long()
    x = torch.cat([random_rows(region, rows, 1, dtype, device), weight[picked].sign()])
    with torch.no_grad():
        y = run_rows(function, region, torch.cat([x, torch.zeros_like(x[:1])]))
        wide = _accumulation_dtype(dtype)
        x, weight, bias, y = x.to(wide), weight.to(wide), y[-1].to(wide), y[:-1].to(wide)
        reference = x @ weight.t()
        delta = (y - bias - reference).abs()
        bound = rounding_factor(dtype, region.in_features) * (x.abs() @ weight.abs().t() + bias.abs())
    tiny = torch.finfo(wide).tiny
    return (bool((delta <= bound).all()), float((delta / bound.clamp_min(tiny)).max()),
            float(delta.max() / reference.abs().max().clamp_min(tiny)))


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
