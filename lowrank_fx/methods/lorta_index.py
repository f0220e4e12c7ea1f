"""Where a target sits in LoRTA's tensor: its layer, its matrix type, and the head size.

Layer and matrix type come from the target name. `layer_pattern` (a regex) is searched in
the name; the name up to the end of its first match is the *layer key*, the rest is the
*matrix key*:

    model.layers.3.self_attn.q_proj        -> layer "model.layers.3",  matrix "self_attn.q_proj"
    transformer.h.0.attn.c_attn            -> layer "transformer.h.0", matrix "attn.c_attn"
    encoder.layer.1.attention.self.query   -> layer "encoder.layer.1", matrix "attention.self.query"
    decoder.block.2.layer.1.EncDecAttention.q
                                           -> layer "decoder.block.2", matrix "layer.1.EncDecAttention.q"

Whole prefixes are keys, so T5's encoder.block.0 and decoder.block.0 are different layers,
and its self- and cross-attention `q` are different matrix types. `matrix_pattern` (a
regex; its first group, or the whole match) replaces the default matrix key, e.g.
r"\\w+$" for the bare leaf name.

A target without a layer index (BERT's pooler, a classifier, a plain MLP) has no layer key
under the default `layer_pattern`: LoRTA puts such targets in a group of their own (L = 1).
A `layer_pattern` the caller chose must find a layer in every target.

The head size comes from the graph: the last dimension of the query of its
scaled-dot-product-attention ops (every transformers family in tests/models.py but T5 has
them). `graph_head_size` says why there is none (no such op, or several sizes), and LoRTA
then uses one head per group.
"""

from __future__ import annotations

import re

import torch
from torch import fx

from ..errors import SpecError
from ..graph.fx_args import target_name
from ..graph.mode_modules import ModeAttention

LAYER_PATTERN = r"(?:^|\.)(?:layers|layer|h|block|blocks)\.\d+(?=\.)"


def layer_key(name: str, layer_pattern: str, required: bool = True) -> str | None:
    """The name up to the end of `layer_pattern`'s first match; None (or, if `required`, SpecError) without one."""
    match = re.search(layer_pattern, name)
    if match is None:
        if not required:
            return None
        raise SpecError(
            f"LoRTA could not find a layer index in target {name!r} (layer_pattern "
            f"{layer_pattern!r}). With a layer_pattern of your own every target needs one: "
            "exclude this target (Spec(exclude=[...])), give it another method in a mixed spec, "
            "fix the pattern, or leave layer_pattern at its default (targets without a layer "
            "index then form a group of their own)."
        )
    return name[: match.end()]


def matrix_key(name: str, layer: str, matrix_pattern: str | None) -> str:
    rest = name[len(layer):].lstrip(".")
    if matrix_pattern is None:
        return rest
    match = re.search(matrix_pattern, rest)
    if match is None:
        raise SpecError(
            f"LoRTA matrix_pattern {matrix_pattern!r} matches nothing in {rest!r} "
            f"(the part of target {name!r} after its layer {layer!r})"
        )
    return match.group(1) if match.groups() else match.group(0)


def _query_head_dim(gm: fx.GraphModule, node: fx.Node) -> int | None:
    """Head size of an attention node's query, if `node` is scaled-dot-product attention."""
    if node.op == "call_function":
        if node.target is not torch.ops.aten.scaled_dot_product_attention.default:
            return None
    elif node.op == "call_module":
        # `passes/mode_aware.py` turns attention with dropout into ModeAttention modules.
        if not isinstance(gm.get_submodule(target_name(node)), ModeAttention):
            return None
    else:
        return None
    query = node.args[0].meta.get("val") if isinstance(node.args[0], fx.Node) else None
    if query is None or not isinstance(query.shape[-1], int):
        return None
    return int(query.shape[-1])


def graph_head_size(gm: fx.GraphModule) -> tuple[int | None, str]:
    """(the one attention head size of `gm`, "") or (None, why there is none)."""
    sizes = {size for node in gm.graph.nodes if (size := _query_head_dim(gm, node)) is not None}
    if len(sizes) == 1:
        return sizes.pop(), ""
    if sizes:
        return None, f"the graph's attention ops have several head sizes {sorted(sizes)}"
    return None, "the graph has no scaled-dot-product attention op with a known query shape"
