"""`rewrite(model, spec)`: capture the model and inject one named adapter into its graph."""

from __future__ import annotations

from torch import fx

from ..errors import SpecError, TargetError
from ..graph.heads import output_heads
from ..graph.record import CONTAINER, AdapterInfo, Record
from ..graph.targets import Target, find_targets, weight_uses
from ..passes.inject import inject
from ..spec import Spec, _compile
from .capture import capture


def resolve(gm: fx.GraphModule, spec: Spec) -> tuple[dict[str, Target], dict]:
    """All targets of `gm` and the spec's target -> method assignment (validated)."""
    if not isinstance(spec, Spec):
        raise SpecError(f"expected an lfx.Spec, got {type(spec).__name__}; e.g. lfx.Spec(targets=['*.q_proj'], method=lfx.LoRA(rank=8))")
    record = Record.find(gm)
    targets = find_targets(gm, record.aliases if record else None)
    try:
        assignment = spec.assign(list(targets), output_heads(gm, targets))
    except SpecError as err:
        _raise_if_not_linear(gm, spec, targets, err)
        raise
    bound = {method: method.for_graph(gm) for method in set(assignment.values())}
    return targets, {name: bound[method] for name, method in assignment.items()}


def _raise_if_not_linear(gm, spec, targets, err):
    """A pattern that matches a weight which is not linear-like gets a TargetError instead."""
    linear_weights = {t.weight for t in targets.values()}
    for pattern, _ in spec.rules():
        match = _compile(pattern)
        if match is None:
            continue
        for weight, ops in weight_uses(gm).items():
            if weight not in linear_weights and (match(weight) or match(weight.rsplit(".", 1)[0])):
                raise TargetError(
                    f"pattern {pattern!r} matches {weight}, which is used by {', '.join(sorted(set(ops)))}: "
                    "not a linear-like op. Only weights multiplied by an activation (linear, addmm, "
                    "mm, matmul) can be adapted; lfx.plan(...) lists the targets."
                ) from err


def rewrite(model, spec: Spec, example_inputs=None, example_kwargs=None, adapter: str = "default",
            dynamic: bool = True, dynamic_shapes=None) -> fx.GraphModule:
    """Capture `model` and add the adapter `adapter` described by `spec`.

    Returns a GraphModule whose base weights are frozen and whose adapter parameters (this
    adapter's only) require grad. Passing a GraphModule that lowrank_fx already rewrote adds
    a second adapter to it, in place. The graph is unchanged if anything fails.
    """
    if not isinstance(adapter, str) or not adapter.isidentifier():
        raise SpecError(f"adapter name must be a Python identifier such as 'default', got {adapter!r}")
    gm = capture(model, example_inputs, example_kwargs, dynamic=dynamic, dynamic_shapes=dynamic_shapes)
    record = Record.find(gm)
    if adapter in record.adapters:
        raise SpecError(
            f"this graph already has an adapter named {adapter!r}; pass adapter='<another name>' "
            f"(existing: {', '.join(record.adapters)})"
        )
    targets, assignment = resolve(gm, spec)
    groups = inject(gm, adapter, assignment, targets)
    record.adapters[adapter] = AdapterInfo(spec=spec, groups=groups)
    for param in gm.parameters():
        param.requires_grad_(False)
    for param in getattr(gm, CONTAINER)[adapter].parameters():
        param.requires_grad_(True)
    return gm
