"""The KV-cache decode graph of a model, carrying the SAME adapter modules as a training graph.

    decode = decode_graph(model)                       # capture KVDecoder(model) once
    share_adapters(decode, [("a", gm, "a"), ...])      # gm's adapter modules, not copies

Capture: `KVDecoder(model)` (decoder.py) through lowrank_fx's capture (non-strict
torch.export; batch, new tokens and past length dynamic, each one symbol shared by every input).
The wrapper's own `model.` prefix is taken off every
tensor, module and module-stack path, so the decode graph names its weights, and hence its
targets, exactly like a graph captured from `model` itself (`model.layers.0.self_attn.q_proj`).
torch.export's guard check (`_guards_fn`) is dropped: it insists on the example's size
ranges (past >= 2), while the graph itself computes for a past of 0 (the prompt) and a
single new token; tests compare both against the eager model.

Sharing: an adapter belongs to the adapter, not to one capture. For each adapter of a
source graph the same spec is injected into the decode graph, the targets are checked to
agree (a clear error names the ones that differ) and the injected modules are replaced by
the source graph's own `gm.lowrank_fx[adapter]` objects, so training gm changes what the
decode graph computes; a target whose init changed the source's base (PiSSA, ...) reads the
source's residual tensor. `use_base_of` points the decode graph's base weights at the source
graph's (which `lfx.load_merged` never replaces), so a model that had an adapter merged into
it still decodes with its original base.
"""

from __future__ import annotations

from torch import fx, nn
from torch.export import Dim

from ..adapt.capture import capture, tensor_aliases
from ..adapt.hotswap import make_slot
from ..errors import ModelTypeError, SpecError
from ..graph.gates import GATES
from ..graph.module_copy import copy_call_specs
from ..graph.record import CONTAINER, AdapterInfo, Record
from ..graph.targets import find_targets
from ..passes.inject import inject
from ..passes.residual_base import share_residuals
from .decoder import KVDecoder, cache_layout, example_inputs

PREFIX = "model."
LAYOUT = "lowrank_fx_cache_layout"  # decode.meta[LAYOUT]: the CacheLayout
EXAMPLES = "lowrank_fx_decode_examples"  # decode.meta[EXAMPLES]: the example kwargs it was captured with


def _strip(path: str) -> str:
    if path == PREFIX[:-1]:
        return ""
    return path[len(PREFIX):] if path.startswith(PREFIX) else path


def _reroot(gm: fx.GraphModule, model: nn.Module) -> fx.GraphModule:
    """gm with the wrapper's `model.` prefix taken off every name, and without its guard check."""
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn":
            graph.erase_node(node)
    owners: dict[str, object] = {}
    for node in graph.nodes:
        if node.op in ("get_attr", "call_module"):
            new = _strip(node.target)
            if node.op == "get_attr":
                owner, _, attr = node.target.rpartition(".")
                owners[new] = getattr(gm.get_submodule(owner), attr)
            else:
                owners[new] = gm.get_submodule(node.target)
            node.target = new
        stack = node.meta.get("nn_module_stack")
        if stack:
            node.meta["nn_module_stack"] = {
                key: (_strip(path), kind) for key, (path, kind) in stack.items() if path != ""
            }
    decode = fx.GraphModule(owners, graph, class_name="DecodeGraph")
    decode.graph.lint()
    copy_call_specs(gm, decode)
    decode.train(model.training)
    Record.attach(decode, aliases=tensor_aliases(model), state_keys=list(model.state_dict()))
    return decode


def _dims(layers: int) -> dict:
    """The decode graph's dynamic sizes: one batch, one new-token count and one past length for
    every input (48 cache tensors of a 24-layer model share two symbols instead of bringing 4 each:
    a quarter of the capture's time); the mask's length, past + new, is left to torch.export."""
    batch, new, past = Dim("batch"), Dim("new_tokens"), Dim("past")
    cache = {0: batch, 2: past}
    return {"input_ids": {0: batch, 1: new}, "attention_mask": {0: batch, 1: Dim.AUTO},
            "position_ids": {0: batch, 1: new},
            "past_key_values": [{"key": cache, "value": cache} for _ in range(layers)]}


def decode_graph(model: nn.Module) -> fx.GraphModule:
    """Capture KVDecoder(model) as a GraphModule named like `model` (see the module docstring)."""
    layout = cache_layout(model)
    examples = example_inputs(model, layout)
    captured = capture(KVDecoder(model), example_kwargs=examples, dynamic_shapes=_dims(layout.layers))
    decode = _reroot(captured, model)
    decode.meta[LAYOUT] = layout
    decode.meta[EXAMPLES] = examples
    return decode


def _set_tensor(module: nn.Module, name: str, tensor) -> None:
    owner, _, attr = name.rpartition(".")
    target = module.get_submodule(owner) if owner else module
    if attr in target._parameters:
        target._parameters[attr] = tensor
    elif attr in target._buffers:
        target._buffers[attr] = tensor
    else:
        setattr(target, attr, tensor)


def use_base_of(decode: fx.GraphModule, gm: fx.GraphModule) -> int:
    """Point decode's base parameters and buffers at gm's tensors of the same name; returns how many.

    Raises ModelTypeError when a same-named tensor has another shape: then the decode graph
    was captured from another architecture than gm."""
    theirs = dict(gm.named_parameters()) | dict(gm.named_buffers())
    changed = 0
    for name, tensor in list(decode.named_parameters()) + list(decode.named_buffers()):
        if name.startswith((CONTAINER + ".", GATES + ".")) or name not in theirs or theirs[name] is tensor:
            continue
        other = theirs[name]
        if other.shape != tensor.shape:
            raise ModelTypeError(
                f"the model's {name} is {tuple(tensor.shape)}, the graph's is {tuple(other.shape)}: pass the "
                "model the graph was rewritten from"
            )
        _set_tensor(decode, name, other)
        changed += 1
    return changed


def _differ(source_name: str, only_training: set[str], only_decode: set[str]) -> SpecError:
    parts = []
    if only_training:
        parts.append(f"only in the training graph: {', '.join(sorted(only_training)[:6])}")
    if only_decode:
        parts.append(f"only in the decode graph: {', '.join(sorted(only_decode)[:6])}")
    return SpecError(
        f"adapter {source_name!r}: the target names of the decode graph and the training graph differ "
        f"({'; '.join(parts)}). Rewrite the training graph from this same model (its names must agree), "
        "or pass model= the model it was rewritten from."
    )


def _signature(module: nn.Module) -> dict[str, tuple]:
    entries = {name: (tuple(t.shape), t.dtype) for name, t in module.named_parameters()}
    entries.update({f"buffer:{name}": (tuple(t.shape), t.dtype) for name, t in module.named_buffers()})
    entries.update({f"module:{name}": (type(m).__name__,) for name, m in module.named_modules()})
    return entries


def share_adapters(decode: fx.GraphModule, sources: list[tuple[str, fx.GraphModule, str]]) -> None:
    """Give `decode` the adapters `sources` lists: (name in decode, source graph, name there).

    The injected modules are the source graph's own objects afterwards. Raises SpecError
    naming the targets that differ when the two captures do not agree."""
    record = Record.require(decode, "lfx.generate")
    targets = find_targets(decode, record.aliases)
    names = list(targets)
    fresh: list[tuple[str, nn.Module]] = []
    for name, source, source_name in sources:
        info = Record.require(source, "lfx.generate").adapters[source_name]
        spec = info.spec
        if getattr(spec, "train", None):
            raise SpecError(
                f"adapter {source_name!r} trains whole modules (Spec.train={list(spec.train)}); generation "
                "shares LoRA-style adapter modules only. Export or fold that adapter instead."
            )
        wanted = set(info.groups)
        if not wanted <= set(names):
            raise _differ(source_name, wanted - set(names), set())
        # Exactly the source's targets: what "all-linear" left out there is left out here too.
        assignment = spec.assign(names, set(names) - wanted)
        if set(assignment) != wanted:
            raise _differ(source_name, wanted - set(assignment), set(assignment) - wanted)
        bound = {method: method.for_graph(decode) for method in set(assignment.values())}
        groups = inject(decode, name, {n: bound[m] for n, m in assignment.items()}, targets, initialise=False)
        record.adapters[name] = AdapterInfo(spec=spec, groups=groups)
        if info.max_rank is not None:  # a hot-swap slot: padded alike (adapt/hotswap.py)
            make_slot(decode, name, info.max_rank)
        if groups != info.groups:
            moved = sorted(t for t in wanted if groups.get(t) != info.groups.get(t))
            raise SpecError(f"adapter {source_name!r}: targets {moved[:6]} fall into other groups in the decode graph")
        theirs = getattr(source, CONTAINER)[source_name]
        mine = getattr(decode, CONTAINER)[name]
        if _signature(mine) != _signature(theirs):
            differ = sorted(set(_signature(mine).items()) ^ set(_signature(theirs).items()))
            raise SpecError(
                f"adapter {source_name!r} has another layout in the decode graph ({differ[:3]}); "
                "rewrite the training graph from this model with this spec"
            )
        fresh.append((name, theirs))
    for (name, theirs), (_, source, source_name) in zip(fresh, sources):  # only once every check passed
        getattr(decode, CONTAINER)[name] = theirs
        # PiSSA & co: the source's residual base
        groups = Record.require(source, "lfx.generate").adapters[source_name].groups
        share_residuals(decode, source, list(groups), {t: theirs[g].unit(t) for t, g in groups.items()},
                        {t: targets[t].weight for t in groups})
