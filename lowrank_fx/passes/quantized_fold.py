"""Folding adapters into quantized layers.

By default a quantized target folds to a **dense** layer: its weight is dequantized (the
region's own output on the identity, graph/quantized.py), ΔW is added in fp32, and the region
becomes `aten.linear(x, W + ΔW, b)` with the dense weight under the target's weight name.
This is exact: the folded graph computes what the adapted graph computes, as the dense twin
plus ΔW does.

With `requantize=True` the sum is quantized again in the base's own format (same block
sizes: graph/quant_formats.py) and the region keeps its nodes, now reading the new tensors.
Rounding W + ΔW to the base's grid loses part of the update, so the result is measured: the
folded graph and the adapted graph run on the capture's own examples, and a
`RequantizeReport` gives the relative output error and the share of the update's effect that
was lost. Above `tolerance` a `RequantizeWarning` says so.
"""

from __future__ import annotations

import dataclasses
import warnings

import torch
from torch import fx, nn
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from ..errors import MergeError
from ..graph.gates import active_adapters, set_active_adapters
from ..graph.quant_formats import requantize as requantize_tensor
from ..graph.quantized import EXAMPLES, SWAPPED_LAYERS, Region, find_regions, module_attr

aten = torch.ops.aten
REPORT = "lowrank_fx_requantize"  # meta key (and attribute) of the report on a requantized graph or model


class RequantizeWarning(UserWarning):
    """Requantizing the folded weights changed the model's output by more than the tolerance.

    Issued by `lfx.merge(gm, requantize=True)` and `lfx.load_merged`; filter it with
    `warnings.simplefilter("error", lfx.RequantizeWarning)` to make it an error.

    Args:
        message: the measured error against the tolerance, and what to do.
    """


@dataclasses.dataclass
class RequantizeReport:
    """What requantizing W + ΔW cost, measured on the capture's examples (eval mode)."""

    output_error: float  # ||y_requantized - y_adapted|| / ||y_adapted||
    update_lost: float  # ||y_requantized - y_adapted|| / ||y_adapted - y_base||: share of the update's effect lost
    tolerance: float
    targets: int  # quantized targets requantized
    examples: str  # the example shapes it ran on

    def __str__(self) -> str:
        return (f"requantized {self.targets} quantized targets: output error {self.output_error:.2e} "
                f"(relative, on the capture examples {self.examples}); {self.update_lost:.1%} of the "
                f"update's effect on the output lost to rounding; tolerance {self.tolerance:g}")


def _set(gm: fx.GraphModule, path: str, value: torch.Tensor) -> None:
    owner, _, leaf = path.rpartition(".")
    module = gm.get_submodule(owner) if owner else gm
    if leaf in module._buffers:
        module._buffers[leaf] = value.detach()
    else:
        module._parameters.pop(leaf, None)
        module.register_parameter(leaf, nn.Parameter(value.detach(), requires_grad=False))


def region_bias(gm: fx.GraphModule, region: Region) -> str | None:
    """The bias parameter the region adds: its one plain float (out,) parameter, if any."""
    found = [r for r in region.roots if isinstance(module_attr(gm, r), nn.Parameter) and not is_traceable_wrapper_subclass(module_attr(gm, r))
             and module_attr(gm, r).is_floating_point() and tuple(module_attr(gm, r).shape) == (region.out_features,)]
    return found[0] if len(found) == 1 else None


def erase_dead(gm: fx.GraphModule, candidates: list[fx.Node]) -> None:
    """Erase the candidates (and what only they read) once nothing uses them."""
    pending = list(candidates)
    while pending:
        changed = False
        for node in list(pending):
            if node.graph is not gm.graph or node.op in ("placeholder", "output"):
                pending.remove(node)
            elif not node.users:
                inputs = node.all_input_nodes
                gm.graph.erase_node(node)
                pending.remove(node)
                pending.extend(n for n in inputs if n not in pending and n.op in ("call_function", "get_attr"))
                changed = True
        if not changed:
            break


def drop_unread(gm: fx.GraphModule, paths: list[str], keep: set[str]) -> None:
    read = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for path in paths:
        if path in read or path in keep:
            continue
        owner, _, leaf = path.rpartition(".")
        module = gm.get_submodule(owner) if owner else gm
        module._parameters.pop(leaf, None)
        module._buffers.pop(leaf, None)


def fold_dense(gm: fx.GraphModule, target, region: Region, merged: torch.Tensor, bias: torch.Tensor | None) -> None:
    """Replace the region by aten.linear(x, merged, b): `merged` (out, in) under the target's weight
    name; `bias` the new bias value, or None to keep the region's own bias parameter."""
    nodes = {n.name: n for n in gm.graph.nodes}
    output, activation = nodes[region.output], nodes[region.activation]
    bias_path = region_bias(gm, region)
    if bias is not None and bias_path is None:
        bias_path = f"{region.path}.bias"
    _set(gm, target.weight, merged)
    if bias is not None:
        _set(gm, bias_path, bias)
    with gm.graph.inserting_before(output):
        weight = gm.graph.get_attr(target.weight)
        args = (activation, weight) if bias_path is None else (activation, weight, gm.graph.get_attr(bias_path))
        linear = gm.graph.call_function(aten.linear.default, args)
    linear.meta["nn_module_stack"] = output.meta.get("nn_module_stack", {})
    if "val" in output.meta:
        linear.meta["val"] = output.meta["val"]
    output.replace_all_uses_with(linear)
    erase_dead(gm, [nodes[name] for name in reversed(region.nodes)])
    drop_unread(gm, region.roots, keep={target.weight} | ({bias_path} if bias_path else set()))


def fold_requantized(gm: fx.GraphModule, target, region: Region, merged: torch.Tensor, bias: torch.Tensor | None) -> None:
    """Quantize `merged` in the base's own format and let the region read the new tensors."""
    old = module_attr(gm, target.weight)
    swapped = gm.meta.get(SWAPPED_LAYERS, {}).get(region.path)
    if is_traceable_wrapper_subclass(old):
        try:
            new = requantize_tensor(old, merged)
        except NotImplementedError as err:
            raise MergeError(str(err)) from None
        _set(gm, target.weight, new)
    elif swapped is not None:
        for name, tensor in swapped.requantize(merged).items():
            _set(gm, f"{region.path}.{name}", tensor)
    else:
        raise MergeError(
            f"{target.name}: lowrank_fx cannot requantize a {target.kind.scheme} weight; fold to dense "
            "weights (lfx.merge(gm) without requantize=True)"
        )
    if bias is not None:
        path = region_bias(gm, region)
        if path is None:
            raise MergeError(f"{target.name}: the update has a bias (LoRA bias=True) and the quantized layer has none "
                             "to add it to; fold to dense weights (lfx.merge(gm))")
        _set(gm, path, bias)


def regions_by_output(gm: fx.GraphModule) -> dict[str, Region]:
    return {r.output: r for r in find_regions(gm)}


def _outputs(value) -> list[torch.Tensor]:
    leaves, _ = torch.utils._pytree.tree_flatten(value)
    return [t.detach().float() for t in leaves if isinstance(t, torch.Tensor) and t.is_floating_point()]


def _run(module, examples):
    """The module's floating outputs on the examples, in eval mode (every submodule's own flag is
    restored after). bitsandbytes' 4-bit layers stay in their mode: in eval mode on CPU they repack
    their weight in place for another kernel (and fail on layers narrower than a block)."""
    args, kwargs = examples
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    for m, training in modes:
        if type(m).__module__.startswith("bitsandbytes"):
            m.training = training
    try:
        with torch.no_grad():
            return _outputs(module(*args, **kwargs))
    finally:
        for m, training in modes:
            m.training = training


def _norm(tensors) -> float:
    return float(torch.sqrt(sum((t.double() ** 2).sum() for t in tensors))) if tensors else 0.0


def measure(adapted: fx.GraphModule, candidate, targets: int, tolerance: float, examples=None) -> RequantizeReport:
    """Run `candidate` (a folded graph or the original model) and `adapted` on the capture examples."""
    examples = examples if examples is not None else adapted.meta.get(EXAMPLES)
    if examples is None:
        raise MergeError(
            "requantize=True measures the requantized model on the capture's examples, and this graph "
            "has none (captured without example_inputs / example_kwargs); fold to dense weights instead"
        )
    reference = _run(adapted, examples)
    active = active_adapters(adapted)
    set_active_adapters(adapted, [])
    try:
        base = _run(adapted, examples)
    finally:
        set_active_adapters(adapted, active)
    got = _run(candidate, examples)
    if len(got) != len(reference):
        raise MergeError("the requantized model's outputs do not match the graph's; was it captured from another model?")
    diff = _norm([g - r for g, r in zip(got, reference)])
    effect = _norm([r - b for r, b in zip(reference, base)])
    shapes = ", ".join("x".join(map(str, t.shape)) for t in torch.utils._pytree.tree_leaves(examples)
                       if isinstance(t, torch.Tensor))
    report = RequantizeReport(output_error=diff / max(_norm(reference), 1e-30),
                              update_lost=diff / effect if effect > 0 else 0.0,
                              tolerance=tolerance, targets=targets, examples=f"({shapes})")
    if report.output_error > tolerance:
        warnings.warn(f"{report}: above the tolerance. The dense fold (requantize=False) is exact.",
                      RequantizeWarning, stacklevel=3)
    return report
