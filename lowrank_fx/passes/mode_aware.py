"""Make dropout and batch norm follow `.train()` / `.eval()` again.

torch.export bakes the training flag into each op: `aten.dropout(x, p, True)`,
`aten.batch_norm(..., training=True, ...)`, and attention dropout, which models pass as
`scaled_dot_product_attention(..., dropout_p=p if self.training else 0)`. Batch norm's
`num_batches_tracked.add_(1)`, which nn.BatchNorm runs only while training, is captured as
an unconditional `aten.add_` on the buffer. This pass replaces every such node with a call
to a tiny module that reads `self.training`, so the GraphModule switches modes exactly like
the model it came from. Returns the number of nodes replaced.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx, nn

from ..graph.fx_args import target_name
from ..graph.mode_modules import DROPOUT_FUNCTIONS, ModeAttention, ModeBatchNorm, ModeCounter, ModeDropout

aten = torch.ops.aten

_DROPOUTS = {getattr(aten, name).default: name for name in DROPOUT_FUNCTIONS}
CONTAINER = "lowrank_fx_modes"


def _attention(node: fx.Node) -> tuple[nn.Module, tuple] | None:
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal")
    bound: dict[str, Any] = dict(zip(names, node.args), **node.kwargs)
    p = bound.pop("dropout_p", 0.0)
    if not p:
        return None
    tensors = tuple(bound.pop(k, None) for k in names[:4])
    return ModeAttention(float(p), bound), tensors


def _batch_norm_counters(gm: fx.GraphModule) -> set[str]:
    """`<bn>.num_batches_tracked` for every batch norm that runs in training mode with running stats."""
    counters = set()
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is aten.batch_norm.default:
            mean, train = node.args[3], node.args[5]
            if train and isinstance(mean, fx.Node) and mean.op == "get_attr":
                owner = target_name(mean).rpartition(".")[0]
                counters.add(f"{owner}.num_batches_tracked" if owner else "num_batches_tracked")
    return counters


def _is_counter_step(node: fx.Node, counters: set[str]) -> bool:
    if node.target is not aten.add_.Tensor:
        return False
    counter = node.args[0]
    return isinstance(counter, fx.Node) and counter.op == "get_attr" and counter.target in counters


def make_mode_aware(gm: fx.GraphModule) -> int:
    counters = _batch_norm_counters(gm)
    container = nn.Module()
    gm.add_module(CONTAINER, container)
    count = 0
    for node in list(gm.graph.nodes):
        module: nn.Module
        args: tuple
        if node.op != "call_function":
            continue
        if node.target in _DROPOUTS:
            x, p, train = node.args[:3]
            if not train:
                continue  # captured in eval mode on purpose (a frozen submodule): keep it off
            module = ModeDropout(float(p), _DROPOUTS[node.target])
            args = (x,)
        elif node.target is aten.batch_norm.default:
            x, w, b, mean, var, train, momentum, eps = node.args[:8]
            if not train or mean is None:
                continue  # eval-only, or always batch statistics: the mode does not matter
            module = ModeBatchNorm(float(momentum), float(eps))  # aten's momentum is a float
            args = (x, w, b, mean, var)
        elif node.target is aten.scaled_dot_product_attention.default:
            found = _attention(node)
            if found is None:
                continue
            module, args = found
        elif _is_counter_step(node, counters):
            module, args = ModeCounter(), tuple(node.args[:2])
        else:
            continue
        name = f"{node.target.__name__.split('.')[0].rstrip('_')}_{count}"
        container.add_module(name, module)
        with gm.graph.inserting_before(node):
            replacement = gm.graph.call_module(f"{CONTAINER}.{name}", args)
        replacement.meta = dict(node.meta)
        node.replace_all_uses_with(replacement)
        gm.graph.erase_node(node)
        count += 1
    if not count:
        gm.delete_submodule(CONTAINER)
        return 0
    gm.graph.lint()
    gm.recompile()
    return count
