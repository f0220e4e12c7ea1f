"""`lfx.quantize_base(model, "int8" | "nf4" | "int4")`: quantize a model's linear layers with
torchao, **in place** (`inplace=False`: a copy), before `rewrite` (QLoRA-style training over a
frozen quantized base).

    int8   torchao Int8WeightOnlyConfig: int8 rows, one fp32 scale per output row (~1/4 of fp32)
    nf4    torchao to_nf4: 4-bit NormalFloat, blocks of 64 with double-quantized scales (~1/7)
    int4   torchao int4 weight-only, groups of `group_size` (128, or the largest of 128/64/32
           dividing the layer's input size), packed for the CPU kernel
           (PrototypeInt4WeightOnlyConfig) or, on CUDA, Int4WeightOnlyConfig (~1/7)

Every `nn.Linear` is quantized except the output head (`get_output_embeddings()`, a Linear
whose weight is an embedding's, or one named `lm_head`) and the names matching `exclude`
(globs matched against the name or any dotted suffix, as Spec patterns). Embeddings are never
quantized. A layer whose shape the scheme cannot take (nf4 needs a multiple of 64 values;
int4 an input size divisible by 32) is left dense and listed in the returned model's
`lowrank_fx_quantized` report.
"""

from __future__ import annotations

import copy
import fnmatch
from collections.abc import Sequence
from typing import Any, cast

import torch
from torch import nn

from ..deprecation import api_options
from ..errors import ModelTypeError, SpecError
from ..noise import quiet_third_party
from ..options import flag

SCHEMES = ("int8", "nf4", "int4")


def _matches(name: str, patterns) -> bool:
    parts = name.split(".")
    suffixes = [".".join(parts[i:]) for i in range(len(parts))]
    return any(fnmatch.fnmatchcase(s, p) for p in patterns for s in suffixes)


def _heads(model: nn.Module) -> set[str]:
    """Names of the Linear layers that are the model's output head."""
    found = set()
    output = cast(Any, model).get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    tables = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        if module is output or id(module.weight) in tables or name.rsplit(".", 1)[-1] == "lm_head":
            found.add(name)
    return found


def _nf4(weight: torch.Tensor):
    from torchao.quantization import to_nf4
    block = 64
    if weight.numel() % block:
        return None
    blocks = weight.numel() // block
    scaler_block = next(s for s in (256, 128, 64, 32, 16, 8, 4, 2, 1) if blocks % s == 0)
    return to_nf4(weight.detach(), block, scaler_block)


def _group_size(in_features: int, wanted: int | None) -> int | None:
    options = [wanted] if wanted else [128, 64, 32]
    return next((g for g in options if in_features % g == 0), None)


def _copy(model: nn.Module) -> nn.Module:
    try:
        return copy.deepcopy(model)
    except Exception as err:  # a tensor subclass without deepcopy (torchao NF4), a hook holding a lock
        raise SpecError(f"quantize_base(inplace=False) could not copy the model ({type(err).__name__}: {err}); "
                        "pass inplace=True to quantize it in place") from None


@api_options(positional=2)
def quantize_base(model: nn.Module, scheme: str, *, exclude: str | Sequence[str] = (), group_size: int | None = None,
                  inplace: bool = True) -> nn.Module:
    """Quantize `model`'s linear layers with torchao, IN PLACE by default, and return it.

    In place (the default, as torchao's `quantize_`): the model is changed, its Linear weights
    becoming torchao tensors (frozen), and returned; quantizing is how a model too large in
    fp32 fits, so no copy is made. `inplace=False` quantizes a deep copy and leaves `model`
    as it was (twice the float model's memory while it runs). The LM head and embeddings stay
    as they are, and so do the layers matching `exclude`. `model.lowrank_fx_quantized` says
    what was done: {"scheme", "layers": [...], "left_dense": {name: why}}.

    Args:
        model: the float model.
        scheme: "int8", "nf4" or "int4" (module docstring).
        exclude: a glob or a list of globs naming Linear layers to leave dense (matched
            against the name or any dotted suffix, as Spec patterns).
        group_size: int4's group size (default: the largest of 128/64/32 dividing the layer's
            input size).
        inplace: quantize `model` itself (True) or a copy of it (False).

    Returns:
        The quantized model: `model` itself, or its copy with `inplace=False`.

    Raises:
        ModelTypeError: `model` is not an `nn.Module`.
        SpecError: an unknown scheme, a bad `exclude`, torchao not installed, no layer the
            scheme can quantize, or a model that cannot be copied with `inplace=False`.
    """
    if not isinstance(model, nn.Module):
        raise ModelTypeError(f"quantize_base takes the model (a torch.nn.Module), got {type(model).__name__}")
    if scheme not in SCHEMES:
        raise SpecError(f"quantize_base scheme must be one of {SCHEMES}, got {scheme!r}")
    flag("quantize_base", "inplace", inplace)
    if isinstance(exclude, str):
        exclude = [exclude]
    if not (isinstance(exclude, (list, tuple, set)) and all(isinstance(p, str) for p in exclude)):
        raise SpecError(f"quantize_base exclude must be a pattern or a list of patterns (e.g. ['lm_head', "
                        f"'*.down_proj']), got {exclude!r}")
    try:
        with quiet_third_party():  # torchao's notices on its first import
            import torchao.quantization as tq
    except ImportError as err:
        raise SpecError("lfx.quantize_base needs torchao: pip install 'lowrank-fx[quant]'") from err
    if not inplace:
        model = _copy(model)
    heads = _heads(model)
    chosen = [(name, m) for name, m in model.named_modules()
              if isinstance(m, nn.Linear) and not type(m).__module__.startswith("bitsandbytes")
              and name not in heads and not _matches(name, exclude)]
    done, left = [], {}
    for name, module in chosen:
        weight = module.weight
        if not weight.is_floating_point() or type(weight) not in (nn.Parameter, torch.Tensor):
            left[name] = "already quantized"
            continue
        if scheme == "nf4":
            quantized = _nf4(weight)
            if quantized is None:
                left[name] = f"nf4 needs a multiple of 64 values, the weight has {weight.numel()}"
                continue
            module.weight = nn.Parameter(quantized, requires_grad=False)
        elif scheme == "int8":
            tq.quantize_(module, tq.Int8WeightOnlyConfig(), filter_fn=lambda m, fqn, module=module: m is module)
        else:
            size = _group_size(module.in_features, group_size)
            if size is None:
                left[name] = f"int4 groups ({group_size or '128/64/32'}) do not divide its {module.in_features} inputs"
                continue
            if weight.device.type == "cuda":
                config = tq.Int4WeightOnlyConfig(group_size=size)
            else:
                from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig
                config = PrototypeInt4WeightOnlyConfig(group_size=size, set_inductor_config=False)
            tq.quantize_(module, config, filter_fn=lambda m, fqn, module=module: m is module)
        module.weight.requires_grad_(False)
        done.append(name)
    if not done and not chosen:
        raise SpecError(f"quantize_base({scheme!r}) found no nn.Linear to quantize besides the output head; "
                        f"check `exclude` ({list(exclude)})")
    if not done:
        fix = ("it is quantized already" if all(why == "already quantized" for why in left.values())
               else "choose a scheme (or int4 group_size) these layers' sizes allow")
        raise SpecError(f"quantize_base({scheme!r}) left all {len(chosen)} linear layers dense: "
                        f"{dict(list(left.items())[:3])}; {fix}")
    cast(Any, model).lowrank_fx_quantized = {"scheme": scheme, "layers": done, "left_dense": left}
    return model
