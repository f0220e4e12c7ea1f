"""Dense weights for the ORIGINAL model: `merged_state_dict` and `load_merged`.

The merged state has exactly the original model's state_dict keys. A folded weight goes
to the keys of the module that calls it; another name tied to the same tensor (GPT-2's
transformer.wte.weight beside lm_head.weight) keeps the original values when the graph
reads it elsewhere. Loading such a state into a model that still ties the two would
overwrite one with the other, so `merged_state_dict` refuses unless `untie=True`.

A graph captured from a model shares that model's weight tensors (no copy, as PEFT does).
An in-place `model.load_state_dict(state)` therefore also changes the graph's base
weights. `load_merged(model, gm)` avoids this: it assigns fresh tensors
(`load_state_dict(..., assign=True)`), which also unties exactly the weights that differ.

Quantized layers: `merged_state_dict` gives every one of them dense (dequantized, plus ΔW in
fp32 where adapted) under `<module>.weight` / `<module>.bias`, leaving out a format's other
keys (bitsandbytes' `weight.absmax`, `SCB`, ...): the state of the dense model, exact.
`load_merged` into the original quantized model requantizes each adapted quantized layer in
its own format (torchao: same block sizes; bitsandbytes: a new Params4bit / Int8Params), leaves
the others as they are, and measures the output error on the capture's examples
(`model.lowrank_fx_requantize_report`, a RequantizeWarning above `tolerance`).
"""

from __future__ import annotations

import torch
from torch import fx, nn

from ..errors import MergeError
from ..graph.dtensors import whole
from ..graph.quant_formats import requantize as requantize_tensor
from ..graph.quant_formats import requantize_bitsandbytes
from ..graph.quantized import dequantized
from ..passes.fold import adapted_record, adapter_deltas, merged_bias, merged_weight, read_elsewhere
from ..passes.layers import flat_view
from ..passes.quantized_fold import measure, region_bias, regions_by_output
from ..passes.train_modules import with_trained
from ..progress import stage


def _gm_name(record, key: str, gm_names: set[str]) -> str | None:
    """The GraphModule's name for the original model's tensor `key`."""
    for name in record.aliases.get(key, [key]):
        if name in gm_names:
            return name
    return None


def _owns(key: str, target) -> bool:
    return key.rsplit(".", 1)[0] == target.name or key == target.weight


def _quantized_dense(gm: fx.GraphModule, targets, deltas, bias_deltas) -> dict[str, dict[str, torch.Tensor]]:
    """{quantized target: {"weight": dense W (+ ΔW), "bias": b (+ Δb) if it has one}}, every quantized layer."""
    regions = regions_by_output(gm)
    found = {}
    for name, t in targets.items():
        if not t.quantized:
            continue
        region = regions[t.sites[0]]
        weight = merged_weight(None, deltas[name], t, gm) if name in deltas else dequantized(gm, t)
        entry = {"weight": weight}
        path = region_bias(gm, region)
        bias = gm.get_parameter(path).detach() if path is not None else None
        if name in bias_deltas:
            bias = merged_bias(bias if bias is not None else dequantized(gm, t, with_bias=True)[1], bias_deltas[name])
        if bias is not None:
            entry["bias"] = bias
        found[name] = entry
    return found


def _quantized_key(key: str, quantized: dict) -> tuple[str, str] | None:
    """(quantized target, "weight" | "bias" | "") for a key under a quantized layer, else None."""
    for name in quantized:
        if key.startswith(name + "."):
            leaf = key[len(name) + 1:]
            return name, leaf if leaf in ("weight", "bias") else ""
    return None


def merged_plan(gm: fx.GraphModule) -> tuple[dict[str, torch.Tensor], list[tuple[str, str]]]:
    """(state by original key, [(folded key, tied key that keeps the original)])."""
    record = adapted_record(gm)
    targets, deltas, bias_deltas = adapter_deltas(gm)
    tensors = with_trained(gm, dict(gm.state_dict(keep_vars=True)))  # trained modules: the active copies
    state, conflicts, copies = {}, [], {}
    quantized = _quantized_dense(gm, targets, deltas, bias_deltas)
    folded = []  # (graph tensor name, target, merged value, whether the graph reads the tensor elsewhere)
    for name, delta in deltas.items():
        t = targets[name]
        if name not in quantized:
            folded.append((t.weight, t, merged_weight(tensors[t.weight], delta, t), read_elsewhere(gm, t)))
    for name, delta in bias_deltas.items():
        t = targets[name]
        if name not in quantized:
            folded.append((t.bias, t, merged_bias(tensors[t.bias], delta), False))
    for key in record.state_keys:
        under = _quantized_key(key, quantized)
        if under is not None:  # a quantized layer: dense weight and bias, its format's other keys left out
            name, leaf = under
            if leaf in quantized[name]:
                state[key] = quantized[name][leaf].detach().clone()
            continue
        name = _gm_name(record, key, set(tensors))
        if name is None:
            raise MergeError(f"the graph has no tensor for the original model's {key!r}; was it captured from another model?")
        value = tensors[name]  # the graph's own tensor: it outlives the loop, so its id is unique
        owners = [entry[1:] for entry in folded if tensors[entry[0]] is tensors[name]]
        owner = next((entry for entry in owners if _owns(key, entry[0])), owners[0] if owners else None)
        if owner is not None:
            target, merged, shared_use = owner
            if _owns(key, target) or not shared_use:
                value = merged
            else:
                owner_key = next(k for k in record.aliases.get(key, [key]) if _owns(k, target))
                conflicts.append((owner_key, key))
        if id(value) not in copies:  # tied names that keep one value stay one tensor
            copies[id(value)] = value.detach().clone()
        state[key] = copies[id(value)]
    return state, conflicts


@stage("building the merged state dict")
def merged_state_dict(gm: fx.GraphModule, untie: bool = False) -> dict[str, torch.Tensor]:
    """Dense weights keyed by the original model's names: `model.load_state_dict(state)`.
    A graph sharded by FSDP2 is gathered for it (every rank calls; each gets the whole state)."""
    with whole(gm) as sharded:
        state, conflicts = merged_plan(flat_view(gm))  # a graph with layer blocks: the same names
        if sharded:
            state = {key: value.clone() for key, value in state.items()}
    if conflicts and not untie:
        pairs = "; ".join(f"{a} is tied to {b}" for a, b in conflicts)
        raise MergeError(
            f"{pairs} in the original model, and only the first is adapted. Loading one state "
            "into the tied model would overwrite one with the other. Use lfx.load_merged(model, gm), "
            "which unties them first, or pass untie=True and untie the model yourself."
        )
    return state


@stage("loading merged weights into the model")
def load_merged(model: nn.Module, gm: fx.GraphModule, tolerance: float = 1e-2) -> nn.Module:
    """Load the folded weights of `gm` into the original `model` as new tensors, untying
    shared weights where only one use was adapted. `gm` keeps its own weights. All keys and
    shapes are checked before anything changes. Quantized layers of `model` that were adapted
    are requantized in their own format, the others left as they are; the output error this
    costs is measured on the capture's examples (`model.lowrank_fx_requantize_report`)."""
    gm = flat_view(gm)
    state, conflicts = merged_plan(gm)
    targets, deltas, bias_deltas = adapter_deltas(gm)
    quantized = {name: t for name, t in targets.items() if t.quantized}
    adapted = {name for name in quantized if name in deltas}
    current = model.state_dict()
    if quantized:  # their keys are handled below, not by load_state_dict
        state = {k: v for k, v in state.items() if _quantized_key(k, quantized) is None}
        current = {k: v for k, v in current.items() if _quantized_key(k, quantized) is None}
        modules = {}
        for name in adapted:
            try:
                modules[name] = model.get_submodule(name)
            except AttributeError:
                raise MergeError(f"the model has no module {name!r}, which the graph's quantized layer came from; "
                                 "nothing was loaded") from None
    missing = sorted(set(current) - set(state))
    unexpected = sorted(set(state) - set(current))
    wrong = [k for k in state if k in current and current[k].shape != state[k].shape]
    if missing or unexpected or wrong:
        raise MergeError(
            "the model does not match the graph's original model: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}, shape differs for {wrong[:5]}; "
            "nothing was loaded"
        )
    if quantized:
        dense = _quantized_dense(gm, targets, deltas, bias_deltas)
        new = {name: _requantized(modules[name], name, dense[name]) for name in adapted}  # all before any change
        model.load_state_dict(state, assign=True, strict=False)
        for name, (weight, bias) in new.items():
            modules[name].weight = weight
            if bias is not None:
                modules[name].bias = nn.Parameter(bias.to(modules[name].bias.dtype), requires_grad=False)
        if adapted:
            report = measure(gm, model, len(adapted), tolerance)
            model.lowrank_fx_requantize_report = report
    else:
        model.load_state_dict(state, assign=True)
    if conflicts and hasattr(getattr(model, "config", None), "tie_word_embeddings"):
        model.config.tie_word_embeddings = False  # so save_pretrained / from_pretrained keep them apart
    return model


def _requantized(module: nn.Module, name: str, values: dict[str, torch.Tensor]):
    """(new weight parameter in `module`'s own quantized format, new bias or None)."""
    old = module.weight
    dense = values["weight"]
    bias = values.get("bias")
    bias = bias if bias is not None and module.bias is not None and not torch.equal(bias, module.bias.detach()) else None
    if type(module).__module__.startswith("bitsandbytes"):
        return requantize_bitsandbytes(module, dense), bias
    try:
        return nn.Parameter(requantize_tensor(old, dense), requires_grad=False), bias
    except NotImplementedError as err:
        raise MergeError(f"{name}: {err}; nothing was loaded") from None
