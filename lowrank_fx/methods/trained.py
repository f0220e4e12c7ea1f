"""Trained modules (`Spec(train=[...])`, PEFT's `modules_to_save`): a full copy of some base
parameters, owned by one adapter.

The copies live beside the adapter's other groups, as the group `trained`
(`gm.lowrank_fx[<adapter>]["trained"]`), so everything that walks an adapter's modules
(adapter files, checkpoints, the optimizer, ONNX adapter inputs) sees them as ordinary
adapter parameters:

    TrainedGroup                        target_names: owning module paths ("classifier")
      units["classifier"]: TrainedUnit  parameters: weight, bias (copies, base dtype)
                                        base_names: {"weight": "classifier.weight", ...}

A unit is the module that owns the parameters (its path is the unit's target name), and
its parameters keep their own leaf names, so an ONNX adapter input is `classifier.weight`
and a PEFT tensor `base_model.model.classifier.weight`. How the graph reads the copies is
`passes/train_modules.py`.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from .base import AdapterGroup, Unit

TRAINED = "trained"  # the group's name inside gm.lowrank_fx[<adapter>]


class TrainedUnit(Unit):
    """The trained copies of one module's parameters (never called: the graph reads them)."""

    def __init__(self, base: dict[str, torch.Tensor], base_names: dict[str, str], empty: bool = False):
        super().__init__()
        self.base_names = dict(base_names)  # leaf name -> the base parameter's name in the graph
        for leaf, tensor in base.items():
            value = torch.empty_like(tensor) if empty else tensor.detach().clone()
            self.register_parameter(leaf, nn.Parameter(value, requires_grad=True))

    def forward(self, *args):
        raise RuntimeError("a trained module's copy is read by the graph, not called")

    def neutral_value(self, name: str, gm) -> torch.Tensor:
        """The base parameter: no adapter means the base module (ONNX defaults)."""
        return gm.get_parameter(self.base_names[name]).detach()

    def output_side(self) -> list[nn.Parameter]:
        return []  # LoRA+ trains full copies at the base rate


class TrainedGroup(AdapterGroup):
    """Every trained module of one adapter."""

    def copies(self) -> dict[str, nn.Parameter]:
        """{base parameter's graph name: its trained copy}."""
        return {unit.base_names[leaf]: param for unit in self.units.values() if isinstance(unit, TrainedUnit)
                for leaf, param in unit.named_parameters(recurse=False)}


def build_trained(params: Mapping[str, torch.Tensor], empty: bool = False) -> TrainedGroup:
    """A TrainedGroup copying `params` ({graph name: base parameter}); `empty=True` only
    allocates (for checking a file's shapes before anything is built for real)."""
    by_module: dict[str, dict[str, str]] = {}
    for name in params:
        module, _, leaf = name.rpartition(".")
        by_module.setdefault(module, {})[leaf] = name
    units = {module: TrainedUnit({leaf: params[name] for leaf, name in leaves.items()}, leaves, empty)
             for module, leaves in by_module.items()}
    return TrainedGroup(units)
