"""Trained modules: `Spec(train=["classifier"])` gives the adapter its own full copy of those
modules' parameters (PEFT's `modules_to_save`), switched by the adapter's gate.

Which parameters: every parameter the graph reads whose name, or a name it is tied to in the
original model, lies under a module matched by a `train` pattern (the patterns of
`Spec.targets`: a glob against any dotted suffix of the module path, or "re:<regex>"), or is
itself matched by one: `train=["*.bias"]` trains single parameters, every bias (PEFT's
bias="all"), leaving their modules' other parameters as they are.
Buffers (batch-norm statistics) stay the base model's. Refused with a SpecError: a pattern that
matches no module (naming the nearest ones); a parameter tied to a name outside the trained
modules (GPT-2's lm_head is its token embedding: one copy cannot serve only one of the uses);
a parameter that another adapter of the graph adapts (LoRA on the classifier in adapter "b"
while adapter "a" trains it). The adapter's own targets that a trained module owns are left
out of its targets, as PEFT skips modules_to_save when it injects LoRA.

In the graph, for every parameter P and adapter a (copies in `gm.lowrank_fx[a]["trained"]`,
methods/trained.py):

    %P    = get_attr classifier.weight                              (the base, unchanged)
    %C    = get_attr lowrank_fx.a.trained.units.classifier.weight   role "shared"
    %gate = get_attr lowrank_fx_gates.a                             role "gate"
    %W    = select_trained(%P, %C, %gate) = where(gate != 0, C, P)  role "select" (users of %P use %W)

`where` is exact (an inactive adapter reads the base bit for bit), compiles without graph
breaks and exports to ONNX. A second adapter training P selects on top of the first
(`select_trained(%W, %C_b, %gate_b)`), so among the active adapters the newest one's copy is
used; folding (`trained_values`) picks the same one. The base stays argument 0 of every
select, so folding and dropping an adapter replace a select by its base
(passes/fold.py, export/adapter_graph.py), and gates.ungate leaves `select_trained(P, C)` = C.
"""

from __future__ import annotations

import dataclasses
import operator
from functools import partial
from typing import cast

import torch
from torch import fx, nn

from ..errors import MergeError, SpecError, nearest
from ..graph.fx_args import target_name
from ..graph.gates import GATES, add_gate, gate_value
from ..graph.record import CONTAINER, KEY, Record, tag
from ..graph.targets import find_targets
from ..methods.trained import TRAINED, TrainedGroup, TrainedUnit, build_trained
from ..spec import Spec, _compile


def select_trained(base: torch.Tensor, copy: torch.Tensor, gate: torch.Tensor | None = None) -> torch.Tensor:
    """The adapter's copy where its gate is on, else the base (exact); ungated: the copy."""
    if gate is None:
        return copy
    return torch.where(gate != 0, copy, base)


@dataclasses.dataclass
class Trained:
    """What `Spec.train` selects on one graph."""

    params: dict[str, nn.Parameter]  # graph name -> base parameter, in graph order
    modules: list[str]  # the matched modules (outermost), original names: PEFT's modules_to_save
    single: list[str] = dataclasses.field(default_factory=list)  # parameters matched outside them ("lin0.bias")


def _role(node: fx.Node) -> str | None:
    return node.meta.get(KEY, {}).get("role")


def _parameter(gm: fx.GraphModule, name: str):
    try:
        return gm.get_parameter(name)
    except AttributeError:
        return None


def base_readers(gm: fx.GraphModule) -> dict[int, list[fx.Node]]:
    """{id(parameter): the model's own get_attr nodes reading it} (lowrank_fx's are left out)."""
    found: dict[int, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr" and KEY not in node.meta:
            param = _parameter(gm, node.target)
            if isinstance(param, nn.Parameter):
                found.setdefault(id(param), []).append(node)
    return found


def _prefixes(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _no_module_message(pattern: str, modules: list[str]) -> str:
    key = pattern[3:] if pattern.startswith("re:") else pattern.strip("*.")
    leaf_of: dict[str, str] = {}
    for module in modules:
        leaf_of.setdefault(module.rsplit(".", 1)[-1], module)
    shown = []
    for close in nearest(key, list(leaf_of) + modules, n=5):
        full = leaf_of.get(close, close)
        if full not in shown:
            shown.append(full)
    return (f"train pattern {pattern!r} matched no module with parameters the graph uses. "
            f"Nearest module names: {', '.join(shown) or 'none'}")


def resolve_trained(gm: fx.GraphModule, spec: Spec) -> Trained:
    """The parameters `spec.train` selects on `gm` (see the module docstring for what is refused)."""
    if not spec.train:
        return Trained({}, [])
    record = Record.find(gm)
    aliases = record.aliases if record is not None else {}
    readers = base_readers(gm)
    params: dict[str, nn.Parameter] = {}
    names_of: dict[str, list[str]] = {}
    for nodes in readers.values():
        graph_name = target_name(nodes[0])
        params[graph_name] = gm.get_parameter(graph_name)
        names = list(dict.fromkeys([*aliases.get(graph_name, [graph_name]), *(target_name(n) for n in nodes)]))
        names_of[graph_name] = names
    modules = sorted({m for names in names_of.values() for name in names for m in _prefixes(name)})
    parameters = sorted({name for names in names_of.values() for name in names})
    matched: set[str] = set()
    for pattern in spec.train:
        match = _compile(pattern)
        hits = [m for m in modules + parameters if match(m)]
        if not hits:
            raise SpecError(_no_module_message(pattern, modules))
        matched.update(hits)
    chosen: dict[str, nn.Parameter] = {}
    for graph_name, names in names_of.items():
        covered = [name for name in names if any(m in matched for m in [*_prefixes(name), name])]
        if not covered:
            continue
        if len(covered) != len(names):
            others = [name for name in names if name not in covered]
            raise SpecError(
                f"{covered[0]} is tied to {', '.join(others)} in the model, and Spec.train covers only the first: "
                "one trained copy cannot replace only some uses of a tied weight. Train both modules "
                "or neither (for GPT-2's lm_head, tied to the token embedding, train neither)"
            )
        chosen[graph_name] = params[graph_name]
    outermost = sorted(m for m in matched if not any(p in matched for p in _prefixes(m)))
    single = set(parameters)
    return Trained(chosen, [m for m in outermost if m not in single], [m for m in outermost if m in single])


def _adapted_elsewhere(gm: fx.GraphModule, trained: Trained, adapter: str) -> list[str]:
    """'<param> (adapter <name>, target <t>)' for trained parameters that are the weight or bias
    of another adapter's target."""
    record = Record.find(gm)
    ids = {id(p): name for name, p in trained.params.items()}
    targets = find_targets(gm, record.aliases) if record is not None else {}
    found = []
    for other, info in (record.adapters.items() if record is not None else []):
        for name in info.groups if other != adapter else ():
            target = targets.get(name)
            for tensor in (target.weight, target.bias) if target is not None else ():
                param = _parameter(gm, tensor) if tensor else None
                if param is not None and id(param) in ids:
                    found.append(f"{ids[id(param)]} (adapter {other!r}, target {name})")
    return found


def drop_trained(gm: fx.GraphModule, spec: Spec, targets: dict, assignment: dict) -> dict:
    """`assignment` without the targets whose weight a trained module owns (as PEFT does).
    Raises SpecError when a train pattern matches nothing, when nothing is left to adapt, or when
    a trained bias is also the base of a LoRA bias update (LoRA(bias=True) on the same target)."""
    trained = resolve_trained(gm, spec)
    if not trained.params:
        return assignment
    ids = {id(p) for p in trained.params.values()}
    clash = [name for name, method in assignment.items() if getattr(method, "bias", False) is True
             and targets[name].bias is not None and id(gm.get_parameter(targets[name].bias)) in ids]
    if clash:
        raise SpecError(
            f"Spec.train trains the bias of {', '.join(clash[:5])}, which LoRA(bias=True) also updates: one bias "
            "cannot be both a trained copy and the base of a LoRA bias; train the bias, or use LoRA(bias=True)"
        )
    kept = {name: method for name, method in assignment.items()
            if id(gm.get_parameter(targets[name].weight)) not in ids}
    if assignment and not kept:
        raise SpecError(
            f"every target that {', '.join(repr(p) for p, _ in spec.rules())} selects belongs to a module in "
            "Spec.train "
            f"({', '.join(trained.modules)}), which trains all its weights; drop those target patterns, "
            "or give targets=[] for an adapter that only trains modules"
        )
    return kept


def check_trained(gm: fx.GraphModule, adapter: str, trained: Trained) -> None:
    """Raise SpecError if `adapter` cannot train these parameters on `gm` (changes nothing)."""
    conflicts = _adapted_elsewhere(gm, trained, adapter)
    if conflicts:
        raise SpecError(
            f"Spec.train of adapter {adapter!r} covers parameters that another adapter of this graph adapts: "
            f"{', '.join(conflicts[:5])}. A module trained by one adapter cannot be a target of another; "
            "exclude it from the other adapter's targets (Spec.exclude) or train it there too"
        )
    roots = [name for name in trained.params if "." not in name]
    if roots:
        raise SpecError(f"Spec.train matched parameters of the root module ({', '.join(roots)}); name submodules")


def refuse_trained_targets(gm: fx.GraphModule, spec: Spec, err: Exception) -> None:
    """After `spec` matched no target: if a pattern names a module another adapter trains (the graph
    then reads a select, not the weight, so it is no target), raise a SpecError that says so."""
    record = Record.find(gm)
    trained = {module: adapter for adapter in (record.adapters if record is not None else {})
               if (group := trained_group(gm, adapter)) is not None for module in group.target_names}
    for pattern, _ in spec.rules():
        match = _compile(pattern)
        hits = [module for module in trained if match is not None and match(module)]
        if hits:
            raise SpecError(
                f"pattern {pattern!r} names {', '.join(hits)}, which adapter {trained[hits[0]]!r} trains "
                "(Spec.train); a module trained by one adapter cannot be a target of another: train it "
                "in this adapter too (Spec.train), or drop the pattern"
            ) from err


def add_trained(gm: fx.GraphModule, adapter: str, trained: Trained) -> None:
    """Give `adapter` its trained copies and make the graph read them (module docstring)."""
    if not trained.params:
        return
    check_trained(gm, adapter, trained)
    group = build_trained(trained.params)
    device = next(iter(trained.params.values())).device
    if not hasattr(gm, CONTAINER):
        gm.add_module(CONTAINER, nn.ModuleDict())
    container = getattr(gm, CONTAINER)
    if adapter not in container:
        container[adapter] = nn.ModuleDict()
    container[adapter][TRAINED] = group.to(device).train(gm.training)
    gate_path = f"{GATES}.{adapter}" if hasattr(getattr(gm, GATES, None), adapter) else add_gate(gm, adapter, device)
    readers = base_readers(gm)
    for unit_key, unit in group.units.items():
        for leaf, name in cast(TrainedUnit, unit).base_names.items():
            copy_path = f"{CONTAINER}.{adapter}.{TRAINED}.units.{unit_key}.{leaf}"
            for reader in readers[id(trained.params[name])]:
                top = _top_of_chain(reader)
                with gm.graph.inserting_after(top):
                    copy = gm.graph.get_attr(copy_path)
                with gm.graph.inserting_after(copy):
                    gate = gm.graph.get_attr(gate_path)
                with gm.graph.inserting_after(gate):
                    selected = gm.graph.call_function(select_trained, (top, copy, gate))
                if "val" in top.meta:
                    selected.meta["val"] = top.meta["val"]
                # every user but the select itself
                top.replace_all_uses_with(selected, delete_user_cb=partial(operator.is_not, selected))
                tag(copy, adapter, name, "shared")
                tag(gate, adapter, name, "gate")
                tag(selected, adapter, name, "select")
    gm.graph.lint()
    gm.recompile()


def _top_of_chain(node: fx.Node) -> fx.Node:
    """The last select stacked on a base reader (the value the model's ops read)."""
    while True:
        above = [u for u in node.users if _role(u) == "select" and u.args[0] is node]
        if not above:
            return node
        node = above[0]


def trained_group(gm: fx.GraphModule, adapter: str) -> TrainedGroup | None:
    container = getattr(gm, CONTAINER, None)
    if container is None or adapter not in container or TRAINED not in container[adapter]:
        return None
    return container[adapter][TRAINED]


def trained_values(gm: fx.GraphModule) -> dict[str, torch.Tensor]:
    """{base parameter's graph name: the value the graph uses instead}: the copy of the newest
    active adapter (gate != 0) that trains it. Raises MergeError on NaN / inf copies."""
    record = Record.find(gm)
    chosen: dict[str, torch.Tensor] = {}
    for adapter in (record.adapters if record is not None else {}):
        group = trained_group(gm, adapter)
        if group is None or gate_value(gm, adapter) == 0.0:
            continue
        for name, copy in group.copies().items():
            chosen[name] = copy.detach()
    bad = [name for name, value in chosen.items() if not torch.isfinite(value).all()]
    if bad:
        raise MergeError(
            f"refusing to fold: the trained copy of {', '.join(bad)} has NaN or inf values "
            "(diverged training?). The graph is unchanged; load a good checkpoint first."
        )
    return chosen


def fold_trained(folded: fx.GraphModule, chosen: dict[str, torch.Tensor]) -> None:
    """In a graph whose adapter nodes are gone (passes/fold.py), make every reader of each
    trained base parameter read a new frozen parameter holding the chosen copy."""
    readers = base_readers(folded)
    for name, value in chosen.items():
        base = folded.get_parameter(name)
        parameter = nn.Parameter(value.to(base.device, base.dtype).clone(), requires_grad=False)
        for reader in readers.get(id(base), []):
            owner, _, leaf = target_name(reader).rpartition(".")
            module = folded.get_submodule(owner) if owner else folded
            module._parameters[leaf] = parameter


def with_trained(gm: fx.GraphModule, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`tensors` (a state dict of gm's own tensors) with trained base parameters replaced by the
    chosen copies; tied names of one parameter keep sharing one value."""
    by_id = {id(gm.get_parameter(name)): value for name, value in trained_values(gm).items()}
    return {key: by_id.get(id(value), value) for key, value in tensors.items()}
