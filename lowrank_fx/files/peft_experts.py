"""PEFT's `target_parameters` on expert stacks (graph/experts.py), both ways.

PEFT wraps each targeted 3-D parameter of a module in a ParamWrapper, the first one (in the
module's parameter order) innermost, so the module `m` with stacks p_0 ... p_{n-1} targeted keeps
p_{n-1-k}'s factors under `m` + ".base_layer" × k:

    model.layers.0.mlp.experts.base_layer.lora_A.weight     gate_up_proj   (n = 2, k = 1)
    model.layers.0.mlp.experts.lora_A.weight                down_proj      (k = 0)

Its factors hold every expert: lora_A (E·r, in), rows expert-major (row e·r + k), and lora_B
(out, r·E), columns rank-major (column k·E + e); ours are A (E, r, in) and B (E, out, r). The same
holds for a transposed stack (E, in, out): ΔW[e] = s · B[e] A[e] is always (out, in). A unit with
`shared_experts=True` is written as one copy per expert (the same update; it loads per expert).
"""

from __future__ import annotations

import torch

from ..errors import AdapterFileError
from ..graph.experts import ExpertsKind
from ..graph.record import Record
from ..graph.targets import Target

WRAPPED = ".base_layer"


def _stacks_of(module: str, targets: dict[str, Target], record: Record, config: dict) -> list[str]:
    """The stacks of `module` that the config's target_parameters select, in the module's parameter order."""
    wanted = config.get("target_parameters") or []
    order = {key: i for i, key in enumerate(record.state_keys)}
    found = [name for name, t in targets.items() if isinstance(t.kind, ExpertsKind)
             and name.rpartition(".")[0] == module
             and any(name == p or name.endswith("." + p) for p in wanted)]
    return sorted(found, key=lambda name: order.get(name, len(order)))


def experts_units(gm, targets: dict[str, Target], units: dict[str, dict], config: dict):
    """(units with every stack's entry renamed to its target and reshaped to ours, the stack targets)."""
    record = Record.require(gm, "lfx.load_peft")
    converted, stacks = {}, set()
    for path, tensors in units.items():
        module, depth = path, 0
        while module.endswith(WRAPPED):
            module, depth = module[: -len(WRAPPED)], depth + 1
        selected = _stacks_of(module, targets, record, config)
        if not selected or "lora_A" not in tensors or "lora_B" not in tensors:
            converted[path] = tensors
            continue
        if depth >= len(selected):
            raise AdapterFileError(f"{path}: PEFT nests {depth + 1} parameter wrappers here, but target_parameters "
                                   f"select {len(selected)} expert stacks of {module} ({', '.join(selected)})")
        name = selected[len(selected) - 1 - depth]
        experts = targets[name].kind.experts
        a, b = tensors["lora_A"], tensors["lora_B"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] % experts or b.shape[1] != a.shape[0]:
            raise AdapterFileError(f"{path}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} are not the factors "
                                   f"of a LoRA on {experts} experts (lora_A (E·r, in), lora_B (out, r·E)) for {name}")
        rank = a.shape[0] // experts
        converted[name] = {**tensors, "lora_A": a.reshape(experts, rank, a.shape[1]),
                           "lora_B": b.reshape(b.shape[0], rank, experts).permute(2, 0, 1).contiguous()}
        stacks.add(name)
    return converted, stacks


def one_expert(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Expert 0's factors (r, in), (out, r): what a plain LoRA entry's rank and shape checks read."""
    return {**tensors, "lora_A": tensors["lora_A"][0], "lora_B": tensors["lora_B"][0]}


def peft_path(target: str, targets: dict[str, Target], record: Record, config: dict) -> str:
    """PEFT's module path for the factors of stack `target` (the inverse of `experts_units`' naming)."""
    module = target.rpartition(".")[0]
    selected = _stacks_of(module, targets, record, config)
    return module + WRAPPED * (len(selected) - 1 - selected.index(target))


def peft_factors(unit) -> dict[str, torch.Tensor]:
    """A stack unit's factors in PEFT's layout: lora_A (E·r, in), lora_B (out, r·E)."""
    a, b = unit.lora_A, unit.lora_B
    if unit.shared_experts:
        a, b = a.expand(unit.experts, *a.shape), b.expand(unit.experts, *b.shape)
    experts, rank, width = a.shape
    return {"lora_A": a.reshape(experts * rank, width),
            "lora_B": b.permute(1, 2, 0).reshape(b.shape[1], rank * experts)}
