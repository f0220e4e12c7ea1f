"""The PEFT methods lowrank_fx can read and write, one `PeftFormat` table entry each.

An entry says how a PEFT method's `adapter_config.json` and per-module tensors map onto one
of our methods: which tensor suffixes are which unit parameters, which config settings are
understood (any other setting must be absent or empty, else loading is refused naming it),
how to build our method for one module, and how to write our methods back as config fields.
Tensors PEFT keeps once per adapter (RandLoRA's random bases) are `Shared` entries: stored
as `base_model.<name>` and, as copies, beside every module's own tensors.
"""

from __future__ import annotations

import collections
import dataclasses
import re
from collections.abc import Callable

import torch

from ..errors import AdapterFileError
from ..methods.base import Method
from ..methods.lora import LoRA
from ..methods.randlora import RandLoRA
from ..methods.trainable_tokens import TrainableTokens
from .peft_groups import factor_groups, mixes_groups
from .peft_init import init_of, init_settings, readable


def _any(value) -> bool:
    return True


@dataclasses.dataclass(frozen=True)
class Shared:
    """A tensor of the whole adapter: our group's tensor `name` <-> PEFT's layout."""

    name: str
    to_ours: Callable[[torch.Tensor], torch.Tensor]
    to_peft: Callable[[torch.Tensor, Method], torch.Tensor]


@dataclasses.dataclass(frozen=True)
class PeftFormat:
    peft_type: str  # adapter_config.json "peft_type"
    kind: str  # our Method.kind
    tensors: dict[str, str]  # PEFT tensor suffix after the module path -> our unit's parameter name
    required: frozenset[str]  # our parameter names every module must have (the others are optional)
    settings: dict[str, Callable[[object], bool]]  # understood config keys -> is this value supported?
    method: Callable[[dict, str, dict[str, torch.Tensor]], Method]  # (config, module, its tensors) -> ours
    config: Callable[[dict[str, Method]], dict]  # our methods by target -> method-specific config fields
    # (out, in) of the base weight from a module's tensors; None when they do not tell
    shape: Callable[[dict[str, torch.Tensor]], tuple[int, int] | None]
    shared: dict[str, Shared] = dataclasses.field(default_factory=dict)  # PEFT name -> Shared
    extra_kinds: frozenset[str] = frozenset()  # our other methods this PEFT method also carries


# Settings of every PEFT method. Which modules are adapted is read from the tensor names, so
# the module-selection settings need no translation (and layers_to_transform just works).
COMMON = {
    "peft_type": _any, "peft_version": _any, "base_model_name_or_path": _any, "revision": _any,
    "task_type": _any, "inference_mode": _any, "auto_mapping": _any,
    "target_modules": _any, "exclude_modules": _any, "target_parameters": _any, "layers_to_transform": _any,
    "layers_pattern": _any,
    "fan_in_fan_out": _any,  # the graph knows each weight's layout (Conv1D or Linear)
    "modules_to_save": _any,  # trained modules, Spec.train (peft_saved.py)
    "bias": lambda value: value in ("none", "all", "lora_only"),  # trained biases (peft_bias.py)
}

# Why a setting is refused, for the error message (default: "not supported").
HINTS = {
    "bias": "lowrank_fx trains biases as PEFT's 'all' and 'lora_only' do; other values do not load",
    "init_lora_weights": "this initialisation modifies the base weights from a data pass (CorDA, LoRA-GA) "
                         "or is a LoRA variant (MiCA); convert the adapter to plain LoRA with PEFT "
                         "(save_pretrained(..., path_initial_model_for_weight_conversion=...)) first",
    "layer_replication": "replicated layers do not exist in the captured graph",
    "megatron_config": "Megatron parallel layers are not supported",
    "kasa_config": "KaSA is a research LoRA variant lowrank_fx does not implement",
    "velora_config": "VeLoRA is a research LoRA variant lowrank_fx does not implement",
    "monteclora_config": "MonteCLoRA is a research LoRA variant lowrank_fx does not implement",
    "use_bdlora": "BD-LoRA (block-diagonal factors) is a research LoRA variant lowrank_fx does not implement",
    "save_projection": "the random bases are not in the file, and PEFT's generator for them is not "
                       "lowrank_fx's; re-save the adapter with save_projection=True",
}


def _pattern_value(patterns: dict, name: str, default):
    """PEFT's rank_pattern / alpha_pattern rule: the value of the first key that, read as a
    regular expression, matches all of `name` or a part of it after a dot; else `default`."""
    for key, value in patterns.items():
        if re.fullmatch(rf"(?:.*\.)?(?:{key})", name):
            return value
    return default


def _tokens_method(config: dict, module: str, tensors: dict[str, torch.Tensor]) -> TrainableTokens:
    indices = config.get("trainable_token_indices")
    if isinstance(indices, dict):
        indices = next((v for k, v in indices.items() if module == k or module.endswith("." + k)), None)
    if not indices or len(indices) != tensors["rows"].shape[0]:
        raise AdapterFileError(f"{module}: {tuple(tensors['rows'].shape)} trainable token rows, but the config's "
                               f"trainable_token_indices give {indices!r} for it")
    return TrainableTokens(indices=[int(i) for i in indices])


def _lora_method(config: dict, module: str, tensors: dict[str, torch.Tensor]) -> Method:
    if "rows" in tensors:
        return _tokens_method(config, module, tensors)
    missing = [name for name in ("lora_A", "lora_B") if name not in tensors]
    if missing:
        raise AdapterFileError(f"{module} lacks {', '.join(missing)}")
    rank = _pattern_value(config.get("rank_pattern") or {}, module, config.get("r", 8))
    alpha = _pattern_value(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", 8))
    found = tensors["lora_A"].shape[0]
    if found != rank:
        raise AdapterFileError(
            f"{module}: lora_A {tuple(tensors['lora_A'].shape)} and lora_B {tuple(tensors['lora_B'].shape)} "
            f"do not have the rank {rank} that the config gives it (r / rank_pattern)"
        )
    dora, bias = "lora_magnitude" in tensors, "lora_B_bias" in tensors
    for setting, value, present in (("use_dora", dora, "a DoRA magnitude"), ("lora_bias", bias, "a lora_B bias")):
        if bool(config.get(setting, False)) != value:
            raise AdapterFileError(f"{module}: the config says {setting}={config.get(setting, False)!r} but the module "
                                   f"{'has' if value else 'lacks'} {present}; the directory is inconsistent")
    groups = factor_groups(tensors["lora_A"], tensors["lora_B"])
    return LoRA(rank=int(rank), alpha=float(alpha), dropout=float(config.get("lora_dropout", 0.0)),
                rslora=bool(config.get("use_rslora", False)), dora=dora, bias=bias, init=init_of(config),
                mixed_groups=mixes_groups(tensors["lora_A"], groups))  # PEFT's grouped-conv layout (peft_groups.py)


def _plain(number: float):
    return int(number) if float(number).is_integer() else number


def _lora_config(methods: dict[str, Method]) -> dict:
    tokens = {t: list(m.indices) for t, m in methods.items() if isinstance(m, TrainableTokens)}
    methods = {t: m for t, m in methods.items() if not isinstance(m, TrainableTokens)}
    config = _lora_settings(methods) if methods else {"r": 8, "lora_alpha": 8, "init_lora_weights": True}
    return {**config, "trainable_token_indices": tokens or None}


def _lora_settings(methods: dict[str, LoRA]) -> dict:
    for option in ("rslora", "dropout", "dora", "bias"):
        values = {getattr(m, option) for m in methods.values()}
        if len(values) > 1:
            raise AdapterFileError(
                f"PEFT's LoraConfig has one {option} per adapter, but this adapter mixes {sorted(values)}; "
                "save it with one value for every target"
            )
    rank = collections.Counter(m.rank for m in methods.values()).most_common(1)[0][0]
    alpha = collections.Counter(m.alpha for m in methods.values()).most_common(1)[0][0]
    first = next(iter(methods.values()))
    return {
        "r": rank,
        "lora_alpha": _plain(alpha),
        "lora_dropout": first.dropout,
        "use_rslora": first.rslora,
        "use_dora": first.dora,
        "lora_bias": first.bias,
        **init_settings(methods),
        "rank_pattern": {re.escape(t): m.rank for t, m in methods.items() if m.rank != rank},
        "alpha_pattern": {re.escape(t): _plain(m.alpha) for t, m in methods.items() if m.alpha != alpha},
    }


LORA = PeftFormat(
    peft_type="LORA",
    kind="lora",
    # Embeddings keep their own names (same shapes as ours); conv factors are conv kernels.
    tensors={"lora_A.weight": "lora_A", "lora_B.weight": "lora_B", "lora_embedding_A": "lora_A",
             "lora_embedding_B": "lora_B", "lora_B.bias": "lora_B_bias", "lora_magnitude_vector": "lora_magnitude",
             # trainable_token_indices: the new values of the rows (despite the name)
             "token_adapter.trainable_tokens_delta": "rows"},
    required=frozenset(),  # a module has LoRA factors or trainable token rows (checked by _lora_method)
    extra_kinds=frozenset({"trainable_tokens"}),
    settings={
        **COMMON,
        "r": _any, "lora_alpha": _any, "lora_dropout": _any, "use_rslora": _any, "use_dora": _any, "lora_bias": _any,
        "trainable_token_indices": _any,
        "rank_pattern": _any, "alpha_pattern": _any,
        # only the values loaded matter, not how they were initialised, unless the
        # initialisation also changed the base weights: PiSSA / OLoRA are redone on load (peft_init.py)
        "init_lora_weights": readable,
        # settings only read when a refused setting is on
        "eva_config": _any, "corda_config": _any, "lora_ga_config": _any, "loftq_config": _any,
        "megatron_core": _any, "qalora_group_size": _any, "ensure_weight_tying": _any,
    },
    method=_lora_method,
    config=_lora_config,
    # (out, in) for linear and embedding factors; a conv's kernels do not give the matrix view's in
    shape=lambda tensors: ((tensors["lora_B"].shape[0], tensors["lora_A"].shape[1])
                           if "lora_A" in tensors and "lora_B" in tensors and tensors["lora_A"].dim() == 2 else None),
)

def _randlora_method(config: dict, module: str, tensors: dict[str, torch.Tensor]) -> RandLoRA:
    rank = config.get("r", 32)
    if tensors["lam"].shape[0] != rank:
        raise AdapterFileError(
            f"{module}: randlora_lambda {tuple(tensors['lam'].shape)} does not have the rank r={rank} of the config"
        )
    # The bases come from the file; seed and sparse only say how PEFT first drew them.
    return RandLoRA(rank=int(rank), alpha=float(config.get("randlora_alpha", 640)),
                    dropout=float(config.get("randlora_dropout", 0.0)),
                    seed=int(config.get("projection_prng_key", 0)), sparse=bool(config.get("sparse", False)))


def _randlora_config(methods: dict[str, RandLoRA]) -> dict:
    distinct = {dataclasses.replace(m, init="default") for m in methods.values()}
    if len(distinct) > 1:
        raise AdapterFileError(
            "PEFT's RandLoraConfig has one rank, alpha, dropout and seed per adapter, but this adapter mixes "
            f"{sorted(map(repr, distinct))}; save it with one RandLoRA method for every target"
        )
    method = distinct.pop()
    return {
        "r": method.rank,
        "randlora_alpha": _plain(method.alpha),
        "randlora_dropout": method.dropout,
        "projection_prng_key": method.seed,
        "sparse": method.sparse,
        "very_sparse": False,
        "save_projection": True,
        "init_weights": True,
    }


RANDLORA = PeftFormat(
    peft_type="RANDLORA",
    kind="randlora",
    tensors={"randlora_lambda": "lam", "randlora_gamma": "gamma"},
    required=frozenset({"lam", "gamma"}),
    settings={
        **COMMON,
        "r": _any, "randlora_alpha": _any, "randlora_dropout": _any, "init_weights": _any,
        # the bases are read from the file, so how PEFT drew them does not matter
        "projection_prng_key": _any, "sparse": _any, "very_sparse": _any,
        "save_projection": lambda value: value is True,
    },
    method=_randlora_method,
    config=_randlora_config,
    shape=lambda tensors: None,  # λ (r, N) and γ (N, min(out, in)) do not tell out from in
    shared={
        # basis_A (r, d_max) = randlora_A (r, 1, d_max); basis_B (D_max, N_max·r) = randlora_B (D_max, N_max, r)
        "randlora_A": Shared("basis_A", lambda t: t.reshape(t.shape[0], -1),
                             lambda t, method: t.reshape(t.shape[0], 1, -1)),
        "randlora_B": Shared("basis_B", lambda t: t.reshape(t.shape[0], -1),
                             lambda t, method: t.reshape(t.shape[0], -1, method.rank)),
    },
)

FORMATS = {entry.peft_type: entry for entry in (LORA, RANDLORA)}


def unsupported(entry: PeftFormat, config: dict) -> list[str]:
    """Settings of `config` that `entry` cannot load faithfully, each with the reason."""
    found = []
    for key, value in config.items():
        check = entry.settings.get(key)
        ok = check(value) if check is not None else value in (None, False, "", [], {})
        if not ok:
            found.append(f"{key}={value!r} ({HINTS.get(key, 'not supported by lowrank_fx')})")
    return found
