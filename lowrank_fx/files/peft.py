"""PEFT interop: `load_peft` puts a PEFT adapter directory onto a graph, `save_peft` writes one.

A PEFT adapter directory holds `adapter_config.json` and `adapter_model.safetensors`, whose
tensors are named `base_model.model.<module path>.<suffix>`, for LoRA
`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight` (r, in) and `...lora_B.weight`
(out, r). Our target names are the original model's module paths, so `<module path>` is the
target name. GPT-2's Conv1D stores its weight (in, out), but PEFT keeps lora_A (r, in) and
lora_B (out, r) for it too, exactly like our units: no transposes either way. RandLoRA:
`<module path>.randlora_lambda` (r, N) and `.randlora_gamma` (N, d) are our λ and γ; the
random bases are stored once as `base_model.randlora_A` (r, 1, d_max) and
`base_model.randlora_B` (D_max, N_max, r) (and copied beside every module), which are our
group's basis_A (r, d_max) and basis_B (D_max, N_max·r) reshaped. peft_formats.py holds
these tables.

Loading: which modules are adapted, and their ranks, come from the tensors; the other
settings (alpha, rsLoRA, dropout, rank_pattern, alpha_pattern, ...) from the config (see
peft_formats.py for the settings and the ones refused). Random bases are taken from the
file, never regenerated (PEFT draws them with its own generator). The adapter's spec is the
config's own target_modules /
exclude_modules when they select exactly the adapted modules on this graph, else the
adapted modules by name. Then it is checked and loaded like an adapter file (files/into_graph.py):
all or nothing, with one error listing every difference. Values are cast to the adapter's
dtype (PEFT may store fp16 / bf16).

Saving: target_modules is the exact list of target names, ranks and alphas that differ
from the most common one go to rank_pattern / alpha_pattern, and `fan_in_fan_out` is true
when every target is stored (in, out) (Conv1D). Only adapters whose targets are modules
with a `.weight` in the original model can be saved (PEFT adapts modules, not bare weights).

Expert stacks (3-D MoE weights) are PEFT `target_parameters` too, named and laid out as
peft_experts.py says; loading them captures the graph first (their factors' shapes need it).

Trained modules (`Spec.train`) <-> PEFT's `modules_to_save`, stored as
`base_model.model.<module>.<parameter>` (peft_saved.py).
"""

from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch
from torch import fx, nn

from ..adapt.capture import capture
from ..adapt.hotswap import loaded_factor
from ..adapt.rewrite import resolve
from ..deprecation import LowRankFxDeprecationWarning, api_options
from ..errors import AdapterFileError, LowRankFxError
from ..graph.dtensors import whole, writes_files
from ..graph.experts import ExpertsKind
from ..graph.op_kinds import ConvKind, EmbeddingKind, LinearKind
from ..graph.record import CONTAINER, Record, require_graph
from ..graph.targets import Target, find_targets
from ..methods.base import Method, unit_key
from ..options import flag
from ..passes.layers import flat_view
from ..spec import ALL_LINEAR, Spec
from .atomic import write_atomic
from .into_graph import install, place
from .peft_base import check_base, split_base
from .peft_bias import bias_config_and_tensors, split_biases, unwrap_saved, with_biases
from .peft_experts import experts_units, one_expert, peft_factors, peft_path
from .peft_formats import FORMATS, PeftFormat, unsupported
from .peft_groups import mixes_groups, to_full, to_grouped
from .peft_init import plain_config, plain_factors
from .peft_saved import saved_config_and_tensors, saved_values, split_saved, with_train

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."  # + module path + "." + tensor suffix
SHARED_PREFIX = "base_model."  # + name of a tensor of the whole adapter (RandLoRA's bases)


def _read_config(directory: Path) -> dict:
    if not (directory / CONFIG).is_file():
        raise AdapterFileError(f"{directory} is not a PEFT adapter directory: it has no {CONFIG}")
    try:
        config = json.loads((directory / CONFIG).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AdapterFileError(f"{directory / CONFIG} is not valid JSON ({err})") from None
    if not isinstance(config, dict):
        raise AdapterFileError(f"{directory / CONFIG} must hold a JSON object")
    return config


def _format(config: dict, directory: Path) -> PeftFormat:
    peft_type = config.get("peft_type")
    if peft_type not in FORMATS:
        raise AdapterFileError(
            f"{directory} is a PEFT {peft_type} adapter; lowrank_fx reads only {', '.join(FORMATS)} "
            f"(peft_type={peft_type!r} is not supported)"
        )
    return FORMATS[peft_type]


def _read_tensors(directory: Path) -> dict[str, torch.Tensor]:
    path = directory / WEIGHTS
    if not path.is_file():
        pickled = [n for n in ("adapter_model.bin", "adapter_model.pt") if (directory / n).exists()]
        raise AdapterFileError(
            f"{directory} has no {WEIGHTS}"
            + (f"; {pickled[0]} is a pickle, which lowrank_fx never loads: re-save the adapter with "
               "PEFT's save_pretrained(..., safe_serialization=True)" if pickled else "")
        )
    try:
        with safetensors.safe_open(str(path), framework="pt") as file:
            return {key: file.get_tensor(key) for key in file.keys()}
    except safetensors.SafetensorError as err:
        raise AdapterFileError(f"{path} is not a complete safetensors file ({err}); it may be truncated") from None


def _split(entry: PeftFormat, tensors: dict[str, torch.Tensor]):
    """(tensors by module path and our parameter name, shared tensors by PEFT name, problems)."""
    units: dict[str, dict[str, torch.Tensor]] = {}
    shared: dict[str, torch.Tensor] = {}
    copies: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for key, value in tensors.items():
        if not key.startswith(PREFIX) and key.startswith(SHARED_PREFIX) and key[len(SHARED_PREFIX):] in entry.shared:
            shared[key[len(SHARED_PREFIX):]] = value
            continue
        path = key[len(PREFIX):] if key.startswith(PREFIX) else key
        suffix = max((s for s in entry.tensors if path.endswith("." + s)), key=len, default=None)
        if suffix is not None:
            units.setdefault(path[: -len(suffix) - 1], {})[entry.tensors[suffix]] = value
            continue
        copied = next((s for s in entry.shared if path.endswith("." + s)), None)
        if copied is not None:  # PEFT's copy of a shared tensor beside a module's own
            copies.setdefault(copied, value)
            continue
        unknown.append(key)
    shared = {**copies, **shared}
    problems = []
    if unknown:
        problems.append(
            f"tensors that are not {entry.peft_type} module weights lowrank_fx can load "
            f"(embedding adapters, DoRA magnitudes, saved modules?): {', '.join(unknown[:5])}"
            + (f" ... ({len(unknown)} in all)" if len(unknown) > 5 else "")
        )
    for module, found in units.items():
        if not entry.required <= set(found):
            problems.append(f"{module} lacks {', '.join(sorted(entry.required - set(found)))}")
    lacking = [SHARED_PREFIX + name for name in entry.shared if name not in shared]
    if lacking:
        problems.append(f"the adapter's shared tensors are missing: {', '.join(lacking)}")
    if not units and not unknown:
        problems.append("it holds no tensors")
    return units, shared, problems


def _target_for(module: str, targets: dict[str, Target]) -> str:
    """Our target name for a PEFT module path. PEFT adapts a MultiheadAttention `mha` as one
    module: its packed input projection is `mha` itself (ours: `mha.in_proj`) and its output
    projection sits under `mha.base_layer.out_proj` (ours: `mha.out_proj`)."""
    name = module.replace(".base_layer.", ".")
    if name not in targets and f"{name}.in_proj" in targets:
        return f"{name}.in_proj"
    return name


def _peft_module(target: str, methods: dict, record: Record) -> str:
    """PEFT's module path for our target (the inverse of `_target_for`)."""
    owner, _, leaf = target.rpartition(".")
    if leaf == "in_proj" and f"{target}_weight" in record.aliases:
        return owner
    if leaf == "out_proj" and f"{owner}.in_proj" in methods:
        return f"{owner}.base_layer.out_proj"
    return target


# Module types PEFT adapts by module; any other weight is one of PEFT's `target_parameters`.
PEFT_MODULES = {"Linear", "NonDynamicallyQuantizableLinear", "Conv1D", "Conv1d", "Conv2d", "Conv3d", "Embedding",
                "MultiheadAttention"}


def _is_bare_parameter(target: Target) -> bool:
    if target.quantized:  # a quantized Linear (or the bitsandbytes layer swapped in for capture): a module to PEFT
        return False
    return bool(target.module_type) and target.module_type.rsplit(".", 1)[-1] not in PEFT_MODULES


def _parameter_factors(tensors: dict[str, torch.Tensor], target: Target | None, bare: bool) -> dict[str, torch.Tensor]:
    """Factors of a PEFT `target_parameters` entry in our layout, and back (the map is its own inverse).

    PEFT reads a bare 2-D parameter P as (out, in) = P.shape whatever the op does with it, so
    for a weight the graph multiplies as x @ P (layout "in_out") its ΔP = s · B A is our
    ΔWᵀ: our A is its Bᵀ and our B its Aᵀ.
    """
    if not bare or target is None or target.layout != "in_out" or "lora_A" not in tensors:
        return tensors
    return {**tensors, "lora_A": tensors["lora_B"].t().contiguous(), "lora_B": tensors["lora_A"].t().contiguous()}


def _to_ours(name: str, value: torch.Tensor, target: Target | None) -> torch.Tensor:
    """A PEFT module tensor in our unit's layout: DoRA magnitudes flat (out,); on a grouped conv,
    a block-diagonal lora_A becomes our grouped kernel (r, in/g, k...), one that mixes groups
    stays as is (LoRA(mixed_groups=True), peft_groups.py)."""
    if target is None:
        return value
    if name == "lora_magnitude":
        return value.reshape(-1)
    kind = target.kind
    if (name == "lora_A" and isinstance(kind, ConvKind) and kind.groups > 1 and value.dim() == kind.dims + 2
            and not mixes_groups(value, kind.groups)):
        return to_grouped(value, kind.groups)
    return value


def _to_peft(name: str, value: torch.Tensor, target: Target, unit) -> torch.Tensor:
    """Our unit tensor in PEFT's layout (the inverse of `_to_ours`)."""
    kind = target.kind
    if name == "lora_magnitude" and isinstance(kind, ConvKind):
        return value.reshape(1, -1, *(1,) * kind.dims)
    if name == "lora_A" and isinstance(kind, ConvKind) and kind.groups > 1 and not getattr(unit, "mixed_groups", False):
        return to_full(value, kind.groups)
    return value


def _suffixes(entry: PeftFormat, unit, target: Target) -> dict[str, str]:
    """Our unit's parameter name -> PEFT's tensor suffix (embeddings have names of their own in PEFT)."""
    found = {}
    for suffix, name in entry.tensors.items():
        if getattr(unit, name, None) is None:
            continue
        if name not in found or (isinstance(target.kind, EmbeddingKind) and "embedding" in suffix):
            found[name] = suffix
    return found


def _literal(name: str) -> str:
    """A pattern for one module name, matching it (and names ending in '.' + it) like PEFT's lists."""
    if any(c in name for c in "*?["):
        return "re:(?:^|\\.)" + re.escape(name) + "$"
    return name


def _peft_patterns(value) -> list[str]:
    if isinstance(value, str):
        return [ALL_LINEAR] if value == ALL_LINEAR else [f"re:^(?:{value})$"]
    return [_literal(name) for name in value]


def _spec(gm: fx.GraphModule, config: dict, methods: dict[str, Method]) -> Spec:
    """The config's target_modules / exclude_modules if they select exactly `methods` here, else names."""
    distinct = set(methods.values())
    if len(distinct) > 1:
        return Spec(targets={_literal(name): method for name, method in methods.items()})
    method = distinct.pop()
    if config.get("target_modules") and config.get("layers_to_transform") is None:
        try:
            spec = Spec(targets=_peft_patterns(config["target_modules"]), method=method,
                        exclude=_peft_patterns(config.get("exclude_modules") or []))
            if set(resolve(gm, spec)[1]) == set(methods):
                return spec
        except LowRankFxError:
            pass
    return Spec(targets=[_literal(name) for name in methods], method=method)


@api_options(positional=2)
def load_peft(model: nn.Module | fx.GraphModule, directory: str | os.PathLike, *, adapter: str = "default",
              example_inputs: tuple[Any, ...] | None = None,
              example_kwargs: dict[str, Any] | None = None) -> fx.GraphModule:
    """Load the PEFT adapter in `directory` into `model` as adapter `adapter`; returns the graph.

    In place: a lowrank_fx GraphModule is changed and returned as it is. If it already has
    `adapter`, its targets and settings must match the PEFT adapter and its values are
    overwritten; otherwise the adapter is added. Any other model is captured first with
    `example_inputs` / `example_kwargs` (as for `rewrite`) and the new graph is returned; the
    model itself is not changed. `modules_to_save` become the adapter's trained modules
    (`Spec.train`, peft_saved.py), and bias="all" / "lora_only" trained biases
    (peft_bias.py); stored base embedding tables must be the model's (peft_base.py).
    Unsupported PEFT settings (other bias values, base-modifying initialisations, other PEFT
    methods) are refused, and nothing changes.

    Args:
        model: a GraphModule (rewritten or not), or a model to capture.
        directory: a PEFT adapter directory (`adapter_config.json`, `adapter_model.safetensors`).
        adapter: the name the adapter gets in the graph (default "default").
        example_inputs: positional example inputs for capturing a model that is not yet a graph.
        example_kwargs: keyword example inputs for the capture (decoders: {"use_cache": False}).

    Returns:
        The graph holding the adapter: `model` itself when it is a lowrank_fx GraphModule.

    Raises:
        AdapterFileError: the directory is not a PEFT adapter lowrank_fx can load (missing or
            pickled files, unsupported settings), or the adapter does not fit the graph (every
            difference listed; nothing changed).
        CaptureError: `model` cannot be captured with the example inputs.
        ModelTypeError: `model` is not an nn.Module.
    """
    directory = Path(directory)
    config = _read_config(directory)
    entry = _format(config, directory)
    refused = unsupported(entry, config)
    if refused:
        raise AdapterFileError(
            f"the PEFT adapter in {directory} uses settings lowrank_fx cannot load faithfully; "
            "nothing was loaded:\n" + "\n".join(f"  - {line}" for line in refused)
        )
    saved, tensors = split_saved(config, _read_tensors(directory), PREFIX)  # modules_to_save: trained copies
    biases, tensors = split_biases(config, tensors, PREFIX, entry.tensors)  # bias="all" / "lora_only"
    base, tensors = split_base(tensors, PREFIX, entry.tensors)  # embedding tables: must be the model's
    saved, wrapped = unwrap_saved(saved)  # bias="all" inside PEFT's modules_to_save wrapper
    base.update(wrapped)
    units, shared, problems = _split(entry, tensors)
    structured, stacks = None, set()
    if config.get("target_parameters") and not problems:  # expert stacks: their shapes need the graph
        structured = capture(model, example_inputs, example_kwargs)
        gm = flat_view(structured)
        try:
            aliases = Record.require(gm, "lfx.load_peft").aliases
            units, stacks = experts_units(gm, find_targets(gm, aliases), units, config)
        except AdapterFileError as err:
            problems.append(str(err))
    methods = {}
    for module, tensors in units.items():
        try:
            methods[module] = entry.method(config, module, one_expert(tensors) if module in stacks else tensors)
        except LowRankFxError as err:
            problems.append(str(err))
    if problems:
        listed = "\n".join(f"  - {p}" for p in problems)
        raise AdapterFileError(f"cannot load the PEFT adapter in {directory}:\n{listed}")
    structured = structured if structured is not None else capture(model, example_inputs, example_kwargs)
    gm = flat_view(structured)  # a graph with layer blocks is read flat; adapters are added to it
    check_base(gm, base, f"the PEFT adapter in {directory}")
    targets = find_targets(gm, Record.require(gm, "lfx.load_peft").aliases)
    ours = {module: _target_for(module, targets) for module in units}
    bare = {name.removesuffix(".weight") for name in config.get("target_parameters") or []}
    try:
        units = {ours[m]: _parameter_factors(
                     {name: _to_ours(name, value, targets.get(ours[m])) for name, value in found.items()},
                     targets.get(ours[m]), m in bare and m not in stacks)
                 for m, found in units.items()}
    except AdapterFileError as err:
        raise AdapterFileError(f"cannot load the PEFT adapter in {directory}:\n  - {err}") from None
    methods = {ours[m]: method for m, method in methods.items()}
    spec = with_biases(with_train(gm, _spec(gm, config, methods), config), biases)
    shapes = {m: entry.shape(one_expert(t) if m in stacks else t) for m, t in units.items()}
    placement = place(gm, adapter, spec, shapes)
    values: dict[str, torch.Tensor] = {}
    if placement.module is not None:
        values, saved_problems = saved_values(gm, placement, {**saved, **biases})
        placement.problems += saved_problems
        values.update({placement.unit_key(m, name): v for m, tensors in units.items() for name, v in tensors.items()})
        for peft_name, value in shared.items():
            values[placement.shared_key(entry.shared[peft_name].name)] = entry.shared[peft_name].to_ours(value)
    install(structured, [(placement, values)], source=f"the PEFT adapter in {directory}", cast=True)
    return structured


def _only_adapter(record: Record, adapter: str | None) -> str:
    """The adapter save_peft writes. Until the next release, the default "default" (or None) on a
    graph without a "default" adapter but with exactly one adapter picks that one, with a warning."""
    names = list(record.adapters)
    if adapter is None or (adapter == "default" and adapter not in names and len(names) == 1):
        if len(names) != 1:
            raise AdapterFileError(f"a PEFT directory holds one adapter; this graph has {names}: pass adapter=<name>")
        warnings.warn(f"lowrank_fx.save_peft: adapter= now defaults to 'default'; this graph's only adapter is "
                      f"{names[0]!r}: pass adapter={names[0]!r} (picking the only adapter stops working in the next "
                      "release)", LowRankFxDeprecationWarning, stacklevel=5)  # past _peft_files, save_peft, api_options
        return names[0]
    if adapter not in names:
        raise AdapterFileError(f"this graph has no adapter {adapter!r}; a PEFT directory holds one adapter: "
                               f"pass adapter=<name>, one of {', '.join(names)}")
    return adapter


@api_options(positional=2)
def save_peft(gm: fx.GraphModule, directory: str | os.PathLike, *, adapter: str = "default",
              base_model_name_or_path: str | None = None, task_type: str | None = None,
              as_plain_lora: bool = False) -> Path:
    """Write adapter `adapter` of `gm` as a PEFT adapter directory.

    `peft.PeftModel.from_pretrained(original_model, directory)` then loads it and computes
    what the graph computes. Each file is written atomically, and the directory is created
    if missing. A graph sharded by FSDP2 is gathered: every rank calls this, rank 0 writes.

    Args:
        gm: a graph from `lfx.rewrite` with adapters.
        directory: the folder to write `adapter_config.json` and `adapter_model.safetensors` into.
        adapter: the adapter to write (default "default"). Until the next release, a graph
            without a "default" adapter but with exactly one adapter writes that one, with a
            LowRankFxDeprecationWarning.
        base_model_name_or_path: written to the config, for PEFT's Auto classes.
        task_type: written to the config (e.g. "CAUSAL_LM"), for PEFT's Auto classes.
        as_plain_lora: write a PiSSA / OLoRA adapter as the plain rank-2r LoRA of its update
            relative to the ORIGINAL weights (PEFT's `path_initial_model_for_weight_conversion`,
            files/peft_init.py), for the unchanged base model.

    Returns:
        The directory written (on FSDP2 ranks other than 0, the one rank 0 writes).

    Raises:
        AdapterFileError: the graph has no adapter `adapter`, or it cannot be a PEFT adapter
            (several methods, targets that are not modules, only trained modules).
        FileWriteError: a file cannot be written.
        SpecError: `as_plain_lora` is not a bool.
        ModelTypeError: `gm` is not a lowrank_fx graph.
    """
    require_graph(gm, "lfx.save_peft")
    flag("lfx.save_peft", "as_plain_lora", as_plain_lora)
    with whole(getattr(gm, CONTAINER, nn.Module())) as sharded:  # FSDP2: the adapters only, not the base
        config, tensors = _peft_files(flat_view(gm), adapter, base_model_name_or_path, task_type,  # blocks: flat names
                                      as_plain_lora)
    directory = Path(directory)
    if not writes_files(sharded):
        return directory
    write_atomic(directory / WEIGHTS, safetensors.torch.save(tensors, metadata={"format": "pt"}))
    write_atomic(directory / CONFIG, (json.dumps(config, indent=2, sort_keys=True) + "\n").encode())
    return directory


def _peft_files(gm: fx.GraphModule, adapter: str | None, base_model_name_or_path, task_type,
                as_plain_lora: bool = False) -> tuple[dict, dict]:
    """(adapter_config.json's content, adapter_model.safetensors' tensors) of `adapter`."""
    record = Record.find(gm)
    if record is None or not record.adapters:
        raise AdapterFileError("this graph has no adapters to save; add one with lfx.rewrite(model, spec, ...) first")
    name = _only_adapter(record, adapter)
    _, methods = resolve(gm, record.adapters[name].spec)
    if not methods:
        raise AdapterFileError(f"adapter {name!r} only trains whole modules (Spec.train) and adapts no target; "
                               "a PEFT config needs target_modules, so it cannot be saved as a PEFT adapter")
    kinds = {m.kind for m in methods.values()}
    entry = next((e for e in FORMATS.values() if kinds <= {e.kind, *e.extra_kinds}), None)
    if entry is None:
        raise AdapterFileError(
            f"adapter {name!r} uses {', '.join(sorted(kinds))}; PEFT export supports adapters of one method among "
            f"{', '.join(e.kind for e in FORMATS.values())}"
        )
    targets = find_targets(gm, record.aliases)
    stacks = [t for t in methods if isinstance(targets[t].kind, ExpertsKind)]  # peft_experts.py
    bare = {t for t in methods if _is_bare_parameter(targets[t]) and t not in stacks}
    linears = [t for t in methods if isinstance(targets[t].kind, LinearKind) and t not in bare]
    not_modules = [t for t in methods if f"{t}.weight" not in record.aliases and _peft_module(t, methods, record) == t
                   and t not in stacks]
    if not_modules:
        raise AdapterFileError(
            f"PEFT adapts modules by their .weight, and these targets are not modules with a weight in the "
            f"original model: {', '.join(not_modules[:5])}; leave them out of the spec to export"
        )
    config = {
        "peft_type": entry.peft_type,
        "base_model_name_or_path": base_model_name_or_path,
        "task_type": task_type,
        "inference_mode": True,
        # an adapted MHA is one PEFT module, whose out_proj PEFT adapts with it
        "target_modules": sorted({m for t, method in methods.items()
                                  if t not in bare and t not in stacks and method.kind == entry.kind
                                  and ".base_layer." not in (m := _peft_module(t, methods, record))}),
        "target_parameters": sorted([f"{t}.weight" for t in bare] + stacks) or None,
        "fan_in_fan_out": bool(linears) and all(targets[t].layout == "in_out" for t in linears),
        **entry.config(methods),
    }
    if as_plain_lora:
        config = plain_config(config)
    modules_to_save, tensors = saved_config_and_tensors(gm, name, PREFIX)  # Spec.train
    if modules_to_save:
        config["modules_to_save"] = modules_to_save
    config["bias"], biases = bias_config_and_tensors(gm, name, {t: _peft_module(t, methods, record) for t in methods},
                                                     PREFIX)  # Spec.train's single biases
    tensors.update(biases)
    groups = getattr(gm, CONTAINER)[name]
    for target, method in methods.items():
        group = groups[record.adapters[name].groups[target]]
        unit, module = group.units[unit_key(target)], _peft_module(target, methods, record)
        ours = {param: _to_peft(param, loaded_factor(unit, param), targets[target], unit)  # a hot-swap slot: trimmed
                for param in _suffixes(entry, unit, targets[target])}
        ours = _parameter_factors(ours, targets[target], target in bare)
        if target in stacks:
            module, ours = peft_path(target, targets, record, {"target_parameters": stacks}), peft_factors(unit)
        elif as_plain_lora:
            ours = plain_factors(unit, target, ours)
        for param, suffix in _suffixes(entry, unit, targets[target]).items():
            tensors[f"{PREFIX}{module}.{suffix}"] = ours[param]
        for peft_name, shared in entry.shared.items():
            value = shared.to_peft(getattr(group, shared.name), method)
            tensors[f"{SHARED_PREFIX}{peft_name}"] = tensors[f"{PREFIX}{module}.{peft_name}"] = value
    return config, {key: value.detach().cpu().contiguous().clone() for key, value in tensors.items()}
