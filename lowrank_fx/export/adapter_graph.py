"""Which adapter tensors become ONNX inputs, under which names, and the graphs that read them.

Generic over `methods.base`: an adapter's **parameters** are what an adapter file carries;
its **buffers** (RandLoRA's random bases) are constants of the graph. Each parameter is one
ONNX input, named after its target (`model.layers.0.self_attn.q_proj.lora_A`) or, for a
parameter a group shares across targets, after its group (`lorta_32x32.A`).

A unit's float `scale` (alpha / r for LoRA, LoRTA and RandLoRA) is an input too,
`<target>.scale` of shape (1,) (ORT adapter files hold no 0-d tensors), so adapters
sharing one graph may differ in rank and alpha.

Rank axes: a Unit or AdapterGroup may declare `rank_axes = {parameter name: axis}`. Such
an axis is dynamic in the ONNX graph and its default is EMPTY (size 0): no adapter means
no update at about no cost. Every other input keeps its shape and defaults to zeros, which
is also no update for these methods, whose update is a product of their parameters (and
of the scale). A method that declares nothing still exports, with fixed ranks.

Trained modules (`Spec.train`, methods/trained.py) are inputs named like the model's own
parameters (`classifier.weight`), whose default is the BASE value (`Unit.neutral_value`): no
adapter means the base module.
"""

from __future__ import annotations

import copy
import dataclasses

import torch
from torch import fx, nn

from ..errors import ExportError
from ..graph.fx_args import arg_node
from ..graph.gates import ungate
from ..graph.module_copy import over_graph
from ..graph.record import CONTAINER, KEY, Record
from ..methods.base import AdapterGroup, Unit
from ..noise import quiet_third_party

SCALE = "scale"


@dataclasses.dataclass
class AdapterInput:
    name: str  # ONNX input name
    path: str  # the tensor's name inside the export graph (for functional_call)
    owner: str  # target or group name: the inputs of one owner come and go together
    rank_axis: int | None
    default: torch.Tensor | None = None  # the value meaning "no adapter", when not empty / zeros


def adapter_names(gm: fx.GraphModule) -> list[str]:
    record = Record.find(gm)
    return list(record.adapters) if record is not None else []


def _unit_scale(unit: nn.Module) -> float | None:
    value = vars(unit).get(SCALE)
    buffer = unit._buffers.get(SCALE)
    if buffer is not None and buffer.dim() == 0:  # a hot-swap slot's scale (adapt/hotswap.py)
        return float(buffer)
    return value if isinstance(value, float) else None


def _scale_dtype(unit: nn.Module, group: nn.Module) -> torch.dtype:
    """The dtype of the unit's parameters (or its group's, for units without own ones)."""
    return next((p.dtype for p in unit.parameters()), None) or next(group.parameters()).dtype


def _entries(gm: fx.GraphModule, adapter: str):
    """(AdapterInput, tensor) for every input of `adapter`, in a fixed order."""
    container = getattr(gm, CONTAINER)[adapter]
    for group_name, group in container.items():
        prefix = f"{CONTAINER}.{adapter}.{group_name}"
        axes = group.rank_axes
        for local, param in group.named_parameters():
            if not local.startswith("units."):
                yield AdapterInput(f"{group_name}.{local}", f"{prefix}.{local}", group_name, axes.get(local)), param
        names = {key: name for name, key in zip(group.target_names, group.units.keys())}
        for key, unit in group.units.items():
            target = names[key]
            axes = unit.rank_axes
            for local, param in unit.named_parameters():
                default = unit.neutral_value(local, gm)
                yield AdapterInput(f"{target}.{local}", f"{prefix}.units.{key}.{local}", target, axes.get(local),
                                   default), param
            scale = _unit_scale(unit)
            if scale is not None:
                yield (AdapterInput(f"{target}.{SCALE}", f"{prefix}.units.{key}.{SCALE}", target, None),
                       torch.tensor([scale], dtype=_scale_dtype(unit, group)))


def adapter_inputs(gm: fx.GraphModule, adapter: str) -> list[AdapterInput]:
    return [entry for entry, _ in _entries(gm, adapter)]


def adapter_tensors(gm: fx.GraphModule, adapter: str) -> dict[str, torch.Tensor]:
    """{ONNX input name: value} of `adapter`: the contents of its adapter file."""
    return {entry.name: tensor.detach() for entry, tensor in _entries(gm, adapter)}


def check_adapter(gm: fx.GraphModule, adapter: str) -> None:
    names = adapter_names(gm)
    if adapter not in names:
        raise ExportError(
            f"this graph has no adapter named {adapter!r}; "
            + (f"its adapters are {', '.join(map(repr, names))}" if names else
               "it has none (lfx.rewrite(model, spec, ...) adds one)")
        )


def _structure(module: nn.Module) -> dict:
    """What must be equal for two adapters to share a graph, besides their parameters. How the
    factors were initialised does not matter; a base the init changed (PiSSA's residual, the
    adapter's own) is never shared."""
    plain = {k: v for k, v in vars(module).items()
             if not k.startswith("_") and k not in ("training", SCALE, "init", "initial_factors", "residual")}
    residual = getattr(module, "residual", None)
    return {"type": type(module).__name__, **plain, "residual": None if residual is None else id(residual)}


def shared_graph_problem(gm: fx.GraphModule, template: str, other: str) -> str | None:
    """Why `other` cannot use the ONNX graph exported for `template` (None if it can)."""
    a, b = getattr(gm, CONTAINER)[template], getattr(gm, CONTAINER)[other]
    if list(a.keys()) != list(b.keys()):
        return f"its groups {list(b.keys())} differ from {list(a.keys())}"
    modules_a, modules_b = dict(a.named_modules()), dict(b.named_modules())
    if list(modules_a) != list(modules_b):
        return "it adapts other targets"
    for name, module in modules_a.items():
        if isinstance(module, (Unit, AdapterGroup)) and _structure(module) != _structure(modules_b[name]):
            return f"{name or 'its layout'} is configured differently"
    for (name, buf_a), (_, buf_b) in zip(a.named_buffers(), b.named_buffers()):
        if buf_a.shape != buf_b.shape or not torch.equal(buf_a, buf_b):
            return f"its constant {name} differs (another seed or size?)"
    for (entry, t_a), (_, t_b) in zip(_entries(gm, template), _entries(gm, other)):
        fixed = [d for i, d in enumerate(t_a.shape) if i != entry.rank_axis]
        fixed_b = [d for i, d in enumerate(t_b.shape) if i != entry.rank_axis]
        if t_a.dtype != t_b.dtype or fixed != fixed_b or t_a.dim() != t_b.dim():
            return f"its {entry.name} is {tuple(t_b.shape)} {t_b.dtype}, not {tuple(t_a.shape)} {t_a.dtype}"
    return None


def copy_graph(gm: fx.GraphModule, keep: list[str]) -> tuple[fx.GraphModule, fx.Graph]:
    """A new GraphModule over a copy of gm's graph that keeps only the adapters in `keep`.

    It shares gm's tensors and modules; the caller may replace adapter containers. Gates are
    dropped (every kept adapter is applied; see gates.ungate).
    """
    with quiet_third_party():
        graph = copy.deepcopy(gm.graph)
    dropped = [n for n in tagged_in(graph) if n.meta[KEY]["adapter"] not in keep]
    for node in dropped:
        if node.meta[KEY]["role"] in ("add", "select"):  # y + Δy -> y; a trained module's select -> its base
            node.replace_all_uses_with(arg_node(node))
    for node in reversed(dropped):
        graph.erase_node(node)
    ungate(graph)
    new = over_graph(gm, graph)
    if keep:  # the kept adapters' own containers, as ModuleDicts like gm's
        setattr(new, CONTAINER, nn.ModuleDict({name: getattr(gm, CONTAINER)[name] for name in keep}))
    record = Record.find(gm)
    if record is not None:
        new.meta[KEY] = dataclasses.replace(record, adapters={k: v for k, v in record.adapters.items() if k in keep})
    return new, graph


def tagged_in(graph: fx.Graph) -> list[fx.Node]:
    return [n for n in graph.nodes if KEY in n.meta]


def adapter_graph(gm: fx.GraphModule, adapter: str) -> fx.GraphModule:
    """gm with only `adapter`, whose unit scales are buffers (so they can be swapped)."""
    new, _ = copy_graph(gm, [adapter])
    container = copy.deepcopy(getattr(gm, CONTAINER)[adapter])
    for group in container.values():
        for unit in group.units.values():
            scale = _unit_scale(unit)
            if scale is not None:
                delattr(unit, SCALE)
                unit.register_buffer(SCALE, torch.tensor([scale], dtype=_scale_dtype(unit, group)))
    getattr(new, CONTAINER)[adapter] = container
    return new

