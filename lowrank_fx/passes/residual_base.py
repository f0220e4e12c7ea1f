"""The graph's own base weight for inits that change it (PiSSA, OLoRA: methods/lora_init.py).

Such an init splits W into W_res + s · B A. The graph shares the model's tensors, so W_res goes
into a NEW parameter that replaces W under every name the graph holds it by; the user's model
keeps W. A weight that the graph also reads outside the target's call sites (an embedding tied
to the head) is refused: the other use must keep W.

`gm.meta[ORIGINALS]` keeps, per weight name, the adapter and the model's own tensor W, so that
`lfx.merge(gm, inplace=True)` (which promises the model W + ΔW) can write the folded weight
W_res + s · B A back into the model's tensor when that adapter was folded (`return_to_model`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import fx, nn

from ..errors import SpecError
from ..graph.targets import Target
from ..methods.lora_init import changes_base
from .fold_graph import GraphIndex, read_elsewhere, set_parameter

ORIGINALS = "lowrank_fx_original_bases"


def base_changing(assignment: dict, targets: dict[str, Target]) -> list[str]:
    """Targets whose method's init changes the base weight."""
    return [name for name, method in assignment.items()
            if changes_base(getattr(method, "init", "default")) and not targets[name].quantized]


def check_untied(gm: fx.GraphModule, names: list[str], targets: dict[str, Target]) -> None:
    """SpecError for a base-changing target whose weight the graph reads elsewhere too."""
    if not names:
        return
    index = GraphIndex(gm)
    for name in names:
        if read_elsewhere(gm, index, targets[name]):
            raise SpecError(
                f"{name}'s weight {targets[name].weight} is also used outside {name} (a tied embedding?), and "
                "this init replaces the base weight by a residual, which the other use must not see; exclude "
                f"{name} from this spec or give it its own LoRA with init='default' (a mixed spec)")


def _paths_by_tensor(gm: fx.GraphModule) -> dict[int, list[str]]:
    """Every name `gm` holds each parameter by (a tied weight has several), keyed by id."""
    names_of: dict[int, list[str]] = {}
    for path, param in gm.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(param), []).append(path)
    return names_of


def write_residuals(gm: fx.GraphModule, adapter: str, units: Mapping[str, Any], targets: dict[str, Target]) -> None:
    """Give each target whose unit holds a residual (`unit.residual`, the weight as the graph stores
    it) a new frozen parameter with it, under every name of the old weight in `gm`."""
    names_of = _paths_by_tensor(gm)
    for name, unit in units.items():
        value = getattr(unit, "residual", None)
        if value is None:
            continue
        unit.residual = None
        old = gm.get_parameter(targets[name].weight)
        new = nn.Parameter(value.to(device=old.device, dtype=old.dtype).contiguous(), requires_grad=False)
        paths = names_of.get(id(old), [targets[name].weight])
        for path in paths:
            set_parameter(gm, path, new)
        originals = gm.meta.setdefault(ORIGINALS, {})
        for path in paths:
            originals.setdefault(path, (adapter, old))


def return_to_model(gm: fx.GraphModule, folded: list[str]) -> None:
    """After an in-place fold of the adapters `folded`: each weight a base-changing init of one of
    them had replaced is copied into the model's own tensor, which the graph reads again."""
    originals = gm.meta.pop(ORIGINALS, {})
    with torch.no_grad():
        for path, (adapter, original) in originals.items():
            if adapter not in folded:
                continue
            current = gm.get_parameter(path)
            if current is not original:
                original.copy_(current)
                set_parameter(gm, path, original)


def restore_originals(gm: fx.GraphModule, adapter: str) -> None:
    """Put the model's own tensors back for the weights whose residual `adapter` had written
    (its deletion: the graph reads W again, as if the adapter had never been added)."""
    originals = gm.meta.get(ORIGINALS, {})
    for path, (owner, original) in list(originals.items()):
        if owner == adapter:
            set_parameter(gm, path, original)
            del originals[path]
    if not originals:
        gm.meta.pop(ORIGINALS, None)


def share_residuals(graph: fx.GraphModule, source: fx.GraphModule, targets: list[str],
                    units: dict[str, nn.Module], weights: dict[str, str]) -> None:
    """Point `graph`'s weights of the `targets` whose unit (of `source`) changed the base at
    `source`'s own tensors (the residuals), under every name `graph` holds them by: a graph that
    shares `source`'s adapter modules (generation's decode graph) must run on the same base."""
    names_of = _paths_by_tensor(graph)
    for target in targets:
        if not changes_base(getattr(units[target], "init", "default")):
            continue
        path = weights[target]
        old, new = graph.get_parameter(path), source.get_parameter(path)
        for name in names_of.get(id(old), [path]):
            set_parameter(graph, name, new)
