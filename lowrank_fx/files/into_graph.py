"""Putting loaded adapter values into a graph: everything is checked first, then all is loaded.

Every loader (lowrank_fx adapter files, PEFT directories) goes through two steps:

1. `place(gm, adapter, spec, targets, ...)` works out where the adapter lives in `gm`,
   changing nothing. If `gm` already has an adapter of that name, that adapter is used, and
   its targets and method settings must agree with `spec`; otherwise the adapter's modules
   are built off the graph from `spec`, exactly as `rewrite` will build them. Either way the
   placement holds a module with the tensors the values must fit.
2. `install(gm, [(placement, tensors), ...], ...)` compares every tensor's name, shape and
   dtype with the placements (and refuses NaN or inf values) and raises ONE `AdapterFileError`
   listing every difference before anything changes. An adapter whose values are already
   folded into gm's weights (graph/folded.py) is refused as well. Only then are missing
   adapters injected (`rewrite`) and values copied in.

Method options in `IGNORED` do not change what the loaded values mean (the initialisation
they replace and its settings, the dropout used in training, RandLoRA's compute form), so they may differ
between file and graph; except an init that changed the graph's base (PiSSA, OLoRA, LoftQ,
CorDA: methods/lora_init.py), which graph and file must share.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import fx, nn

from ..adapt.hotswap import swap_in, swap_problems
from ..adapt.rewrite import resolve, rewrite
from ..errors import AdapterFileError, LowRankFxError, nearest
from ..graph.dtensors import like_slot
from ..graph.folded import fingerprint as fingerprint_of
from ..graph.folded import marks_in
from ..graph.record import CONTAINER, Record
from ..graph.targets import find_targets
from ..methods.base import unit_key
from ..methods.lora_init import changes_base
from ..methods.trained import TRAINED, build_trained
from ..passes.inject import build_groups
from ..passes.layers import flat_view
from ..passes.train_modules import check_trained, resolve_trained
from ..spec import Spec
from .serial import fingerprint

IGNORED = ("init", "eva_config", "loftq_weights", "dropout", "form")
SHOWN = 8  # items listed per kind of difference


@dataclasses.dataclass
class Placement:
    """Where one adapter's values go. `problems` is non-empty when they cannot go anywhere."""

    adapter: str
    spec: Spec
    exists: bool  # the graph already has this adapter
    swap: bool = False  # it is a hot-swap slot, and `module` the loaded adapter built apart (adapt/hotswap.py)
    module: nn.Module | None = None  # holds the tensors the values must fit
    group_of: dict[str, str] = dataclasses.field(default_factory=dict)  # target -> group
    problems: list[str] = dataclasses.field(default_factory=list)

    def unit_key(self, target: str, name: str) -> str:
        """Key, inside the adapter's module, of tensor `name` of the unit of `target`."""
        return f"{self.group_of[target]}.units.{unit_key(target)}.{name}"

    def trained_key(self, param: str) -> str:
        """Key of the trained copy of the graph's parameter `param` (`Spec.train`)."""
        module, _, leaf = param.rpartition(".")
        return f"{TRAINED}.units.{unit_key(module)}.{leaf}"

    def shared_key(self, name: str) -> str:
        """Key of the group tensor `name` of an adapter made of one group (PEFT's shared tensors)."""
        groups = sorted(set(self.group_of.values()))
        if len(groups) != 1:
            raise AdapterFileError(f"adapter {self.adapter!r} has groups {groups}; one shared {name} cannot fill them")
        return f"{groups[0]}.{name}"


def _listed(items: list[str]) -> str:
    shown = ", ".join(items[:SHOWN])
    return shown + (f" ... ({len(items)} in all)" if len(items) > SHOWN else "")


def _target_problems(graph_targets: dict, shapes: dict[str, tuple[int, int] | None], expected_fingerprint) -> list[str]:
    problems = []
    missing = [name for name in shapes if name not in graph_targets]
    if missing:
        hint = nearest(missing[0], graph_targets, n=3)
        problems.append(
            f"targets not in this graph: {_listed(missing)}"
            + (f" (nearest graph targets to the first: {', '.join(hint)})" if hint else "")
        )
    for name, shape in shapes.items():
        if shape is not None and name in graph_targets and tuple(graph_targets[name].shape) != tuple(shape):
            out, in_ = graph_targets[name].shape
            problems.append(f"target {name}: base weight is {shape[0]}x{shape[1]} (out x in) in the file, "
                            f"{out}x{in_} in this graph")
    if expected_fingerprint is not None:
        here = fingerprint({n: graph_targets[n].shape for n in shapes if n in graph_targets})
        if here != expected_fingerprint:
            problems.insert(0, f"base model fingerprint differs (file {expected_fingerprint[:19]}..., "
                               f"graph {here[:19]}...): the adapter was saved from another base model")
    return problems


def _config(method) -> dict:
    """Settings that must agree; the init only where it changed the graph's base (PiSSA, ...)."""
    config = method.config()
    kept = {k: v for k, v in config.items() if k not in IGNORED}
    if isinstance(config.get("init"), str) and changes_base(config["init"]) and config.get("loftq_weights") is None:
        kept["init"] = config["init"]
    return kept


def _one_sided(first, second) -> tuple[list[str], list[str]]:
    """(names only in `first`, names only in `second`), each in its own order."""
    return [n for n in first if n not in second], [n for n in second if n not in first]


def _method_problems(current: dict, incoming: dict) -> list[str]:
    """Differences between the graph's adapter (target -> method) and the loaded one."""
    problems = []
    only_graph, only_file = _one_sided(current, incoming)
    if only_graph:
        problems.append(f"the graph's adapter also adapts {_listed(only_graph)}, which the file lacks")
    if only_file:
        problems.append(f"the file also adapts {_listed(only_file)}, which the graph's adapter lacks")
    differing: dict[str, tuple[dict, dict]] = {}
    for name in current:
        if name in incoming:
            ours, theirs = _config(current[name]), _config(incoming[name])
            if ours != theirs:
                keys = sorted(k for k in ours.keys() | theirs.keys() if ours.get(k) != theirs.get(k))
                line = ", ".join(f"{k}={theirs.get(k)!r} in the file, {ours.get(k)!r} in the graph" for k in keys)
                differing.setdefault(line, []).append(name)
    for line, names in differing.items():
        problems.append(f"method settings differ for {_listed(names)}: {line}")
    return problems


def place(gm: fx.GraphModule, adapter: str, spec: Spec, shapes: dict[str, tuple[int, int] | None],
          expected_fingerprint: str | None = None) -> Placement:
    """Where the values of `adapter` go in `gm`. `shapes`: its target names -> the (out, in)
    of their base weights (None where the source does not say; the tensors are checked anyway)."""
    record = Record.require(gm, "lfx.load_adapters")
    placement = Placement(adapter, spec, exists=adapter in record.adapters)
    graph_targets = find_targets(gm, record.aliases)
    placement.problems = _target_problems(graph_targets, shapes, expected_fingerprint)
    if placement.problems:
        return placement
    try:
        _, assignment = resolve(gm, spec)
    except LowRankFxError as err:
        placement.problems.append(f"its spec does not fit this graph: {err}")
        return placement
    if set(assignment) != set(shapes):
        parts = []
        extra, lacking = _one_sided(assignment, shapes)
        if extra:
            parts.append(f"also {_listed(extra)}")
        if lacking:
            parts.append(f"not {_listed(lacking)}")
        placement.problems.append("on this graph its spec selects other targets than the file holds: "
                                  f"{'; '.join(parts)}")
        return placement
    trained = resolve_trained(gm, spec)  # resolve checked its patterns
    if placement.exists and record.adapters[adapter].max_rank is not None:
        _, current = resolve(gm, record.adapters[adapter].spec)
        placement.problems += swap_problems(gm, adapter, current, assignment)
        if trained.params:
            placement.problems.append("it trains whole modules (Spec.train); a hot-swap slot holds LoRA factors only")
        placement.exists = placement.swap = True
    elif placement.exists:
        info = record.adapters[adapter]
        _, current = resolve(gm, info.spec)
        placement.problems += _method_problems(current, assignment)
        only_graph, only_file = _one_sided(resolve_trained(gm, info.spec).params, trained.params)
        if only_graph or only_file:
            placement.problems.append("trained modules differ: " + "; ".join(
                [f"the graph's adapter also trains {_listed(only_graph)}"] * bool(only_graph)
                + [f"the file also trains {_listed(only_file)}"] * bool(only_file)))
        placement.module = getattr(gm, CONTAINER)[adapter]
        placement.group_of = dict(info.groups)
        return placement
    if placement.problems:
        return placement
    try:
        with torch.random.fork_rng(devices=[]):
            groups, placement.group_of = build_groups(assignment, graph_targets)
        if trained.params:
            check_trained(gm, adapter, trained)
            groups[TRAINED] = build_trained(trained.params, empty=True)
    except LowRankFxError as err:
        placement.problems.append(f"its adapter cannot be built on this graph: {err}")
        return placement
    placement.module = nn.ModuleDict(groups)
    return placement


def _without_data_pass(spec: Spec) -> Spec:
    """`spec` with LoRA(init="eva") and LoftQ over a bitsandbytes base (loftq_weights) as the default
    init: both leave the base alone, so the values loaded are all there is and neither the data pass
    nor the float weights are needed again (as PEFT loads EVA directories)."""
    def plain(method):
        if getattr(method, "init", "") == "eva":
            return dataclasses.replace(method, init="default", eva_config=None)
        if getattr(method, "loftq_weights", None) is not None:
            return dataclasses.replace(method, init="default", loftq_weights=None)
        return method
    if isinstance(spec.targets, dict):
        return dataclasses.replace(spec, targets={pattern: plain(m) for pattern, m in spec.targets.items()})
    return dataclasses.replace(spec, method=plain(spec.method))


def _slots(module: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(tensors every file must hold: parameters and persistent buffers, optional buffers)."""
    required = dict(module.state_dict(keep_vars=True))
    optional = {name: buf for name, buf in module.named_buffers() if name not in required}
    return required, optional


def _tensor_problems(module: nn.Module, tensors: dict[str, torch.Tensor], cast: bool) -> list[str]:
    required, optional = _slots(module)
    problems = []
    missing = [k for k in required if k not in tensors]
    unknown = [k for k in tensors if k not in required and k not in optional]
    if missing:
        problems.append(f"tensors missing from the file: {_listed(missing)}")
    if unknown:
        problems.append(f"tensors in the file that this adapter does not have: {_listed(unknown)}")
    for key, value in tensors.items():
        slot = required.get(key, optional.get(key))
        if slot is None:
            continue
        if tuple(value.shape) != tuple(slot.shape):
            problems.append(f"tensor {key}: shape {tuple(value.shape)} in the file, {tuple(slot.shape)} expected")
        fits = value.is_floating_point() and slot.is_floating_point() if cast else value.dtype == slot.dtype
        if not fits:
            problems.append(f"tensor {key}: dtype {value.dtype} in the file, {slot.dtype} expected")
        elif value.is_floating_point() and not bool(torch.isfinite(value).all()):
            problems.append(f"tensor {key} holds NaN or inf values (training diverged, or the file is corrupt)")
    return problems


def _refuse_folded(gm: fx.GraphModule, items: list[tuple[Placement, dict[str, torch.Tensor]]], source: str) -> None:
    """AdapterFileError if an adapter about to be loaded is already folded into gm's weights:
    a group's values, as they would be loaded, have the fingerprint a fold marked (graph/folded.py)."""
    held = marks_in(gm)
    if not held:
        return
    for placement, tensors in items:
        required, _ = _slots(placement.module)
        groups: dict[str, dict[str, torch.Tensor]] = {}
        for key, value in tensors.items():
            if key in required:
                group, _, rest = key.partition(".")
                groups.setdefault(group, {})[rest] = value.to(required[key].dtype)
        folded = [held[print_] for print_ in map(fingerprint_of, groups.values()) if print_ in held]
        if folded:
            raise AdapterFileError(
                f"this model already has adapter {folded[0]!r} folded into its weights (by lfx.load_merged or "
                f"lfx.merge); loading {source} (as {placement.adapter!r}) would add that update a second time "
                "(W + 2·ΔW). Nothing was changed: load adapters into the original weights, or use the model "
                "as it is."
            )


def install(gm: fx.GraphModule, items: list[tuple[Placement, dict[str, torch.Tensor]]], source: str,
            cast: bool = False) -> None:
    """Check every placement and tensor, then inject missing adapters and copy values in.

    `cast=True` converts floating-point values to the adapter's dtype (PEFT files) instead of
    requiring the same dtype. Raises AdapterFileError, with `gm` unchanged, on any difference.
    """
    report = []
    for placement, tensors in items:
        problems = list(placement.problems)
        if placement.module is not None:
            problems += _tensor_problems(placement.module, tensors, cast)
        if problems:
            report += [f"  adapter {placement.adapter!r}:"] + [f"    - {p}" for p in problems]
    if report:
        raise AdapterFileError(
            f"cannot load {source}; nothing was changed. Differences:\n" + "\n".join(report) + "\n"
            "Load it into a graph of the same base model, rewritten with the same spec (or not "
            "yet rewritten under that adapter name, so that the file's spec is applied)."
        )
    _refuse_folded(gm, items, source)
    with torch.random.fork_rng(devices=[]):
        for placement, _ in items:
            if not placement.exists:
                rewrite(gm, _without_data_pass(placement.spec), adapter=placement.adapter)
    container = getattr(gm, CONTAINER)
    with torch.no_grad():
        for placement, tensors in items:
            if placement.swap:
                swap_in(flat_view(gm), placement.adapter, placement.spec, placement.module, placement.group_of, tensors)
                continue
            required, optional = _slots(container[placement.adapter])
            for key, value in tensors.items():
                slot = required.get(key, optional.get(key))
                slot.copy_(like_slot(slot, value.to(slot.dtype)))  # an FSDP2 slot gets this rank's shard
