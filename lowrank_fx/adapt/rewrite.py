"""`rewrite(model, spec)`: capture the model and inject one named adapter into its graph."""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Sequence
from typing import Any

from torch import fx, nn

from ..deprecation import api_options
from ..errors import SpecError, TargetError
from ..graph.heads import left_out
from ..graph.record import CONTAINER, AdapterInfo, Record, check_adapter_name
from ..graph.targets import Target, find_targets, weight_uses
from ..passes.checkpoint_layers import checkpoint_layers, checkpointed
from ..passes.eva_calibrate import eva_assignment
from ..passes.inject import inject
from ..passes.layers import candidates, structure, unstructure
from ..passes.train_modules import add_trained, check_trained, drop_trained, refuse_trained_targets, resolve_trained
from ..spec import Spec, _compile
from .capture import capture, source_model
from .hotswap import check_max_rank, make_slot, slot_problems
from .vision_features import warn_unread_layers


def _require_spec(spec) -> None:
    if not isinstance(spec, Spec):
        raise SpecError(f"expected an lfx.Spec, got {type(spec).__name__}; e.g. lfx.Spec(targets=['*.q_proj'], "
                        "method=lfx.LoRA(rank=8))")


def resolve(gm: fx.GraphModule, spec: Spec) -> tuple[dict[str, Target], dict]:
    """All targets of `gm` and the spec's target -> method assignment (validated)."""
    _require_spec(spec)
    record = Record.find(gm)
    targets = find_targets(gm, record.aliases if record else None)
    heads = set(left_out(gm, targets))  # what "all-linear" leaves out: output heads, non-linear ops
    try:
        assignment = spec.assign(list(targets), heads)
    except SpecError as err:
        _raise_if_not_linear(gm, spec, targets, heads, err)
        raise
    assignment = drop_trained(gm, spec, targets, assignment)  # a trained module's weights are not targets
    bound = {method: method.for_graph(gm) for method in set(assignment.values())}
    return targets, {name: bound[method] for name, method in assignment.items()}


def _unmatched(spec: Spec, targets: dict[str, Target], heads: set[str]):
    """(pattern, matcher) of the first pattern of `spec` that matches no target, as assign sees it."""
    for pattern, _ in spec.rules():
        match = _compile(pattern)
        hits = [n for n in targets if (n not in heads if match is None else match(n))]
        if not hits:
            return pattern, match
    return None, None


def _adapted_tensors(gm: fx.GraphModule, targets: dict[str, Target]) -> set[str]:
    """Every target's weight, and any parameter its call sites read directly (its bias)."""
    names = {t.weight for t in targets.values()} | {t.bias for t in targets.values() if t.bias}
    sites = {site for t in targets.values() for site in t.sites}
    for node in gm.graph.nodes:
        if node.name in sites:
            names.update(arg.target for arg in node.all_input_nodes if arg.op == "get_attr")
    return names


def _raise_if_not_linear(gm, spec, targets, heads, err):
    """If the pattern that matched no target matches a non-linear op's weight, raise TargetError."""
    pattern, match = _unmatched(spec, targets, heads)
    if match is None:  # no pattern failed (all excluded), or "all-linear" found nothing
        return
    adapted = _adapted_tensors(gm, targets)
    for weight, ops in weight_uses(gm).items():
        if weight not in adapted and (match(weight) or match(weight.rsplit(".", 1)[0])):
            raise TargetError(
                f"pattern {pattern!r} matches {weight}, which is used by {', '.join(sorted(set(ops)))}: "
                "not a linear-like op. Only weights multiplied by an activation (linear, addmm, "
                f"mm, matmul) can be adapted: drop {pattern!r} from Spec.targets or name a linear layer; "
                "lfx.plan(...) lists the targets."
            ) from err


@api_options(positional=2)
def rewrite(model: nn.Module, spec: Spec, *, example_inputs: tuple[Any, ...] | None = None,
            example_kwargs: dict[str, Any] | None = None, adapter: str = "default", dynamic: bool = True,
            dynamic_shapes: Any = None, cache_dir: str | os.PathLike | None = None,
            layers: str | Sequence[str] | None = None, trace_blocks: bool = True, max_rank: int | None = None,
            calibration: Callable[[fx.GraphModule], Any] | None = None) -> fx.GraphModule:
    """Capture `model` and add the adapter `adapter` described by `spec`.

    The result's base weights are frozen and its adapter parameters (this adapter's only)
    require grad. The graph shares the model's weights rather than copying them, so freezing
    them sets `requires_grad=False` on the model's own parameters too; nothing else of `model`
    changes, and every submodule keeps its train/eval flag. Example arguments that hold no
    tensor (`use_cache=False`) become defaults of the graph's forward (see capture.py).

    In place or not: a plain `nn.Module` gives a new graph. A GraphModule that lowrank_fx
    already rewrote gets the adapter added IN PLACE (as `combine_adapters` and
    `load_adapters` add theirs) and is returned itself, so one graph holds several adapters;
    it is unchanged if anything fails. A structured graph keeps its blocks when another
    adapter is added.

    Targets in vision layers a LLaVA-shaped model never feeds its language model (those after
    config.vision_feature_layer) are adapted with a warning (vision_features.py).

    Args:
        model: the model (an `nn.Module`), or a graph from an earlier `rewrite` to add a second
            adapter to.
        spec: which targets to adapt and with which method.
        example_inputs: positional example arguments for the capture (token ids of shape
            (batch, seq), ...); None for a model called without arguments or a rewritten graph.
        example_kwargs: keyword example arguments (`attention_mask=...`, `use_cache=False`).
        adapter: the new adapter's name (default "default"); names must be unique in a graph.
        dynamic: mark the batch and sequence dimensions dynamic (True) or trace the example's
            exact shapes (False).
        dynamic_shapes: torch.export's own `dynamic_shapes` for the example arguments, used
            instead of `dynamic`'s choice.
        cache_dir: a directory (else $LOWRANK_FX_CACHE) that keeps the captured graph,
            without weights, on disk for the next process; within a process a capture is
            reused anyway (`plan` then `rewrite` trace once), each call getting its own graph.
        layers: "auto" gives the graph its layers back: each repeated block (decoder layer,
            ViT block, ...) becomes a call_module submodule owning its weights and adapters,
            for FSDP2 per-layer sharding and `lfx.checkpoint_layers`; a list of glob patterns
            over module paths names the blocks instead (passes/layers.py). Outputs and every
            name a user sees (targets, adapter files, merged state, PEFT, gates) are those of
            the flat graph, the default (None).
        trace_blocks: True (default): torch.export traces one child of each kind of a repeated
            module list (a decoder's layers) and the others are written as copies over their
            own weights, so capture costs about the same at 4 or 80 layers
            (graph/block_lists.py, passes/repeat_blocks.py); False traces every child.
        max_rank: R makes the adapter a hot-swap slot (adapt/hotswap.py): its LoRA factors are
            padded with zeros to rank R and its scale is a buffer, so loading any LoRA adapter
            of rank <= R into it (`load_adapters` / `load_peft` under the same adapter name)
            changes values only, and a compiled graph does not recompile.
        calibration: a function run(graph) that calls the graph on sample data, for
            data-driven inits (LoRA(init="corda"), PEFT's run_model): it runs once, before the
            adapter is added (LoRA(init="eva"): again while its components have not converged,
            as PEFT cycles its data).

    Returns:
        The adapted GraphModule: a new one, or `model` itself when it was a rewritten graph.

    Raises:
        ModelTypeError: `model` is not an `nn.Module`.
        CaptureError: torch.export could not capture the model, or the example arguments do
            not fit its forward (the message says where).
        SpecError: a bad spec, adapter name, `layers` or `max_rank`, a pattern that matches
            nothing, or an adapter name the graph already has.
        TargetError: a pattern names a weight that is not linear-like (a norm, a bias).
        QuantizedBaseError: a quantized layer whose format cannot be trained over.
    """
    check_adapter_name(adapter)
    _require_spec(spec)
    check_max_rank(max_rank)
    gm = capture(model, example_inputs, example_kwargs, dynamic=dynamic, dynamic_shapes=dynamic_shapes,
                 cache_dir=cache_dir, trace_blocks=trace_blocks)
    record = Record.require(gm, "lfx.rewrite")  # capture attached it
    recompute = checkpointed(gm)
    kept = unstructure(gm)  # a graph with blocks is flat while an adapter is added, then structured again
    if layers is not None and not kept:
        candidates(gm, layers)  # a bad layers= is refused before anything changes
    try:
        _add_adapter(gm, record, spec, adapter, max_rank, calibration)
        warn_unread_layers(source_model(gm), list(record.adapters[adapter].groups))
    finally:
        if kept:
            structure(gm, kept)
            if recompute:
                checkpoint_layers(gm)
    if layers is not None and not kept:
        structure(gm, layers)
    return gm


def _add_adapter(gm: fx.GraphModule, record: Record, spec: Spec, adapter: str, max_rank: int | None = None,
                 calibration=None) -> None:
    if adapter in record.adapters:
        raise SpecError(
            f"this graph already has an adapter named {adapter!r}; pass adapter='<another name>' "
            f"(existing: {', '.join(record.adapters)})"
        )
    try:
        targets, assignment = resolve(gm, spec)
    except (SpecError, TargetError) as err:
        refuse_trained_targets(gm, spec, err)  # a module another adapter trains is no target here
        raise
    trained = resolve_trained(gm, spec)
    check_trained(gm, adapter, trained)
    if max_rank is not None:
        slot_problems(adapter, assignment, targets, spec, max_rank)  # refused before the graph changes
    ranked, components = eva_assignment(gm, assignment, targets, calibration)
    if any(ranked.get(name) is not method for name, method in assignment.items()):
        # EVA gave other ranks (or none): the recorded spec names each target with its own
        spec = dataclasses.replace(spec, method=None, targets={f"re:^{re.escape(name)}$": method
                                                               for name, method in ranked.items()})
        assignment = ranked
    groups = inject(gm, adapter, assignment, targets, calibration, components=components) if assignment else {}
    add_trained(gm, adapter, trained)  # Spec.train: the adapter's own copies (passes/train_modules.py)
    record.adapters[adapter] = AdapterInfo(spec=spec, groups=groups)
    for param in gm.parameters():
        param.requires_grad_(False)
    if max_rank is not None:
        make_slot(gm, adapter, max_rank)
    for param in getattr(gm, CONTAINER)[adapter].parameters():
        param.requires_grad_(True)
