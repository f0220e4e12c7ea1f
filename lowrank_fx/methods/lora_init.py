"""LoRA initialisations other than the default, with PEFT's numerics (`init_lora_weights`).

For a linear target with W (out, in) in fp32 and s the LoRA scale:

    gaussian     A ~ N(0, 1/r²), B = 0                                  (base unchanged)
    orthogonal   Q = qr(N(0,1) (r, r)).Q;  A = (N(0,1) (in, r/2) · Q[0::2])ᵀ / 10,
                 B = N(0,1) (r/2, out)ᵀ · Q[1::2] / 10   (r even; B A ≠ 0: the model starts
                 off the base, as in PEFT)
    pissa        W = U S Vᵀ (full SVD); with S_r = S[:r] / s:
                 A = diag(√S_r) Vᵀ[:r],  B = U[:, :r] diag(√S_r),  W_res = W − s · B A
    pissa_niter_N  the same from torch.svd_lowrank(W, r, niter=N) (random: RNG-dependent)
    olora        W = Q R (reduced QR);  A = R[:r],  B = Q[:, :r],  W_res = W − s · B A
    loftq        a quantized base Q and factors with Q + s · B A ≈ W (lora_loftq.py): "loftq" is NF4
                 and 1 iteration (PEFT's LoftQConfig defaults), "loftq_8bit" int8, "_iter_N" N
                 alternating iterations ("loftq_8bit_iter_2"); with `loftq_weights` (the float
                 weights) over bitsandbytes 4-bit layers: the base is kept and A, B come from
                 W − Q (lora_loftq_quantized.py, PEFT's replace_lora_weights_loftq)
    eva          A = the top r principal directions (r, in) of the target's inputs over a calibration
                 run, B = 0, ranks redistributed across targets (lora_eva.py)   (base unchanged)
    corda        from the covariance C (in, in) of the target's inputs over a calibration run
                 (passes/calibrate.py): C_d = C + d · mean(diag C) · I with d = 0.01, doubled
                 until ‖C_d C_d⁻¹ − I‖ < 0.05;  W C_d = U S Vᵀ,  V' = (Vᵀ C_d⁻¹)ᵀ;  "corda"
                 (PEFT's ipm) keeps the top r directions, "corda_kpm" the last r; with S_r / s:
                 A = diag(√S_r) V'ᵀ_r,  B = U_r diag(√S_r),  W_res = W − s · B A

The inits that change the base (pissa*, olora, loftq*, corda*) leave W_res (Q for LoftQ) in the
graph's own copy of the weight (passes/residual_base.py), so W_res + s · B A = W at the start
(≈ W for LoftQ: Q is what a quantized base gives).

Random draws follow PEFT's order per layer, so the same seed gives the same factors: PEFT first
builds lora_A and lora_B as nn.Linear modules (a Kaiming-uniform draw of (r, in), then of
(out, r)) and then runs the init; `peft_layer_draws` makes the first two draws.
"""

from __future__ import annotations

import math
import os
import re

import torch
from torch import nn

from ..errors import SpecError
from ..graph.op_kinds import LinearKind, QuantizedLinearKind
from .lora_loftq import loftq
from .lora_loftq_quantized import SCHEME as QUANTIZED_SCHEME

RANDOM = ("gaussian", "orthogonal")
BASE_CHANGING = ("pissa", "olora", "loftq", "corda", "corda_kpm")  # and pissa_niter_N, loftq_8bit, loftq_iter_N
DATA = ("corda", "corda_kpm")  # need rewrite(..., calibration=run), as "eva" (lora_eva.py) does
NAMES = ("default", "nonzero", *RANDOM, *BASE_CHANGING, "eva", "pissa_niter_N", "loftq_8bit", "loftq_iter_N")
_NITER = re.compile(r"pissa_niter_(\d+)")
_LOFTQ = re.compile(r"loftq(?:_(4|8)bit)?(?:_iter_([1-9]\d*))?")


def loftq_settings(init: str) -> tuple[int, int] | None:
    """(bits, iterations) of a LoftQ init, None for the others."""
    found = _LOFTQ.fullmatch(init)
    return (int(found.group(1) or 4), int(found.group(2) or 1)) if found else None


def check_name(owner: str, init) -> str:
    """`init` if LoRA knows it; SpecError listing the known ones otherwise."""
    if isinstance(init, str) and (init in NAMES[:-3] or _NITER.fullmatch(init) or _LOFTQ.fullmatch(init)):
        return init
    raise SpecError(f"{owner} init must be one of {NAMES} (N a number of iterations, e.g. 'pissa_niter_4', "
                    f"'loftq_8bit_iter_2'), got {init!r}")


def changes_base(init: str) -> bool:
    """Whether `init` moves part of W into the factors (the graph's base becomes W − s · B A)."""
    return init in BASE_CHANGING or bool(_NITER.fullmatch(init) or _LOFTQ.fullmatch(init))


def check_method(method) -> None:
    """Options PEFT refuses with these inits: LoRA bias (only with the default init), an odd
    rank for orthogonal; and a negative alpha for PiSSA and CorDA (√ of a negative scale)."""
    init = method.init
    if init in ("default", "nonzero"):
        return
    if method.bias:
        raise SpecError(f"LoRA(init={init!r}, bias=True): a LoRA bias is only allowed with the default init "
                        "(PEFT refuses it too); use bias=False or init='default'")
    if (init.startswith("pissa") or init in DATA) and method.alpha < 0:
        raise SpecError(f"LoRA(init={init!r}, alpha={method.alpha:g}): this init puts √(S / s) into both factors, "
                        "which needs a positive scale s = alpha / r; use alpha > 0")
    if init == "orthogonal" and method.rank % 2:
        raise SpecError(f"LoRA(init='orthogonal') needs an even rank (A and B take alternate rows of an "
                        f"r x r orthogonal matrix), got rank={method.rank}; use rank={method.rank + 1}")


def loftq_weights_path(init: str, path) -> str | None:
    """LoRA's `loftq_weights` as a str path: only with init="loftq" (PEFT's replace_lora_weights_loftq:
    one SVD of W − Q over 4-bit layers), None when not given."""
    if path is None:
        return None
    if not isinstance(path, (str, os.PathLike)):
        raise SpecError(f"LoRA(loftq_weights=...) takes the path of a safetensors file with the float model's "
                        f"weights, got a {type(path).__name__}; save them with "
                        "safetensors.torch.save_file(model.state_dict(), path)")
    if init != "loftq":
        raise SpecError(f"LoRA(init={init!r}, loftq_weights=...): loftq_weights goes with init='loftq' only (one "
                        "SVD of W minus the bitsandbytes 4-bit base, as PEFT's replace_lora_weights_loftq); "
                        "use init='loftq', or drop loftq_weights")
    return os.fspath(path)


def check_target(init: str, target, rank: int, over_quantized: bool = False) -> None:
    """These inits work on linear weights only; the base-changing ones need r ≤ min(out, in)
    and a float base, except LoftQ given the float weights (`over_quantized`) over a bitsandbytes
    4-bit layer."""
    if init in ("default", "nonzero"):
        return
    if not isinstance(target.kind, LinearKind):
        raise SpecError(f"LoRA(init={init!r}) cannot adapt {target.name}, a {target.kind.name}: these inits are "
                        "defined for linear layers only; give it its own LoRA with init='default' (a mixed spec)")
    if changes_base(init):
        kind = target.kind
        if isinstance(kind, QuantizedLinearKind) and over_quantized and kind.scheme != QUANTIZED_SCHEME:
            raise SpecError(f"LoRA(init='loftq', loftq_weights=...) cannot start from {target.name}'s "
                            f"{kind.scheme} weight: LoftQ pairs its factors with bitsandbytes' NF4 base "
                            "(blocks of 64 with fp32 scales), and only bitsandbytes' 4-bit layers hold it "
                            "(torchao's nf4 quantizes the block scales again, so its base is another one); quantize "
                            "with bitsandbytes' Linear4bit, or rewrite the float model with init='loftq' (the graph "
                            "then holds LoftQ's Q)")
        if target.quantized and not over_quantized:
            raise SpecError(f"LoRA(init={init!r}) decomposes the float weight of {target.name}, which is already "
                            "quantized (lfx.quantize_base); rewrite the float model instead (LoftQ then puts its "
                            "quantized base into the graph), give init='loftq' the float weights "
                            "(loftq_weights=) over bitsandbytes 4-bit layers, or use init='default' on quantized "
                            "layers")
        if rank > min(target.out_features, target.in_features):
            raise SpecError(f"LoRA(init={init!r}, rank={rank}) on {target.name} ({target.out_features} x "
                            f"{target.in_features}): the rank must be at most min(out, in) = "
                            f"{min(target.shape)}, the number of directions the decomposition has")
        if target.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise SpecError(f"LoRA(init={init!r}) decomposes the weight of {target.name}, whose dtype is "
                            f"{target.dtype}; run it on a float32, float16 or bfloat16 model")


def peft_layer_draws(rank: int, in_features: int, out_features: int) -> None:
    """Consume the random numbers PEFT's construction of lora_A (in → r) and lora_B (r → out) does."""
    for shape in ((rank, in_features), (out_features, rank)):
        nn.init.kaiming_uniform_(torch.empty(shape), a=math.sqrt(5))


def random_factors(init: str, rank: int, in_features: int, out_features: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A (r, in), B (out, r)) in fp32 for the inits that draw without the weight."""
    peft_layer_draws(rank, in_features, out_features)
    if init == "gaussian":
        return torch.randn(rank, in_features) / rank, torch.zeros(out_features, rank)
    rotation, _ = torch.linalg.qr(torch.randn(rank, rank))
    a = (torch.randn(in_features, rank // 2) @ rotation[0::2]).t() / 10.0
    b = torch.randn(rank // 2, out_features).t() @ rotation[1::2] / 10.0
    return a.contiguous(), b.contiguous()


def _corda_directions(weight: torch.Tensor, covariance: torch.Tensor, rank: int, last: bool):
    """(U_r (out, r), S_r (r,), V'_r (in, r)) of W C_d (see the module docstring)."""
    covariance = covariance.to(device=weight.device, dtype=torch.float32)
    eye = torch.eye(covariance.shape[0], device=weight.device)
    damp = 0.01
    while True:
        damped = covariance + eye * torch.mean(torch.diag(covariance)) * damp
        inverse = torch.linalg.inv(damped)
        if torch.dist(damped @ inverse, eye).item() < 0.05:
            break
        damp *= 2
    left, values, rows = torch.linalg.svd(weight @ damped, full_matrices=False)
    right = (rows @ inverse).t()
    keep = slice(-rank, None) if last else slice(None, rank)
    return left[:, keep], values[keep], right[:, keep]


def weight_factors(init: str, weight: torch.Tensor, rank: int, scale: float, covariance: torch.Tensor | None = None):
    """(A (r, in), B (out, r), the base the graph keeps (out, in)) in fp32 from W (out, in),
    for the base-changing inits (CorDA also reads the input covariance C (in, in))."""
    weight = weight.to(torch.float32)
    out_features, in_features = weight.shape
    peft_layer_draws(rank, in_features, out_features)
    settings = loftq_settings(init)
    if settings:
        return loftq(weight, rank, scale, *settings)
    if init in DATA:
        assert covariance is not None, "passes/calibrate.py refuses a data init without calibration"
        left, values, right = _corda_directions(weight, covariance, rank, last=init == "corda_kpm")
        root = (values / scale).sqrt()
        a, b = right.t().mul(root.view(-1, 1)).contiguous(), left.mul(root).contiguous()
        return a, b, weight - scale * b @ a
    if init == "olora":
        q, r = torch.linalg.qr(weight)
        a, b = r[:rank].contiguous(), q[:, :rank].contiguous()
        return a, b, weight - scale * b @ a
    niter = _NITER.fullmatch(init)
    if niter:
        left, values, right = torch.svd_lowrank(weight, rank, niter=int(niter.group(1)))
        rows = right.t()
    else:
        left, values, rows = torch.linalg.svd(weight, full_matrices=False)
        left, values, rows = left[:, :rank], values[:rank], rows[:rank]
    root = torch.sqrt(values / scale)
    a, b = torch.diag(root) @ rows, left @ torch.diag(root)
    return a, b, weight - scale * b @ a
