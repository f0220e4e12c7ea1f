"""Dense weights for the ORIGINAL model: `merged_state_dict` and `load_merged`.

The merged state has exactly the original model's state_dict keys (adapt/merged_plan.py says
which value each key gets). A folded weight goes to the keys of the module that calls it;
another name tied to the same tensor (GPT-2's transformer.wte.weight beside lm_head.weight)
keeps the original values when the graph reads it elsewhere. Loading such a state into a model
that still ties the two would overwrite one with the other, so `merged_state_dict` refuses
unless `untie=True`.

Both stream: one target's ΔW is built, added into a new tensor and dropped before the next,
so beyond the new folded tensors themselves they need one ΔW and one sum at a time (no copy of
the weights that were not adapted, no ΔW kept for every target).

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

from ..deprecation import api_options
from ..errors import MergeError, ModelTypeError
from ..graph.dtensors import whole
from ..graph.quant_formats import requantize as requantize_tensor
from ..graph.quant_formats import requantize_bitsandbytes
from ..graph.record import require_graph
from ..options import flag, number
from ..passes.layers import flat_view
from ..passes.quantized_fold import measure
from ..progress import stage
from .merged_plan import folded_values, merged_plan, quantized_key
from .model_slots import Slots, same_tensor


@api_options(positional=1)
@stage("building the merged state dict")
def merged_state_dict(gm: fx.GraphModule, *, untie: bool = False) -> dict[str, torch.Tensor]:
    """Dense weights keyed by the original model's names: `model.load_state_dict(state)`.

    A copy where it matters, `gm` unchanged: folded weights and biases (W + Σ gate · ΔW, in W's
    dtype) are new tensors, and nothing the graph runs on aliases them. Every other value is
    the graph's own tensor, detached and NOT copied, as `nn.Module.state_dict()` gives it:
    those are the original model's own weights (the graph shares them), so
    `model.load_state_dict(state)` copies them onto themselves, and writing into one of them in
    place changes the graph and the model. Clone what you mean to modify. A trained module
    (Spec.train) gives its active adapter's copy, likewise not copied. Peak memory beyond the
    folded tensors: one ΔW and one sum at a time. A graph sharded by FSDP2 is gathered for it
    (every rank calls; each gets the whole state, whose tensors are then all new).

    Args:
        gm: a graph from `lfx.rewrite`.
        untie: allow a weight tied to a name that keeps its original values (see the module
            notes); untie the model yourself before loading.

    Returns:
        The state dict {original name: tensor}, in the original model's key order.

    Raises:
        ModelTypeError: `gm` is not a GraphModule.
        MergeError: (before any ΔW is built) a weight tied to a name that keeps its original
            values, without `untie=True`; or an update with NaN or inf values. The graph is
            unchanged either way.
        SpecError: `untie` is not a bool.
    """
    require_graph(gm, "lfx.merged_state_dict")
    flag("lfx.merged_state_dict", "untie", untie)
    with whole(gm):
        gm = flat_view(gm)  # a graph with layer blocks: the same names
        plan = merged_plan(gm)
        if plan.conflicts and not untie:
            pairs = "; ".join(f"{a} is tied to {b}" for a, b in plan.conflicts)
            raise MergeError(
                f"{pairs} in the original model, and only the first is adapted. Loading one state "
                "into the tied model would overwrite one with the other. Use lfx.load_merged(model, gm), "
                "which unties them first, or pass untie=True and untie the model yourself."
            )
        values = dict(plan.kept)
        for name, folded in folded_values(gm, plan):
            values.update(plan.keyed(name, folded))
    return {key: values[key] for key in plan.keys if key in values}


@api_options(positional=2)
@stage("loading merged weights into the model")
def load_merged(model: nn.Module, gm: fx.GraphModule, *, tolerance: float = 1e-2) -> nn.Module:
    """Load the folded weights of `gm` into the original `model`, IN PLACE, one target at a time,
    as new tensors; `gm` keeps its own weights.

    `model` is changed (as `load_state_dict` changes it) and returned: a folded weight gets a
    new tensor (W + Σ gate · ΔW), assigned in the model's slot as
    `load_state_dict(..., assign=True)` does. A weight that was not folded is left as it is when
    the model already holds the graph's tensor (the usual case: the graph was captured from this
    model), and gets a copy otherwise (a trained module's active copy, or another model). A weight
    tied to a use that was not adapted is untied (and `config.tie_word_embeddings` set to False).
    Extra memory: the new folded tensors (the graph still holds the old ones) and one ΔW.
    To fold into the model's own tensors instead, use `lfx.merge(gm, inplace=True)`.

    All or nothing: every key and shape is checked before anything changes, and if anything
    fails later (a NaN or inf update, a layer that cannot be requantized) every slot already
    assigned gets its old tensor back before the MergeError. Quantized layers of `model` that were
    adapted are requantized in their own format, the others left as they are; the output error
    this costs is measured on the capture's examples (`model.lowrank_fx_requantize_report`).

    Args:
        model: the original model the graph was captured from (or one of the same structure).
        gm: a graph from `lfx.rewrite`.
        tolerance: the largest requantization error (of adapted quantized layers) accepted
            without a RequantizeWarning (>= 0).

    Returns:
        `model` itself, now holding the folded weights.

    Raises:
        ModelTypeError: `model` is not an `nn.Module`, or `gm` not a GraphModule.
        MergeError: the model's keys or shapes do not match the graph's original model, an
            update has NaN or inf values, or a layer cannot be requantized; nothing is loaded.
        SpecError: `tolerance` is not a number >= 0.
    """
    if not isinstance(model, nn.Module):
        raise ModelTypeError(f"lfx.load_merged loads into the original model (a torch.nn.Module), got a "
                             f"{type(model).__name__}; call lfx.load_merged(model, gm)")
    require_graph(gm, "lfx.load_merged")
    number("lfx.load_merged", "tolerance", tolerance, "a number >= 0 (0: warn on any error)", lambda v: v >= 0,
           "the largest requantization error accepted without a warning")
    gm = flat_view(gm)
    plan = merged_plan(gm)
    quantized = plan.quantized
    adapted = [name for name in quantized if name in plan.updates]
    slots = Slots(model)
    current = {k: v for k, v in model.state_dict(keep_vars=True).items() if quantized_key(k, quantized) is None}
    _check_keys(current, plan.shapes, slots)
    modules = {}
    for name in adapted:
        try:
            modules[name] = model.get_submodule(name)
        except AttributeError:
            raise MergeError(f"the model has no module {name!r}, which the graph's quantized layer came from; "
                             "nothing was loaded") from None
    dense = [name for name in plan.folded if name not in quantized]
    copies = {}
    try:
        for key, value in plan.kept.items():
            if not same_tensor(current[key], value):
                if id(value) not in copies:  # tied keys of one value get one copy
                    copies[id(value)] = value.clone()
                slots.assign(key, copies[id(value)])
        for name, values in folded_values(gm, plan, names={*dense, *adapted}):
            if name in quantized:
                _load_requantized(slots, modules[name], name, values)
            else:
                for key, value in plan.keyed(name, values).items():
                    slots.assign(key, value)
    except BaseException:
        slots.undo()
        raise
    if adapted:
        model.lowrank_fx_requantize_report = measure(gm, model, len(adapted), tolerance)
    if plan.conflicts and hasattr(getattr(model, "config", None), "tie_word_embeddings"):
        model.config.tie_word_embeddings = False  # so save_pretrained / from_pretrained keep them apart
    return model


def _check_keys(current: dict[str, torch.Tensor], shapes: dict[str, torch.Size], slots: Slots) -> None:
    missing = sorted(set(current) - set(shapes))
    unexpected = sorted(set(shapes) - set(current))
    wrong = [k for k in shapes if k in current and current[k].shape != shapes[k]]
    if missing or unexpected or wrong:
        raise MergeError(
            "the model does not match the graph's original model: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}, shape differs for {wrong[:5]}; "
            "nothing was loaded"
        )
    no_slot = [k for k in shapes if slots.find(k) is None]
    if no_slot:
        raise MergeError(f"{no_slot[:5]} of the model's state_dict are neither parameters nor buffers, "
                         "so load_merged cannot assign them; nothing was loaded")


def _load_requantized(slots: Slots, module: nn.Module, name: str, values: dict[str, torch.Tensor]) -> None:
    """Assign the layer a new weight in its own quantized format, and a new bias where it changed."""
    dense = values["weight"]
    if type(module).__module__.startswith("bitsandbytes"):
        weight = requantize_bitsandbytes(module, dense)
    else:
        try:
            weight = nn.Parameter(requantize_tensor(module.weight, dense), requires_grad=False)
        except NotImplementedError as err:
            raise MergeError(f"{name}: {err}; nothing was loaded") from None
    slots.assign(f"{name}.weight", weight)
    bias = values.get("bias")
    if bias is not None and module.bias is not None and not torch.equal(bias, module.bias.detach()):
        slots.assign(f"{name}.bias", nn.Parameter(bias.to(module.bias.dtype), requires_grad=False))
