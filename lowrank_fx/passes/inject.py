"""Inject adapters: y = op(x, W)  ->  y' = y + unit(x, *shared) at every call site of a target.

For each target the method's unit computes Δy from the site's own activation x (and, for
units that ask, from y, W and b: `Unit.site_inputs`), so the base op stays untouched and
folding just removes the added nodes. A site that uses rows a:b of W (MultiheadAttention's
packed in_proj on separate query, key, value) adds Δy[..., a:b].

    %y      = aten.linear(%x, %W, %b)
    %A, ... = get_attr lowrank_fx.<adapter>.<group>.<shared>      (LoRTA, RandLoRA only)
    %delta  = call_module lowrank_fx.<adapter>.<group>.units.<target>(%x, %A, ...)
    %gate   = get_attr lowrank_fx_gates.<adapter>                   (0-dim: 1 active, 0 not)
    %y2     = aten.addcmul(%y, %delta, %gate)  = y + gate · Δy      (users of %y now use %y2)

Node roles (node.meta["lowrank_fx"]["role"]): "shared", "delta", "gate", "add". The gate
makes switching adapters a buffer write (graph/gates.py); addcmul adds it at the cost of an add.

On an expert stack (graph/experts.py) a unit also reads the site's routing node (each pair's
expert, or a grouped site's offsets), so Δy follows the routing of every call.

On a quantized linear (graph/quantized.py) the site is the output of the layer's region and
x is the region's activation (`Target.inputs`): Δy is added beside the quantized base, which
is never converted. Units that read the base weight in the graph (DoRA) are refused there.

Returns the adapter's target -> group map. Nothing in the graph changes if building the
adapter modules fails.
"""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import fx, nn

from ..errors import SpecError
from ..graph.experts import ExpertsKind
from ..graph.gates import add_gate
from ..graph.op_kinds import QuantizedLinearKind
from ..graph.quantized import dequantized_exactly
from ..graph.record import CONTAINER, tag
from ..graph.targets import Target
from ..methods.base import AdapterGroup, Method, unit_key
from ..methods.lora_init import DATA
from ..methods.lora_loftq_quantized import float_weight
from ..methods.lora_unit import LoRAUnit
from .calibrate import input_covariances
from .residual_base import base_changing, check_untied, write_residuals

aten = torch.ops.aten


def build_groups(assignment: dict[str, Method], targets: dict[str, Target],
                 weights: dict[str, torch.Tensor] | None = None,
                 covariances: dict[str, torch.Tensor] | None = None,
                 quantized_pairs: dict[str, tuple] | None = None) -> tuple[dict[str, AdapterGroup], dict[str, str]]:
    """Adapter groups for `assignment` (target name -> method) and each target's group name.

    Every unit learns its target's op kind; units with `init_from_weight` (DoRA, LoRA's
    weight-based inits) are given the target's base weight from `weights` (by weight name) when
    it is there; LoftQ over a bitsandbytes base gets (W, Q) from `quantized_pairs` (by target).
    """
    by_method: dict[Method, list[Target]] = {}
    for name, method in assignment.items():
        by_method.setdefault(method, []).append(targets[name])
    groups: dict[str, AdapterGroup] = {}
    group_of: dict[str, str] = {}
    for method, method_targets in by_method.items():
        for name, group in method.build(method_targets).items():
            unique = name
            suffix = 1
            while unique in groups:
                unique = f"{name}_{suffix}"
                suffix += 1
            groups[unique] = group
            for target in group.target_names:
                group_of[target] = unique
                unit: Any = group.unit(target)  # the init hooks below are the unit's own, where it has them
                unit.op_kind = targets[target].kind
                if hasattr(unit, "init_from_weight") and weights and targets[target].weight in weights:
                    if covariances and target in covariances:
                        unit.covariance = covariances[target]
                    unit.init_from_weight(weights[targets[target].weight])
                if quantized_pairs and target in quantized_pairs:
                    unit.init_from_quantized(*quantized_pairs[target])
    return groups, group_of


def _float_and_quantized(gm: fx.GraphModule, assignment: dict[str, Method], targets: dict[str, Target]) -> dict:
    """(W from LoRA's loftq_weights file, the layer's dequantized Q) for each quantized target of a
    LoRA given loftq_weights (methods/lora_loftq_quantized.py)."""
    pairs = {}
    for name, method in assignment.items():
        path = getattr(method, "loftq_weights", None)
        target = targets[name]
        if path is None or not target.quantized:
            continue
        dense = dequantized_exactly(gm, target)
        weight = float_weight(path, target.weight, name, (dense.shape[0], dense.shape[1]))
        pairs[name] = (weight.to(dense.device), dense)
    return pairs


def _refuse_quantized(assignment: dict[str, Method], targets: dict[str, Target]) -> None:
    for name, method in assignment.items():
        kind = targets[name].kind
        dora = getattr(method, "dora", False) or getattr(method, "kind", "") == "dora"
        if isinstance(kind, QuantizedLinearKind) and dora:
            raise SpecError(
                f"{name} has a {kind.scheme} quantized weight, and DoRA reads the base weight "
                "in every forward (its column norms), which a quantized weight does not give as a matrix. "
                "Use LoRA, LoRTA or RandLoRA on quantized layers, or exclude them from the DoRA spec."
            )


def _refuse_experts(assignment: dict[str, Method], targets: dict[str, Target]) -> None:
    for name, method in assignment.items():
        kind = targets[name].kind
        if isinstance(kind, ExpertsKind) and method.kind != "lora":
            raise SpecError(
                f"{name} is a stack of {kind.experts} experts (a 3-D weight), which only LoRA adapts "
                f"({type(method).__name__} builds one update per matrix, not per routed expert); give it "
                "lfx.LoRA(...) in a mixed spec, or exclude it"
            )


def _site_input(gm: fx.GraphModule, site: fx.Node, x_index: int, target: Target, role: str, x_node=None,
                route=None):
    """The node a unit reads for `role`: the activation, the site's output, the base weight or bias,
    an expert stack's routing (graph/experts.py)."""
    if role == "route":
        return route
    if role == "x":
        return x_node if x_node is not None else site.args[x_index]
    if role == "y":
        return site
    if role == "weight":
        return gm.graph.get_attr(target.weight)
    if role == "bias":
        return gm.graph.get_attr(target.bias) if target.bias is not None else None
    raise ValueError(f"unknown site input {role!r}")


def inject(gm: fx.GraphModule, adapter: str, assignment: dict[str, Method], targets: dict[str, Target],
           calibration=None, initialise: bool = True, components: dict | None = None) -> dict[str, str]:
    """`components`: EVA's A by target (passes/eva_calibrate.py). `initialise=False`: the units are
    placeholders that the caller replaces by another graph's (generation's decode graph), so nothing
    is computed from the weights and the base stays."""
    _refuse_quantized(assignment, targets)
    _refuse_experts(assignment, targets)
    weights = covariances = pairs = None
    if initialise:
        check_untied(gm, base_changing(assignment, targets), targets)
        weights = {targets[name].weight: gm.get_parameter(targets[name].weight).detach() for name in assignment
                   if not targets[name].quantized}
        data = [name for name, method in assignment.items() if getattr(method, "init", "") in DATA]
        covariances = input_covariances(gm, data, targets, calibration) if data else None
        pairs = _float_and_quantized(gm, assignment, targets)
    groups, group_of = build_groups(assignment, targets, weights, covariances, pairs)
    if initialise and components:
        with torch.no_grad():
            for name, rows in components.items():
                cast(LoRAUnit, groups[group_of[name]].unit(name)).lora_A.copy_(rows)  # EVA: LoRA units
    if not hasattr(gm, CONTAINER):
        gm.add_module(CONTAINER, nn.ModuleDict())
    # Adapters live where the weights they adapt live (a graph captured on a GPU), and
    # follow the graph's mode (new modules start in training mode; LoRA dropout).
    device = gm.get_parameter(targets[next(iter(assignment))].weight).device
    getattr(gm, CONTAINER)[adapter] = nn.ModuleDict(groups).to(device).train(gm.training)
    gate_path = add_gate(gm, adapter, device)
    nodes = {n.name: n for n in gm.graph.nodes}
    for name in assignment:
        target = targets[name]
        group_path = f"{CONTAINER}.{adapter}.{group_of[name]}"
        group = groups[group_of[name]]
        unit = group.unit(name)
        for i, (site_name, x_index, rows) in enumerate(zip(target.sites, target.activations, target.rows)):
            site = nodes[site_name]
            x_node = nodes[target.inputs[i]] if target.inputs else None
            route = nodes[target.routes[i]] if target.routes else None
            with gm.graph.inserting_before(site.next):
                inputs = [_site_input(gm, site, x_index, target, role, x_node, route) for role in unit.site_inputs]
                shared = [gm.graph.get_attr(f"{group_path}.{s}") for s in group.shared]
                call = gm.graph.call_module(f"{group_path}.units.{unit_key(name)}", (*inputs, *shared))
                tag(call, adapter, name, "delta")
                delta = call
                if rows is not None:
                    delta = gm.graph.call_function(aten.slice.Tensor, (call, -1, rows[0], rows[1]))
                    tag(delta, adapter, name, "rows")
                gate = gm.graph.get_attr(gate_path)
                added = gm.graph.call_function(aten.addcmul.default, (site, delta, gate))
            # the base weight and bias read here are the adapter's own nodes; an activation that
            # is a buffer (CLIP's position_ids into its position embedding) stays the model's
            created = [node for role, node in zip(unit.site_inputs, inputs) if role in ("weight", "bias")]
            for node in [*(n for n in created if n is not None), *shared]:
                tag(node, adapter, name, "shared")
            tag(gate, adapter, name, "gate")
            tag(added, adapter, name, "add")
            site.replace_all_uses_with(
                added, delete_user_cb=lambda user, added=added, call=call: user is not added and user is not call)
    write_residuals(gm, adapter, {name: groups[group_of[name]].unit(name) for name in assignment}, targets)
    gm.graph.lint()
    gm.recompile()
    return group_of
