"""Inline `nn.Linear` modules of a symbolically traced graph into `F.linear` calls.

symbolic_trace keeps `call_module` nodes for leaf modules, which hide their weights.
After this pass a Linear call reads its weight and bias through `get_attr` like an
exported graph does, so target discovery sees it. Returns the number of calls inlined.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import fx, nn


def inline_linear(gm: fx.GraphModule) -> int:
    count = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or type(gm.get_submodule(node.target)) is not nn.Linear:
            continue
        module = gm.get_submodule(node.target)
        with gm.graph.inserting_before(node):
            weight = gm.graph.get_attr(f"{node.target}.weight")
            bias = gm.graph.get_attr(f"{node.target}.bias") if module.bias is not None else None
            linear = gm.graph.call_function(F.linear, (node.args[0], weight, bias))
        node.replace_all_uses_with(linear)
        gm.graph.erase_node(node)
        count += 1
    if count:
        gm.graph.lint()
        gm.recompile()
    return count
