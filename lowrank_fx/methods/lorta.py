"""LoRTA (Hounie et al. 2024): one rank-r CP tensor holds the updates of many layers.

A *group* is every target with the same weight shape (out, in); within it the updates of
all layers l and matrix types m form a 5-way tensor with modes
(d_in, d_head, H, L, M), out = H · d_head, factored by shared CP factors

    A (d_in, r)   B (r, d_head)   C_H (H, r)   C_L (L, r)   C_M (M, r)

    c = C_H ⊙ C_L[l] ⊙ C_M[m]                            (H, r), one row per head
    ΔW[h·d_head + j, i] = s · Σ_k A[i, k] c[h, k] B[k, j]   ΔW (out, in), s = alpha / r

Trainable parameters per group: r · (d_in + d_head + H + L + M).
Training never builds ΔW. Each unit scales B per head,

    B̃[k, h·d_head + j] = c[h, k] B[k, j]      B̃ (r, out), the size of LoRA's B
    Δy = s · (dropout(x) A) B̃

so a step costs what LoRA of rank r costs, in arithmetic and in activations: x A (..., r)
is the only per-token intermediate. (Scaling x A per head instead, then applying B per
head, is the same sum but keeps an (..., H, r) activation for backward.)

Rules (see lorta_index.py):
  - group: targets with equal (out, in); on Llama q/o, k/v (with GQA) and the MLP
    projections gate/up and down become separate groups, each with its own factors;
  - L indexes the group's distinct layer keys, M its distinct matrix keys, both in the
    order the graph first uses them; two targets on the same (l, m) are refused;
  - targets without a layer index (BERT's pooler, a plain MLP) form groups of their own,
    `lorta_<out>x<in>_nolayer`, with L = 1 and their whole names as matrix keys;
  - heads: every group's output is cut into heads of `head_dim`. An explicit head_dim must
    divide each group's output width. By default it is the head size of the model's
    attention ops; a group whose width that size does not divide, and every group of a graph
    without such ops (an MLP, eager attention), gets one head (H = 1, d_head = out), which
    `describe` (so `lfx.plan`) says;
  - the rank is the CP rank of the group's tensor and may exceed min(out, in) (a CP tensor's
    rank is not bounded by its modes; each layer's own update still has rank <= min(out, in)).

Init ("default"): A ~ U(-1/√d_in, 1/√d_in) (Kaiming-uniform with a=√5 for fan-in d_in,
LoRA's A), B = 0, C_H, C_L, C_M ~ U(0, 1) (non-negative, so no head, layer or matrix starts
with a flipped sign). Init "nonzero" draws B ~ U(-1/√r, 1/√r) so that the update is
non-zero from the first step.
"""

from __future__ import annotations

import dataclasses
import math
import re

import torch
from torch import nn

from ..errors import SpecError
from ..options import integer, options, set_options
from .base import AdapterGroup, Method, Unit, adapter_dtype, check_common, dropout_module
from .lorta_index import LAYER_PATTERN, graph_head_size, layer_key, matrix_key

FACTORS = ("A", "B", "C_H", "C_L", "C_M")


class LoRTAUnit(Unit):
    """The update of one target: cell (layer, matrix) of its group's tensor. No own parameters."""

    def __init__(self, layer: int, matrix: int, scale: float, dropout: float):
        super().__init__()
        self.layer = layer
        self.matrix = matrix
        self.scale = scale
        self.dropout = dropout_module(dropout)

    def _output_factor(self, B, C_H, C_L, C_M) -> torch.Tensor:
        """B̃ (r, H·d_head): B scaled per head by c = C_H ⊙ C_L[l] ⊙ C_M[m] (H, r)."""
        c = C_H * (C_L[self.layer] * C_M[self.matrix])
        return (c.t()[:, :, None] * B[:, None, :]).flatten(1)

    def linear_update(self, x, A, B, C_H, C_L, C_M) -> torch.Tensor:
        h = self.dropout(x.to(A.dtype)) @ A  # (..., r)
        return ((h @ self._output_factor(B, C_H, C_L, C_M)) * self.scale).to(x.dtype)  # (..., out)

    def delta_weight(self, A, B, C_H, C_L, C_M) -> torch.Tensor:
        """ΔW (out, in) in fp32, or float64 for float64 factors."""
        A, B, C_H, C_L, C_M = (t.to(torch.promote_types(A.dtype, torch.float32)) for t in (A, B, C_H, C_L, C_M))
        return (A @ self._output_factor(B, C_H, C_L, C_M)).t() * self.scale

    def output_side(self) -> list[nn.Parameter]:
        return []


class LoRTAGroup(AdapterGroup):
    """The shared CP factors of one group and its units."""

    shared = FACTORS
    rank_axes = {"A": 1, "B": 0, "C_H": 1, "C_L": 1, "C_M": 1}

    def __init__(self, units: dict[str, LoRTAUnit], d_in: int, d_head: int, heads: int,
                 layers: int, matrices: int, rank: int, dtype: torch.dtype, init: str,
                 notes: tuple[str, ...] = ()):
        super().__init__(units)
        sizes = {"A": (d_in, rank), "B": (rank, d_head), "C_H": (heads, rank),
                 "C_L": (layers, rank), "C_M": (matrices, rank)}
        for name, shape in sizes.items():
            self.register_parameter(name, nn.Parameter(torch.empty(shape, dtype=dtype)))
        bound = 1.0 / math.sqrt(d_in)
        nn.init.uniform_(self.A, -bound, bound)
        if init == "nonzero":
            nn.init.uniform_(self.B, -1.0 / math.sqrt(rank), 1.0 / math.sqrt(rank))
        else:
            nn.init.zeros_(self.B)
        for name in ("C_H", "C_L", "C_M"):
            nn.init.uniform_(getattr(self, name), 0.0, 1.0)
        self.modes = {"d_in": d_in, "d_head": d_head, "H": heads, "L": layers, "M": matrices}
        self.notes = list(notes)  # why a default fell back (one head, no layer index), for describe

    def output_side(self) -> list[nn.Parameter]:
        """B: the zero-initialised factor nearest the output (LoRA's B)."""
        return [self.B]

    def describe(self) -> str:
        modes = "LoRTA modes " + ", ".join(f"{k}={v}" for k, v in self.modes.items())
        return "; ".join([modes, *self.notes])


@options
class LoRTA(Method):
    """Low-rank tensor adaptation: CP factors shared by every layer of a group (module docstring).

    Args:
        rank: r, the CP rank (an int >= 1).
        alpha: the scale's numerator: s = alpha / r.
        dropout: dropout on the adapter's input x, in [0, 1).
        head_dim: d_head; None: the head size of the model's attention ops, else one head.
        layer_pattern: a regex matching the layer part of a target's name (default:
            "layers.N", "h.N", "block.N", ...: lorta_index.py).
        matrix_pattern: a regex searched in the name after the layer part, whose first group
            (or whole match) is the matrix key; None: that whole rest of the name.
        init: "default" (B = 0) or "nonzero".

    Raises:
        SpecError: an option out of range, or a pattern that is not a regular expression.
    """

    rank: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    head_dim: int | None = None  # None: the head size of the model's attention ops, else one head
    layer_pattern: str = LAYER_PATTERN
    matrix_pattern: str | None = None  # None: the name after the layer key
    init: str = "default"

    kind = "lorta"

    def __post_init__(self):
        check_common(self)
        if self.head_dim is not None:
            set_options(self, head_dim=integer("LoRTA", "head_dim", self.head_dim))
        patterns = {"layer_pattern": self.layer_pattern}
        if self.matrix_pattern is not None:
            patterns["matrix_pattern"] = self.matrix_pattern
        for option, pattern in patterns.items():
            if not isinstance(pattern, str):
                raise SpecError(f"LoRTA {option} must be a regular expression (a string), got {pattern!r}")
            try:
                re.compile(pattern)
            except re.error as err:
                raise SpecError(f"LoRTA {option} {pattern!r} is not a regular expression: {err}") from None

    @property
    def scale(self) -> float:
        """The update's scale s.

        Returns:
            alpha / r.
        """
        return self.alpha / self.rank

    def for_graph(self, gm: nn.Module) -> "LoRTA":
        """With the default head_dim: this method carrying the graph's head size (or why it has none).

        Args:
            gm: the captured graph the method is about to adapt.

        Returns:
            `self` with an explicit head_dim, else a copy bound to the graph's head size.
        """
        if self.head_dim is not None:
            return self
        bound = dataclasses.replace(self)
        object.__setattr__(bound, "_graph_head", graph_head_size(gm))  # not an option: config() leaves it out
        return bound

    def build(self, targets: list) -> dict[str, AdapterGroup]:
        required = self.layer_pattern != LAYER_PATTERN  # a pattern of the caller's own must find every layer
        by_key: dict[tuple[int, int, bool], list] = {}
        layer_of = {}
        for t in targets:
            layer_of[t.name] = layer_key(t.name, self.layer_pattern, required=required)
            by_key.setdefault((*t.shape, layer_of[t.name] is None), []).append(t)
        return {f"lorta_{out}x{d_in}" + ("_nolayer" if unlayered else ""): self._group(group, layer_of)
                for (out, d_in, unlayered), group in by_key.items()}

    def _head_size(self, out: int, names: str) -> tuple[int, tuple[str, ...]]:
        """d_head for a group of output width `out`, and the note when it falls back to one head."""
        if self.head_dim is not None:
            if out % self.head_dim:
                raise SpecError(
                    f"LoRTA head_dim {self.head_dim} does not divide the output width {out} of targets "
                    f"{names}; pass a head_dim that divides it, leave head_dim at its default (such "
                    f"groups then get one head), or adapt them with a separate LoRTA(head_dim=...) in "
                    f"a mixed spec (head_dim={out} makes one head)"
                )
            return self.head_dim, ()
        size, why = getattr(self, "_graph_head", (None, "the graph's head size is unknown (not bound to a graph)"))
        if size is not None and out % size == 0:
            return size, ()
        if size is not None:
            why = f"the attention head size {size} does not divide the output width {out}"
        return out, (f"one head: {why}",)

    def _group(self, targets: list, layer_of: dict[str, str | None]) -> LoRTAGroup:
        out, d_in = targets[0].shape
        names = ", ".join(t.name for t in targets[:3]) + (" ..." if len(targets) > 3 else "")
        d_head, notes = self._head_size(out, names)
        if layer_of[targets[0].name] is None:
            notes += ("no layer index in the targets' names: a group of their own",)
        cells = {}
        for t in targets:
            layer = layer_of[t.name] or ""
            cell = (layer, matrix_key(t.name, layer, self.matrix_pattern))
            if cell in cells:
                raise SpecError(
                    f"LoRTA maps {cells[cell]} and {t.name} to the same layer {cell[0]!r} and matrix "
                    f"{cell[1]!r}, so they would get the same update; change matrix_pattern / layer_pattern"
                )
            cells[cell] = t.name
        layers = list(dict.fromkeys(layer for layer, _ in cells))
        matrices = list(dict.fromkeys(matrix for _, matrix in cells))
        units = {name: LoRTAUnit(layers.index(layer), matrices.index(matrix), self.scale, self.dropout)
                 for (layer, matrix), name in cells.items()}
        return LoRTAGroup(units, d_in, d_head, out // d_head, len(layers), len(matrices),
                          self.rank, adapter_dtype(targets[0].dtype), self.init, notes)
