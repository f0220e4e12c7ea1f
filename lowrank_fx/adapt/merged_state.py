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
"""

from __future__ import annotations

import torch
from torch import fx, nn

from ..errors import MergeError
from ..passes.fold import adapted_record, adapter_deltas, merged_bias, merged_weight, read_elsewhere
from ..passes.train_modules import with_trained


def _gm_name(record, key: str, gm_names: set[str]) -> str | None:
    """The GraphModule's name for the original model's tensor `key`."""
    for name in record.aliases.get(key, [key]):
        if name in gm_names:
            return name
    return None


def _owns(key: str, target) -> bool:
    return key.rsplit(".", 1)[0] == target.name or key == target.weight


def merged_plan(gm: fx.GraphModule) -> tuple[dict[str, torch.Tensor], list[tuple[str, str]]]:
    """(state by original key, [(folded key, tied key that keeps the original)])."""
    record = adapted_record(gm)
    targets, deltas, bias_deltas = adapter_deltas(gm)
    tensors = with_trained(gm, dict(gm.state_dict(keep_vars=True)))  # trained modules: the active copies
    state, conflicts, copies = {}, [], {}
    folded = []  # (graph tensor name, target, merged value, whether the graph reads the tensor elsewhere)
    for name, delta in deltas.items():
        t = targets[name]
        folded.append((t.weight, t, merged_weight(tensors[t.weight], delta, t), read_elsewhere(gm, t)))
    for name, delta in bias_deltas.items():
        t = targets[name]
        folded.append((t.bias, t, merged_bias(tensors[t.bias], delta), False))
    for key in record.state_keys:
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


def merged_state_dict(gm: fx.GraphModule, untie: bool = False) -> dict[str, torch.Tensor]:
    """Dense weights keyed by the original model's names: `model.load_state_dict(state)`."""
    state, conflicts = merged_plan(gm)
    if conflicts and not untie:
        pairs = "; ".join(f"{a} is tied to {b}" for a, b in conflicts)
        raise MergeError(
            f"{pairs} in the original model, and only the first is adapted. Loading one state "
            "into the tied model would overwrite one with the other. Use lfx.load_merged(model, gm), "
            "which unties them first, or pass untie=True and untie the model yourself."
        )
    return state


def load_merged(model: nn.Module, gm: fx.GraphModule) -> nn.Module:
    """Load the folded weights of `gm` into the original `model` as new tensors, untying
    shared weights where only one use was adapted. `gm` keeps its own weights. All keys and
    shapes are checked before anything changes."""
    state, conflicts = merged_plan(gm)
    current = model.state_dict()
    missing = sorted(set(current) - set(state))
    unexpected = sorted(set(state) - set(current))
    wrong = [k for k in state if k in current and current[k].shape != state[k].shape]
    if missing or unexpected or wrong:
        raise MergeError(
            "the model does not match the graph's original model: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}, shape differs for {wrong[:5]}; "
            "nothing was loaded"
        )
    model.load_state_dict(state, assign=True)
    if conflicts and hasattr(getattr(model, "config", None), "tie_word_embeddings"):
        model.config.tie_word_embeddings = False  # so save_pretrained / from_pretrained keep them apart
    return model
