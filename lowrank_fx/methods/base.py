"""What every adapter method provides.

A `Method` is a frozen config (rank, alpha, ...). `Method.build(targets)` returns adapter
*groups*: `AdapterGroup` modules, each holding
  - `units`: one `Unit` per target, keyed by `unit_key(target name)`;
  - `shared`: names of tensors the group shares across its units (LoRTA's CP factors,
    RandLoRA's random bases). The graph reads them with `get_attr` and passes them to
    every unit call, so the sharing is visible in the graph.

At a call site y = f(x, W) the inject pass adds `Δy = unit(*site_inputs, *shared)`, of y's
shape; `site_inputs` is ("x",) unless a unit asks for more (DoRA: the site's output y, the
base weight and bias). Methods work in the weight's matrix view (out, in) (graph/op_kinds.py):
on a linear site a unit uses its factored form; on any other op (conv, embedding) the
default is f(x, ΔW) with ΔW built once per call. Folding asks `unit.delta_weight(*shared)`
for ΔW (out, in) in fp32: W ← W + ΔW (a unit with `uses_base_weight` also gets W).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
from torch import nn

from ..graph.op_kinds import LINEAR, EmbeddingKind, LinearKind, OpKind
from ..options import choice, integer, number, set_options


def unit_key(target_name: str) -> str:
    """Module key for a target: dots are not allowed in module names, so they become '-'."""
    return target_name.replace(".", "-")


def adapter_dtype(weight_dtype: torch.dtype) -> torch.dtype:
    """Adapters of fp16/bf16 weights are kept in fp32 (small, and stable to train)."""
    return weight_dtype if weight_dtype in (torch.float32, torch.float64) else torch.float32


class Unit(nn.Module):
    """The adapter of one target."""

    # {parameter name: its rank axis}; ONNX export makes these axes dynamic (export/adapter_graph.py)
    rank_axes: ClassVar[dict[str, int]] = {}
    # what the inject pass passes before the shared tensors: "x", "y", "weight", "bias"
    site_inputs: ClassVar[tuple[str, ...]] = ("x",)
    uses_base_weight: ClassVar[bool] = False  # delta_weight(*shared, base=W (out, in))
    op_kind: OpKind = LINEAR  # the target's op (graph/op_kinds.py), set by `passes.inject.build_groups`

    def forward(self, x: torch.Tensor, *shared: torch.Tensor) -> torch.Tensor:
        """Δy: the factored form on a linear site, else f(dropout(x), ΔW)."""
        if isinstance(self.op_kind, LinearKind):
            return self.linear_update(x, *shared)
        h = x if isinstance(self.op_kind, EmbeddingKind) else self.dropout(x)
        return self.op_kind.apply(h, self.delta_weight(*shared))

    def linear_update(self, x: torch.Tensor, *shared: torch.Tensor) -> torch.Tensor:
        """Δy (..., out) for x (..., in) on a linear site."""
        raise NotImplementedError

    def delta_weight(self, *shared: torch.Tensor) -> torch.Tensor:
        """ΔW (out, in), computed in fp32."""
        raise NotImplementedError

    def delta_bias(self) -> torch.Tensor | None:
        """Δb (out,) that folding adds to the base bias, or None (most methods)."""
        return None

    def delta_bound(self, *shared: torch.Tensor) -> float | None:
        """An upper bound on max |ΔW| from the parameters alone, without building ΔW, so that
        folding can trust a finite ΔW unchecked (passes/fold_updates.py); None where only ΔW
        itself tells (the default)."""
        return None

    def fold_refusal(self) -> str | None:
        """Why this unit's update cannot fold into its weight (it has no ΔW of the weight's shape),
        or None (the usual case). Folding refuses the whole graph with this reason
        (passes/fold_updates.py)."""
        return None

    def neutral_value(self, name: str, gm) -> torch.Tensor | None:
        """The value of parameter `name` that means "no update" when it is neither empty along
        the rank nor zeros (DoRA's magnitude: the base row norms); None for the usual ones."""
        return None

    def output_side(self) -> list[nn.Parameter]:
        """Parameters that LoRA+ trains at ratio · lr (see training/loraplus.py)."""
        raise NotImplementedError


class AdapterGroup(nn.Module):
    """Units of one method in one adapter, plus the tensors they share."""

    shared: tuple[str, ...] = ()
    rank_axes: ClassVar[dict[str, int]] = {}  # as Unit.rank_axes, for the group's own parameters

    def __init__(self, units: dict[str, Unit]):
        super().__init__()
        self.units = nn.ModuleDict({unit_key(name): unit for name, unit in units.items()})
        self.target_names = list(units)

    def unit(self, target_name: str) -> Unit:
        return self.units[unit_key(target_name)]

    def shared_tensors(self) -> list[torch.Tensor]:
        return [getattr(self, name) for name in self.shared]

    def delta_weight(self, target_name: str, base: torch.Tensor | None = None) -> torch.Tensor:
        """ΔW (out, in) of one target; `base` is the target's weight (out, in), for units that need it."""
        unit = self.unit(target_name)
        if unit.uses_base_weight:
            return unit.delta_weight(*self.shared_tensors(), base=base)
        return unit.delta_weight(*self.shared_tensors())

    def output_side(self) -> list[nn.Parameter]:
        """Shared parameters that LoRA+ trains at ratio · lr (LoRTA's B); none by default."""
        return []

    def describe(self) -> str:
        """One line for `plan`: the group's shared structure (LoRTA's modes); empty by default."""
        return ""


class Method:
    """Base of the method configs (LoRA, LoRTA, RandLoRA)."""

    kind: ClassVar[str]

    def build(self, targets: list) -> dict[str, AdapterGroup]:
        """Adapter groups for `targets` (a list of `targets.Target`), keyed by group name."""
        raise NotImplementedError

    def for_graph(self, gm) -> "Method":
        """This method with options that depend on the model filled in (LoRTA's head_dim)."""
        return self

    def config(self) -> dict:
        """Options as plain JSON data, with the method kind."""
        return {"method": self.kind, **dataclasses.asdict(self)}


INITS = ("default", "nonzero")


def check_common(method: "Method", check_init=None) -> None:
    """Check and normalise the options every method has: rank an int >= 1, alpha finite and not 0
    (alpha = 0 would make the update 0, so nothing would train; negative alpha is allowed, as in
    PEFT), dropout in [0, 1), init one of INITS (or what `check_init(owner, init)` accepts).
    SpecError names the option otherwise."""
    owner = type(method).__name__
    set_options(
        method,
        rank=integer(owner, "rank", method.rank),
        alpha=number(owner, "alpha", method.alpha, "a finite number other than 0", lambda a: a != 0,
                     why="the update is scaled by alpha / rank: 0 would train nothing"),
        dropout=number(owner, "dropout", method.dropout, "in [0, 1)", lambda p: 0 <= p < 1),
        init=check_init(owner, method.init) if check_init else choice(owner, "init", method.init, INITS),
    )


def dropout_module(p: float) -> nn.Module:
    return nn.Dropout(p) if p > 0 else nn.Identity()
