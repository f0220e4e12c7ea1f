"""Fold adapters into dense weights: W ← W + Σ_adapters gate · ΔW, computed in fp32 (float64 for
float64 weights or updates) and cast back to W's dtype. ΔW (out, in) goes back to the weight's
own shape through its op kind (a conv kernel, a transposed Conv1D or embedding table); a
unit with a bias update (LoRA bias) adds b ← b + gate · Δb.

`fold(gm)` returns a new GraphModule without adapter nodes or parameters; `gm` itself is
never modified. A weight that the graph also reads elsewhere (GPT-2's lm_head is the token
embedding) is folded into an untied copy, `lowrank_fx_untied.<target>`, so the other use
keeps the original values. Non-finite results are refused before anything is built.
Adapters whose gate is 0 (made inactive by `lfx.set_active_adapters`) are left out: the
folded graph computes what `gm` computes. Trained modules (`Spec.train`) fold as the copy the
graph reads: the newest active adapter's that trains them (passes/train_modules.py).

Quantized targets (passes/quantized_fold.py) fold to dense layers: dequantized W + ΔW in fp32,
exact. `fold(gm, requantize=True)` quantizes W + ΔW again in the base's own format instead and
reports the measured output error (`folded.requantize_report`, a warning above `tolerance`).
The copy shares every frozen tensor of `gm` (base weights, quantized or not, are never copied:
`shared_copy`).
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import fx, nn

from ..errors import MergeError
from ..graph.gates import GATES, gate_value
from ..graph.quantized import dequantized
from ..graph.record import CONTAINER, KEY, Record, tagged
from ..graph.targets import Target, find_targets, weight_operand
from ..methods.base import unit_key
from ..progress import stage
from .layers import flat_view
from .quantized_fold import REPORT, fold_dense, fold_requantized, measure, region_bias, regions_by_output
from .train_modules import fold_trained, trained_values

UNTIED = "lowrank_fx_untied"


def fold_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype folding adds in: fp32 for fp16/bf16/fp32, float64 stays float64."""
    return torch.promote_types(dtype, torch.float32)


def adapted_record(gm: fx.GraphModule) -> Record:
    record = Record.find(gm)
    if record is None or not record.adapters:
        raise MergeError(
            "this graph has no adapters to fold; call lfx.rewrite(model, spec, ...) first "
            "(a merged graph is already dense)"
        )
    return record


def _add(total: dict, name: str, value: torch.Tensor, gate: float) -> None:
    value = value.to(fold_dtype(value.dtype)) * gate
    total[name] = total[name] + value if name in total else value


def adapter_deltas(gm: fx.GraphModule) -> tuple[dict[str, Target], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Targets of `gm`, gate · ΔW (out, in) and gate · Δb (out,) in fp32 or wider per adapted
    target, summed over the active adapters (gate ≠ 0). Δb only where a unit has one (LoRA bias)."""
    record = adapted_record(gm)
    targets = find_targets(gm, record.aliases)
    deltas: dict[str, torch.Tensor] = {}
    bias_deltas: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for adapter, info in record.adapters.items():
            gate = gate_value(gm, adapter)
            if gate == 0.0:
                continue
            groups = getattr(gm, CONTAINER)[adapter]
            for name, group in info.groups.items():
                target = targets[name]
                base = base_matrix(gm, target) if groups[group].unit(name).uses_base_weight else None
                _add(deltas, name, groups[group].delta_weight(name, base), gate)
                bias = groups[group].unit(name).delta_bias()
                if bias is not None:
                    _add(bias_deltas, name, bias, gate)
    bad = [name for name, delta in [*deltas.items(), *bias_deltas.items()] if not torch.isfinite(delta).all()]
    if bad:
        raise MergeError(
            f"refusing to fold: the update of {', '.join(bad)} has NaN or inf values "
            "(diverged training?). The graph is unchanged; load a good checkpoint first."
        )
    return targets, deltas, bias_deltas


def base_matrix(gm: fx.GraphModule, target: Target) -> torch.Tensor:
    """The target's base weight as its (out, in) matrix; a quantized one dequantized by its region."""
    if target.quantized:
        return dequantized(gm, target)
    return target.kind.to_matrix(gm.get_parameter(target.weight).detach(), target.layout)


def shared_copy(gm: fx.GraphModule, every_tensor: bool = False) -> fx.GraphModule:
    """A deep copy of `gm` that shares every tensor not requiring grad (base weights, quantized
    ones included: torchao's NF4 tensors cannot be deep-copied, and none should be).

    `every_tensor=True` shares the trainable ones too: a pristine captured graph, whose
    tensors are all the model's own (adapt/capture_memo.py hands out such copies)."""
    memo = {id(t): t for t in [*gm.parameters(), *gm.buffers()] if every_tensor or not t.requires_grad}
    with warnings.catch_warnings():  # torch's own pytree deprecation notice on deepcopy
        warnings.simplefilter("ignore", FutureWarning)
        return copy.deepcopy(gm, memo)


def merged_weight(weight: torch.Tensor, delta: torch.Tensor, target: Target, gm: fx.GraphModule | None = None) -> torch.Tensor:
    """(W + ΔW) in W's own shape, layout and dtype, added in fp32 (float64 if either is float64).
    A quantized target's W is dequantized from `gm`; the sum is dense, in its compute dtype."""
    if target.quantized:
        base = dequantized(gm, target)
        wide = torch.promote_types(fold_dtype(base.dtype), delta.dtype)
        return (base.to(wide) + delta.to(base.device, wide)).to(base.dtype)
    stored = target.kind.to_weight(delta, target.layout, weight.shape)
    wide = torch.promote_types(fold_dtype(weight.dtype), stored.dtype)
    return (weight.detach().to(wide) + stored.to(weight.device, wide)).to(weight.dtype)


def weight_chains(gm: fx.GraphModule, target: Target) -> list[list[fx.Node]]:
    """Per call site: [site, the ops between it and the weight..., the weight's get_attr]."""
    nodes = {n.name: n for n in gm.graph.nodes}
    chains = []
    for site_name in target.sites:
        site = nodes[site_name]
        chain = [site]
        node = weight_operand(site)
        while node.op != "get_attr":
            chain.append(node)
            node = node.args[0]
        chains.append(chain + [node])
    return chains


def _set_parameter(gm: fx.GraphModule, path: str, value: nn.Parameter) -> None:
    owner, _, leaf = path.rpartition(".")
    module = gm.get_submodule(owner) if owner else gm
    if leaf in module._parameters:
        module._parameters[leaf] = value
    else:
        setattr(module, leaf, value)


def _readers(gm: fx.GraphModule, target: Target) -> list[fx.Node]:
    """Every get_attr node that reads the target's weight tensor, under any of its names."""
    weight = gm.get_parameter(target.weight)
    return [n for n in gm.graph.nodes if n.op == "get_attr" and _tensor(gm, n.target) is weight]


def read_elsewhere(gm: fx.GraphModule, target: Target) -> bool:
    """Whether the graph uses the target's weight anywhere but on its call sites' chains
    (and in lowrank_fx's own adapter nodes, which folding removes)."""
    on_chains = {node for chain in weight_chains(gm, target) for node in chain[:-1]}
    return any(user not in on_chains and KEY not in user.meta and KEY not in reader.meta
               for reader in _readers(gm, target) for user in reader.users)


def _fold_target(gm: fx.GraphModule, target: Target, merged: torch.Tensor) -> None:
    parameter = nn.Parameter(merged, requires_grad=False)
    if not read_elsewhere(gm, target):
        for reader in _readers(gm, target):
            _set_parameter(gm, reader.target, parameter)
        return
    chains = weight_chains(gm, target)
    if not hasattr(gm, UNTIED):
        gm.add_module(UNTIED, nn.Module())
    getattr(gm, UNTIED).register_parameter(unit_key(target.name), parameter)
    for chain in chains:
        consumer, root = chain[-2], chain[-1]
        with gm.graph.inserting_before(consumer):
            untied = gm.graph.get_attr(f"{UNTIED}.{unit_key(target.name)}")
        consumer.replace_input_with(root, untied)


def _tensor(gm: fx.GraphModule, path: str):
    try:
        return gm.get_parameter(path)
    except AttributeError:
        return None


def remove_adapter_nodes(gm: fx.GraphModule) -> None:
    """Drop every node lowrank_fx added (y + gate · Δy becomes y, a trained module's select its
    base), the adapter modules and gates."""
    for node in tagged(gm, "add") + tagged(gm, "select"):
        node.replace_all_uses_with(node.args[0])
    for node in reversed(tagged(gm)):
        gm.graph.erase_node(node)
    for node in list(gm.graph.nodes):
        if node.op == "get_attr" and not node.users:
            gm.graph.erase_node(node)
    for container in (CONTAINER, GATES):
        if hasattr(gm, container):
            gm.delete_submodule(container)


def merged_bias(bias: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """b + Δb in b's dtype, added in fp32 (float64 if either is float64)."""
    wide = torch.promote_types(fold_dtype(bias.dtype), delta.dtype)
    return (bias.detach().to(wide) + delta.to(bias.device, wide)).to(bias.dtype)


@stage("folding adapters into the base weights")
def fold(gm: fx.GraphModule, requantize: bool = False, tolerance: float = 1e-2) -> fx.GraphModule:
    """A new dense GraphModule with the active adapters folded in; `gm` is unchanged.

    `requantize=True`: quantized targets are quantized again in their base's format rather than
    made dense, and `folded.requantize_report` (a RequantizeReport) gives the output error measured
    on the capture's examples; a RequantizeWarning says when it is above `tolerance`.
    A graph with layer blocks (passes/layers.py) folds into a flat one."""
    gm = flat_view(gm)
    targets, deltas, bias_deltas = adapter_deltas(gm)
    trained = trained_values(gm)  # Spec.train: the active adapter's copies replace the base parameters
    merged = {name: merged_weight(gm.get_parameter(targets[name].weight), delta, targets[name], gm)
              for name, delta in deltas.items()}
    quantized = {name for name in merged if targets[name].quantized}
    regions = regions_by_output(gm) if quantized else {}
    biases = {targets[name].bias: merged_bias(gm.get_parameter(targets[name].bias), delta)
              for name, delta in bias_deltas.items() if name not in quantized}
    quantized_biases = {name: _quantized_bias(gm, targets[name], regions, delta)
                        for name, delta in bias_deltas.items() if name in quantized}
    folded = shared_copy(gm)
    remove_adapter_nodes(folded)
    for name, weight in merged.items():
        if name in quantized:
            region = regions[targets[name].sites[0]]
            step = fold_requantized if requantize else fold_dense
            step(folded, targets[name], region, weight, quantized_biases.get(name))
        else:
            _fold_target(folded, targets[name], weight)
    for path, bias in biases.items():
        _set_parameter(folded, path, nn.Parameter(bias, requires_grad=False))
    fold_trained(folded, trained)
    source = Record.find(gm)
    folded.meta[KEY] = Record(aliases=dict(source.aliases), state_keys=list(source.state_keys))
    folded.graph.lint()
    folded.recompile()
    if requantize and quantized:
        report = measure(gm, folded, len(quantized), tolerance)
        folded.meta[REPORT] = report
        folded.requantize_report = report
    return folded


def _quantized_bias(gm, target, regions, delta):
    """b + Δb of a quantized target (LoRA bias=True): the region's bias parameter, else its probed bias."""
    region = regions[target.sites[0]]
    path = region_bias(gm, region)
    if path is not None:
        return merged_bias(gm.get_parameter(path), delta)
    _, bias = dequantized(gm, target, with_bias=True)
    return merged_bias(bias, delta)
