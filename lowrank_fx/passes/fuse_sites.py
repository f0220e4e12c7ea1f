"""The training form of LoRA and RandLoRA sites: exact rewrites that read each activation once.

`rewrite` leaves one unit per site, y' = addcmul(y, s · (x Aᵀ) Bᵀ, g), which is what folding,
export and adapter files read. Per step that form reads x once per site and writes and reads
the rank-r product, Δy (tokens, out) and y' (tokens, out) separately. The rank-r matmuls are
memory-bound, so those passes are most of an adapter's cost. `fuse_sites(gm)` returns a graph
over the same modules and tensors (training it trains `gm`'s adapters) where

  - the LoRA units of one adapter that read the same activation x (q, k, v; gate, up) compute
    their first factor together, h = x [A_1; …; A_n]ᵀ  (…, n·r): x is read once;
  - each site is one matmul with the add inside, y'_i = y_i + h_i (g · s_i · B_i)ᵀ  (`addmm`):
    the scale s_i and gate g fold into B_i (out × r work), and Δy never exists.

RandLoRA sites on a plain dense linear (`aten.linear` with a frozen float weight; not quantized,
no conv or embedding, no row slice, no dropout) become the other kind of fused site: the base
product and the unit give way to y' = x (W + g·ΔW)ᵀ + b, one product of W's size
(methods/randlora_merged.py), with form="auto" choosing per pass between that and the base
product plus the factored Δy; form="factored" keeps the unit.

A graph structured into layer blocks (passes/layers.py, checkpointed or not) gets each
block's sites rewritten inside a copy of the block, installed at the block's path in the new
graph only. Of LoRA, only plain units on linear sites take part: no dropout (its mask differs per
unit), no bias, no DoRA, one dtype, no row slice (MultiheadAttention's packed projection). Every
other site keeps its unit. The weight must be frozen when fuse_sites runs (the merged product
gives no dW). The rewrite is exact up to float rounding order: the same sums.
"""

from __future__ import annotations

import copy
import operator
from typing import cast

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..graph.fx_args import arg_node, target_name
from ..graph.module_copy import over_graph
from ..graph.op_kinds import LinearKind
from ..graph.quantized import module_attr
from ..graph.record import KEY, require_graph
from ..methods.lora_unit import LoRAUnit
from ..methods.randlora import RandLoRAUnit
from ..methods.randlora_merged import randlora_linear
from ..noise import quiet_third_party
from .layers import block_call


def stacked_down(x: torch.Tensor, *factors: torch.Tensor) -> torch.Tensor:
    """x [A_1; …; A_n]ᵀ: (…, in) -> (…, n·r)."""
    return F.linear(x, factors[0] if len(factors) == 1 else torch.cat(factors))


def lora_site(y: torch.Tensor, h: torch.Tensor, up: torch.Tensor, gate: torch.Tensor, scale) -> torch.Tensor:
    """y + h (g · s · B)ᵀ as one addmm over the flattened rows: y (…, out), h (…, r), B (out, r)."""
    out = torch.addmm(y.reshape(-1, y.shape[-1]), h.reshape(-1, h.shape[-1]), (up * (gate * scale)).t())
    return out.reshape(y.shape)


def _fusable(gm: fx.GraphModule, delta: fx.Node) -> LoRAUnit | None:
    """The delta node's unit, if it is a plain LoRA unit whose add can take the fused form."""
    unit = gm.get_submodule(target_name(delta)) if delta.op == "call_module" else None
    if type(unit) is not LoRAUnit or not isinstance(unit.op_kind, LinearKind) or unit.lora_B_bias is not None:
        return None
    if not isinstance(unit.dropout, nn.Identity) or len(delta.args) != 1 or len(delta.users) != 1:
        return None
    add = next(iter(delta.users))
    if add.target is not torch.ops.aten.addcmul.default or add.args[1] is not delta:
        return None
    x = arg_node(delta).meta.get("val")  # y has x's dtype: the base op's output, or another adapter's sum
    if not isinstance(x, torch.Tensor) or x.dtype != unit.lora_A.dtype:
        return None
    return unit


def _merge_randlora(gm: fx.GraphModule, delta: fx.Node) -> None:
    """Replace y = aten.linear(x, W, b), the unit and y + g·Δy with randlora_linear, where the
    delta node is a RandLoRA unit's on a plain dense linear with a frozen weight of the unit's shape."""
    unit = gm.get_submodule(target_name(delta)) if delta.op == "call_module" else None
    if (type(unit) is not RandLoRAUnit or unit.form == "factored" or not isinstance(unit.op_kind, LinearKind)
            or not isinstance(unit.dropout, nn.Identity) or len(delta.users) != 1):
        return
    add = next(iter(delta.users))
    if add.target is not torch.ops.aten.addcmul.default or add.args[1] is not delta:
        return
    base, x, gate = add.args[0], delta.args[0], add.args[2]
    if (not isinstance(base, fx.Node) or base.target is not torch.ops.aten.linear.default or len(base.users) != 1
            or base.args[0] is not x or base.kwargs):
        return
    weight, bias = base.args[1], (base.args[2] if len(base.args) > 2 else None)
    if (not isinstance(weight, fx.Node) or weight.op != "get_attr"
            or (bias is not None and (not isinstance(bias, fx.Node) or bias.op != "get_attr"))):
        return
    W, small = module_attr(gm, target_name(weight)), unit.gamma.shape[1]
    shape = (unit.big, small) if unit.tall else (small, unit.big)
    value = base.meta.get("val")  # the base product's output, of x's dtype (x may be another site's sum)
    if (not isinstance(W, nn.Parameter) or W.requires_grad or W.dtype != unit.lam.dtype or tuple(W.shape) != shape
            or not isinstance(value, torch.Tensor) or value.dtype != W.dtype):
        return
    with gm.graph.inserting_before(add):
        lam, gamma = gm.graph.get_attr(f"{delta.target}.lam"), gm.graph.get_attr(f"{delta.target}.gamma")
        new = gm.graph.call_function(randlora_linear, (x, weight, bias, lam, gamma, *delta.args[1:], gate, unit.big,
                                                       unit.tall, float(unit.scale), unit.form))
    new.meta.update({k: v for k, v in add.meta.items() if k != KEY})
    add.replace_all_uses_with(new)
    for node in (add, delta, base):
        gm.graph.erase_node(node)


def _install(root: nn.Module, path: str, module: nn.Module) -> None:
    """Put `module` at `path` of `root` (whose parents on that path are its own: GraphModule copies
    make fresh ones)."""
    owner, _, leaf = path.rpartition(".")
    setattr(root.get_submodule(owner) if owner else root, leaf, module)


def fuse_sites(gm: fx.GraphModule) -> fx.GraphModule:
    """A graph computing what `gm` computes, over `gm`'s own modules and tensors, with its LoRA
    and RandLoRA sites in the training form above. `gm` itself is unchanged."""
    require_graph(gm, "fuse_sites")
    with quiet_third_party():
        fused = over_graph(gm, copy.deepcopy(gm.graph))
    for node in list(fused.graph.nodes):
        found = block_call(fused, node)
        if found is not None:
            _install(fused, found[0], fuse_sites(cast(fx.GraphModule, fused.get_submodule(found[0]))))
    for node in list(fused.graph.nodes):
        if node.meta.get(KEY, {}).get("role") == "delta":
            _merge_randlora(fused, node)
    order = {node: i for i, node in enumerate(fused.graph.nodes)}
    groups: dict[tuple[str, fx.Node], list[tuple[fx.Node, LoRAUnit]]] = {}
    for node in list(fused.graph.nodes):
        if node.meta.get(KEY, {}).get("role") == "delta":
            unit = _fusable(fused, node)
            if unit is not None:
                groups.setdefault((node.meta[KEY]["adapter"], node.args[0]), []).append((node, unit))
    for (_, x), sites in groups.items():
        first = min((delta for delta, _ in sites), key=order.__getitem__)
        with fused.graph.inserting_before(first):
            factors = [fused.graph.get_attr(f"{delta.target}.lora_A") for delta, _ in sites]
            h = fused.graph.call_function(stacked_down, (x, *factors))
            ranks = [unit.lora_A.shape[0] for _, unit in sites]
            parts = fused.graph.call_function(torch.split, (h, ranks, -1)) if len(sites) > 1 else None
        for i, (delta, unit) in enumerate(sites):
            add = next(iter(delta.users))
            y, _, gate = add.args
            with fused.graph.inserting_before(add):
                part = h if parts is None else fused.graph.call_function(operator.getitem, (parts, i))
                up = fused.graph.get_attr(f"{delta.target}.lora_B")
                # a hot-swap slot's scale is a buffer (adapt/hotswap.py): read, not baked in
                scale = fused.graph.get_attr(f"{delta.target}.scale") if "scale" in unit._buffers else float(unit.scale)
                new = fused.graph.call_function(lora_site, (y, part, up, gate, scale))
            new.meta.update({k: v for k, v in add.meta.items() if k != KEY})
            add.replace_all_uses_with(new)
            fused.graph.erase_node(add)
            fused.graph.erase_node(delta)
    fused.graph.lint()
    fused.recompile()
    return fused
