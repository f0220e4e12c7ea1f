"""Drop runtime assertions, and what only they read, from a graph about to be exported to ONNX.

A model's checks on values become assertion nodes in a captured graph. LLaVA checks that the
number of image tokens in input_ids matches the image features:

    %eq    = aten.eq.Tensor(%tokens_times_hidden, %feature_count)
    %all   = aten._is_all_true(%eq)                  (no ONNX translation)
    %u0    = aten.item(%all)
    %ge    = operator.ge(%u0, 1)
    %check = aten._assert_scalar(%ge, "Runtime assertion failed ...")

ONNX has no assertion op, and the exporter fails on the ops that compute the checked value.
`drop_assertions` erases each assertion node, then every node that only fed assertions
(walking back while a node has no other user). The tensors the model returns are unchanged; the
ONNX model no longer checks the condition (a PyTorch graph keeps its assertions: only the
export's own copy is passed through here).
"""

from __future__ import annotations

import torch
from torch import fx

aten = torch.ops.aten
ASSERTIONS = {aten._assert_scalar.default, aten._assert_async.default, aten._assert_async.msg}


def has_assertions(graph: fx.Graph) -> bool:
    return any(node.op == "call_function" and node.target in ASSERTIONS for node in graph.nodes)


def drop_assertions(gm: fx.GraphModule) -> int:
    """Erase gm's assertion nodes and the computations read by them only; the count erased."""
    assertions = [node for node in gm.graph.nodes if node.op == "call_function" and node.target in ASSERTIONS]
    pending, erased = list(assertions), set()
    while pending:
        node = pending.pop()
        if node in erased or node.users or node.op != "call_function":
            continue
        if node.target not in ASSERTIONS and node.is_impure():  # an in-place write stays
            continue
        inputs = node.all_input_nodes
        gm.graph.erase_node(node)
        erased.add(node)
        pending.extend(inputs)
    if erased:
        gm.graph.lint()
        gm.recompile()
    return len(erased)
