"""LoftQ over a base the user already quantized with bitsandbytes (PEFT's
`replace_lora_weights_loftq`): the 4-bit layer is kept as it is, and the factors take the
best rank-r part of what quantizing lost.

With W (out, in) the float weight (read from `LoRA(loftq_weights=...)`, a safetensors file of
the float model) and Q the layer's own dequantized weight (bitsandbytes' dequantize_4bit):

    W − Q = U S Vᵀ,   L = U_r √S_r (out, r),  R = √S_r Vᵀ_r (r, in)
    A = R / √s,  B = L / √s                      so Q + s · B A = Q + L R ≈ W

PEFT sets A = R, B = L whatever the scale (equal at alpha = r), as for LoftQ on the float model.
Only bitsandbytes' 4-bit layers qualify: torchao's nf4 quantizes its block scales again (double
quantization), so its base is not the one LoftQ's quantizer gives (lora_loftq.py).
"""

from __future__ import annotations

import os

import torch

from ..errors import SpecError

SCHEME = "bnb-4bit"


def float_weight(path: str, name: str, target: str, shape: tuple[int, int]) -> torch.Tensor:
    """The tensor `name` (out, in) of the safetensors file `path`, in fp32."""
    from safetensors import safe_open

    if not os.path.isfile(path):
        raise SpecError(f"LoRA(loftq_weights={path!r}): no such file; give the float model's weights as one "
                        "safetensors file (safetensors.torch.save_file(model.state_dict(), path))")
    with safe_open(path, framework="pt") as weights:
        if name not in weights.keys():
            raise SpecError(f"LoRA(loftq_weights={path!r}) has no tensor {name!r}, the float weight of {target}; "
                            "save the state dict of the same model before it was quantized")
        weight = weights.get_tensor(name)
    if tuple(weight.shape) != tuple(shape):
        raise SpecError(f"LoRA(loftq_weights={path!r}): {name} is {tuple(weight.shape)}, but {target}'s quantized "
                        f"weight is {tuple(shape)}; the file must hold the float weights of this model")
    return weight.to(torch.float32)


def residual_factors(weight: torch.Tensor, dequantized: torch.Tensor, rank: int, scale: float):
    """(A (r, in), B (out, r)) in fp32 from W − Q (module docstring)."""
    left, values, rows = torch.linalg.svd(weight.float() - dequantized.float(), full_matrices=False)
    root = torch.sqrt(values[:rank])
    factor = scale ** -0.5
    return (root[:, None] * rows[:rank]) * factor, (left[:, :rank] * root) * factor
