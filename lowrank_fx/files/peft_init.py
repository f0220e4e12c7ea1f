"""PEFT's `init_lora_weights` for LoRA adapters: the value written, the init read back, and
PEFT's conversion of a base-changing adapter (PiSSA, OLoRA, CorDA) to a plain LoRA.

PEFT re-runs a base-changing init on the model it loads an adapter into (the ORIGINAL model:
W → W − s · B₀ A₀) before copying the saved A, B in; `load_peft` does the same (the graph's own
copy of the base gets the residual, methods/lora_init.py), so a directory saved with
init_lora_weights="pissa" means the same model to both. A CorDA directory needs its data pass
again (PEFT's preprocess_corda): it is written, but loading it is refused; its plain-LoRA
conversion loads anywhere.

The conversion (PEFT's `path_initial_model_for_weight_conversion`) writes the trained update
relative to the original W as a plain LoRA of rank 2r:

    W_res + s · B A − W = s · (B A − B₀ A₀) = s · [B | −B₀] [A ; A₀]

so A' = cat(A, A₀) (2r, in), B' = cat(B, −B₀) (out, 2r), and alpha doubles (√2 · alpha with
rsLoRA) to keep s.
"""

from __future__ import annotations

import dataclasses

import torch

from ..errors import AdapterFileError, SpecError
from ..methods.lora_init import DATA, changes_base, check_name, loftq_settings

_DEFAULTS = ("default", "nonzero")


def init_settings(methods: dict) -> dict:
    """adapter_config.json's init_lora_weights (and loftq_config) for LoRA methods by target:
    True for the default init, else the init's PEFT name (one per adapter, as PEFT has one)."""
    # LoftQ over a bitsandbytes base (loftq_weights) leaves the base alone: a plain LoRA for PEFT
    inits = {"default" if getattr(m, "loftq_weights", None) is not None else getattr(m, "init", "default")
             for m in methods.values()}
    inits = {True if init in _DEFAULTS else init for init in inits}
    if len(inits) > 1:
        raise AdapterFileError(f"PEFT's LoraConfig has one init_lora_weights per adapter, but this adapter mixes "
                               f"{sorted(map(str, inits))}; save it with one init for every target")
    init = inits.pop()
    if init == "eva":  # values only: the data pass is not redone on load
        settings = next(iter(methods.values())).eva_config
        return {"init_lora_weights": "eva", "eva_config": {field.name: getattr(settings, field.name)
                                                           for field in dataclasses.fields(settings)}}
    if init in DATA:
        return {"init_lora_weights": "corda", "corda_config": {"corda_method": "kpm" if init == "corda_kpm" else "ipm"}}
    settings = loftq_settings(init) if isinstance(init, str) else None
    if settings is None:
        return {"init_lora_weights": init}
    return {"init_lora_weights": "loftq", "loftq_config": {"loftq_bits": settings[0], "loftq_iter": settings[1]}}


def readable(value) -> bool:
    """Whether lowrank_fx loads a directory with this init_lora_weights faithfully: the inits
    that leave the base alone (the values loaded are all there is), and PiSSA / OLoRA / LoftQ
    (redone on the graph's own base); not CorDA (it needs the data pass again)."""
    if value in (True, False, "eva"):
        return True
    if not isinstance(value, str) or value.startswith("corda"):  # CorDA needs its data pass again
        return False
    try:
        check_name("LoRA", value)
    except SpecError:
        return False
    return True


def init_of(config: dict) -> str:
    """Our LoRA init for a PEFT config: the base-changing ones are redone on load, the others
    (whose drawn values the file replaces) are kept by name for saving back."""
    value = config.get("init_lora_weights", True)
    if value in (True, False, "eva"):
        return "default"
    if value == "loftq":
        loftq = config.get("loftq_config") or {}
        bits, iters = loftq.get("loftq_bits", 4), loftq.get("loftq_iter", 1)
        if bits not in (4, 8) or not isinstance(iters, int) or iters < 1:
            raise AdapterFileError(f"loftq_config={loftq!r}: lowrank_fx's LoftQ (as PEFT's) takes loftq_bits 4 or 8 "
                                   "and loftq_iter >= 1")
        return "loftq" + ("_8bit" if bits == 8 else "") + (f"_iter_{iters}" if iters > 1 else "")
    return value


def plain_config(config: dict) -> dict:
    """The config of the converted plain LoRA: rank 2r, alpha scaled to keep s, default init."""
    if config.get("use_dora"):
        raise AdapterFileError("as_plain_lora: a DoRA adapter has a magnitude per row that the rank-2r LoRA "
                               "cannot carry (PEFT drops it); save it without as_plain_lora")
    factor = 2 ** 0.5 if config.get("use_rslora") else 2
    if config.get("use_rslora") and (config.get("rank_pattern") or config.get("alpha_pattern")):
        raise AdapterFileError("as_plain_lora with rsLoRA and per-target ranks or alphas cannot keep every "
                               "scale (PEFT refuses it too); save it without as_plain_lora")
    return {**config, "init_lora_weights": True, "r": 2 * config["r"], "lora_alpha": config["lora_alpha"] * factor,
            "rank_pattern": {k: 2 * v for k, v in (config.get("rank_pattern") or {}).items()},
            "alpha_pattern": {k: 2 * v for k, v in (config.get("alpha_pattern") or {}).items()}}


def plain_factors(unit, target: str, factors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A' = cat(A, A₀), B' = cat(B, −B₀) for a unit of a PiSSA / OLoRA / CorDA init (PEFT's layout is
    ours on linear layers); a trainable-token unit stays as it is."""
    if "lora_A" not in factors:
        return factors
    init = getattr(unit, "init", "default")
    if loftq_settings(init):
        raise AdapterFileError(f"as_plain_lora: {target} has init={init!r}, whose quantized base Q is not W − s·B₀A₀, "
                               "so no plain LoRA on W gives the same model (PEFT converts PiSSA, OLoRA and CorDA "
                               "only); save it as it is, with its base")
    if not changes_base(init):
        raise AdapterFileError(f"as_plain_lora converts PiSSA / OLoRA adapters; {target} has init={init!r}, whose "
                               "base is the original one: save it as it is")
    initial = getattr(unit, "initial_factors", None)
    if initial is None:
        raise AdapterFileError(f"as_plain_lora: {target}'s initial factors are not known (the adapter's values were "
                               "loaded into a graph that already had it); convert it where it was initialised")
    a0, b0 = (t.to(device=factors["lora_A"].device, dtype=factors["lora_A"].dtype) for t in initial)
    return {**factors, "lora_A": torch.cat([factors["lora_A"], a0], 0),
            "lora_B": torch.cat([factors["lora_B"], -b0], 1)}
