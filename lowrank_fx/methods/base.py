"""What every adapter method provides: `Method`, `AdapterGroup` and `Unit`, public so that a
method can be written outside the package (docs/write_a_method.md: VeRA as the example).

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
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from ..graph.op_kinds import LINEAR, EmbeddingKind, LinearKind, OpKind
from ..options import choice, integer, number, set_options

if TYPE_CHECKING:
    from ..graph.targets import Target


def unit_key(target_name: str) -> str:
    """Module key for a target: dots are not allowed in module names, so they become '-'."""
    return target_name.replace(".", "-")


def adapter_dtype(weight_dtype: torch.dtype) -> torch.dtype:
    """Adapters of fp16/bf16 weights are kept in fp32 (small, and stable to train)."""
    return weight_dtype if weight_dtype in (torch.float32, torch.float64) else torch.float32


class Unit(nn.Module):
    """The adapter of one target: an `nn.Module` whose parameters are what trains.

    A subclass implements, for a target W (out, in) (`Target.shape`):

    - `linear_update(x, *shared)`: Δy (..., out) for the site's activation x (..., in), in
      the factored form (never building ΔW), applying its own dropout to x if it has any;
    - `delta_weight(*shared)`: ΔW (out, in) in fp32, which folding adds to W; it must equal
      the update `linear_update` applies: Δy = x ΔWᵀ;
    - `output_side()` (optional): the parameters LoRA+ trains at ratio · lr.

    `shared` are the group's shared tensors (`AdapterGroup.shared`), in that order. On a
    non-linear site (conv, embedding) the default `forward` applies the op to
    (`self.dropout(x)`, ΔW), so a unit meant for such sites sets `self.dropout` (an
    `nn.Dropout` or `nn.Identity`). Class attributes a unit may set: `site_inputs` (what the
    inject pass passes before the shared tensors: "x", "y", "weight", "bias"),
    `uses_base_weight` (`delta_weight` then also gets `base=W`), and `rank_axes`
    ({parameter name: its rank axis}, made dynamic by the ONNX adapter export).
    """

    # {parameter name: its rank axis}; ONNX export makes these axes dynamic (export/adapter_graph.py)
    rank_axes: ClassVar[dict[str, int]] = {}
    # what the inject pass passes before the shared tensors: "x", "y", "weight", "bias"
    site_inputs: ClassVar[tuple[str, ...]] = ("x",)
    uses_base_weight: ClassVar[bool] = False  # delta_weight(*shared, base=W (out, in))
    op_kind: OpKind = LINEAR  # the target's op (graph/op_kinds.py), set by `passes.inject.build_groups`

    def forward(self, x: torch.Tensor, *shared: torch.Tensor) -> torch.Tensor:
        """Δy: the factored form on a linear site, else f(dropout(x), ΔW).

        Args:
            x: the site's activation (..., in) (a conv's or embedding's own input elsewhere).
            *shared: the group's shared tensors.

        Returns:
            Δy, of the site's output shape.
        """
        if isinstance(self.op_kind, LinearKind):
            return self.linear_update(x, *shared)
        h = x if isinstance(self.op_kind, EmbeddingKind) else self.dropout(x)
        return self.op_kind.apply(h, self.delta_weight(*shared))

    def linear_update(self, x: torch.Tensor, *shared: torch.Tensor) -> torch.Tensor:
        """Δy on a linear site, in the factored form; a subclass implements it.

        Args:
            x: the activation (..., in).
            *shared: the group's shared tensors.

        Returns:
            Δy (..., out) = x ΔWᵀ.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement linear_update(x, *shared) -> Δy "
                                  "(docs/write_a_method.md)")

    def delta_weight(self, *shared: torch.Tensor) -> torch.Tensor:
        """The update as a matrix, for folding; a subclass implements it.

        Args:
            *shared: the group's shared tensors (and `base=W` (out, in) for a unit with
                `uses_base_weight`).

        Returns:
            ΔW (out, in), computed in fp32.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement delta_weight(*shared) -> ΔW (out, in) "
                                  "(docs/write_a_method.md)")

    def delta_bias(self) -> torch.Tensor | None:
        """The update of the base bias, if the method has one.

        Returns:
            Δb (out,) that folding adds to the base bias, or None (most methods).
        """
        return None

    def delta_bound(self, *shared: torch.Tensor) -> float | None:
        """An upper bound on max |ΔW| from the parameters alone, without building ΔW, so that
        folding can trust a finite ΔW unchecked (passes/fold_updates.py).

        Args:
            *shared: the group's shared tensors.

        Returns:
            The bound, or None where only ΔW itself tells (the default).
        """
        return None

    def fold_refusal(self) -> str | None:
        """Why this unit's update cannot fold into its weight (it has no ΔW of the weight's shape).

        Returns:
            The reason, with which folding refuses the whole graph (passes/fold_updates.py), or
            None (the usual case).
        """
        return None

    def neutral_value(self, name: str, gm: nn.Module) -> torch.Tensor | None:
        """The value of parameter `name` that means "no update", where it is neither empty along
        the rank nor zeros (DoRA's magnitude: the base row norms).

        Args:
            name: the parameter's name in the unit.
            gm: the graph the unit belongs to (for the base weights).

        Returns:
            That value, or None for the usual parameters.
        """
        return None

    def output_side(self) -> list[nn.Parameter]:
        """The parameters LoRA+ trains at ratio · lr (training/loraplus.py).

        Returns:
            Those parameters (LoRA's B); none by default, so every parameter gets lr.
        """
        return []


class AdapterGroup(nn.Module):
    """Units of one method in one adapter, plus the tensors they share.

    A subclass with shared tensors registers them (as parameters, or buffers: persistent
    ones are saved in adapter files) and names them in the class attribute `shared`; the graph
    reads them with `get_attr` and passes them to every unit call after the site inputs.

    Args:
        units: target name -> its unit.
    """

    shared: tuple[str, ...] = ()
    rank_axes: ClassVar[dict[str, int]] = {}  # as Unit.rank_axes, for the group's own parameters

    def __init__(self, units: dict[str, Unit]):
        super().__init__()
        self.units = nn.ModuleDict({unit_key(name): unit for name, unit in units.items()})
        self.target_names = list(units)

    def unit(self, target_name: str) -> Unit:
        """One target's unit.

        Args:
            target_name: the target's name ("model.layers.0.self_attn.q_proj").

        Returns:
            Its unit.
        """
        return self.units[unit_key(target_name)]

    def shared_tensors(self) -> list[torch.Tensor]:
        """The shared tensors, in the order units receive them.

        Returns:
            The tensors named by `shared`.
        """
        return [getattr(self, name) for name in self.shared]

    def delta_weight(self, target_name: str, base: torch.Tensor | None = None) -> torch.Tensor:
        """ΔW of one target, for folding.

        Args:
            target_name: the target's name.
            base: the target's weight (out, in), for units that need it (`uses_base_weight`).

        Returns:
            ΔW (out, in) in fp32.
        """
        unit = self.unit(target_name)
        if unit.uses_base_weight:
            return unit.delta_weight(*self.shared_tensors(), base=base)
        return unit.delta_weight(*self.shared_tensors())

    def output_side(self) -> list[nn.Parameter]:
        """Shared parameters that LoRA+ trains at ratio · lr (LoRTA's B).

        Returns:
            Those parameters; none by default.
        """
        return []

    def describe(self) -> str:
        """One line for `plan`: the group's shared structure (LoRTA's modes).

        Returns:
            The line; empty by default.
        """
        return ""


class Method:
    """Base of the method configs (LoRA, LoRTA, RandLoRA, TrainableTokens, or your own).

    A method is a frozen dataclass of options (`@dataclasses.dataclass(frozen=True)`: methods
    are compared and hashed, and `config()` reads the fields) with a class attribute `kind`,
    a name of its own that adapter files store; loading a file rebuilds the method as
    `cls(**options)` from the subclass of that kind, which must be imported. It implements
    `build(targets)`, which returns the adapter groups for the targets a spec assigns to it.
    Each target (graph/targets.py `Target`) gives `name`, `shape` (out, in), `out_features`,
    `in_features`, `dtype` (of the weight), `kind` (its op: graph/op_kinds.py) and `quantized`.
    """

    kind: ClassVar[str]

    def build(self, targets: list[Target]) -> dict[str, AdapterGroup]:
        """Make the adapter's modules for `targets`; a subclass implements it.

        Args:
            targets: the targets this method adapts, in graph order.

        Returns:
            {group name: AdapterGroup}; every target is in exactly one group.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement build(targets) -> "
                                  "{group name: AdapterGroup} (docs/write_a_method.md)")

    def for_graph(self, gm: nn.Module) -> "Method":
        """This method with options that depend on the model filled in (LoRTA's head_dim).

        Args:
            gm: the captured graph the method is about to adapt.

        Returns:
            The method to build with: `self` by default.
        """
        return self

    def config(self) -> dict[str, Any]:
        """The method as plain JSON data, as adapter files store it.

        Returns:
            {"method": kind, **options}.
        """
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
