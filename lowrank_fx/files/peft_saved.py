"""PEFT's `modules_to_save` <-> our trained modules (`Spec.train`, passes/train_modules.py).

PEFT keeps a full copy of each module listed in `modules_to_save` and stores its state under
the module's own names, `base_model.model.classifier.weight` / `.bias` in
adapter_model.safetensors. Loading: tensors under a listed module (a name, matched like PEFT's
list as the module path or a dotted suffix of it) are the trained copies; the listed names
that name a module of this graph become `Spec.train`, so the placement (files/into_graph.py)
expects a copy of every parameter of those modules, and a missing or extra tensor is one more
difference in the all-or-nothing report. Names that match no module (PEFT's sequence
classification adds "classifier" and "score" to every config) are left out. Buffers
(batch-norm statistics) have no trained copy here and are refused. Saving writes the
adapter's trained modules as `modules_to_save` and each copy under every name the original
model has for its parameter; trained single parameters (`train=["*.bias"]`) are PEFT's
trained biases instead (peft_bias.py).
"""

from __future__ import annotations

import dataclasses
import re

import torch
from torch import fx

from ..errors import SpecError
from ..graph.record import Record
from ..passes.train_modules import base_readers, resolve_trained, trained_group
from ..spec import Spec, _compile
from .into_graph import Placement


def _pattern(name: str) -> str:
    """One PEFT module name as a train pattern: the module path or a dotted suffix of it."""
    return "re:(?:^|\\.)" + re.escape(name) + "$"


def split_saved(config: dict, tensors: dict[str, torch.Tensor], prefix: str) -> tuple[dict, dict]:
    """({parameter path in the model: tensor} of the modules_to_save copies, the other tensors)."""
    names = config.get("modules_to_save") or []
    if isinstance(names, str):
        names = [names]
    matchers = [_compile(_pattern(name)) for name in names]
    saved, rest = {}, {}
    for key, value in tensors.items():
        path = key[len(prefix):] if key.startswith(prefix) else None
        parts = path.split(".") if path else []
        modules = [".".join(parts[:i]) for i in range(1, len(parts))]
        if path is not None and any(match(m) for match in matchers for m in modules):
            saved[path] = value
        else:
            rest[key] = value
    return saved, rest


def with_train(gm: fx.GraphModule, spec: Spec, config: dict) -> Spec:
    """`spec` training the modules_to_save that name modules of `gm`."""
    names = config.get("modules_to_save") or []
    patterns = []
    for name in [names] if isinstance(names, str) else names:
        try:
            resolve_trained(gm, Spec(targets=[], train=[_pattern(name)]))
        except SpecError:  # names no module of this graph (PEFT's default "score" on BERT)
            continue
        patterns.append(_pattern(name))
    return dataclasses.replace(spec, train=tuple(patterns)) if patterns else spec


def saved_values(gm: fx.GraphModule, placement: Placement, saved: dict[str, torch.Tensor]) -> tuple[dict, list[str]]:
    """({key in the adapter's module: tensor} for the saved copies, problems)."""
    record = Record.require(gm, "lfx.load_peft")
    readers = base_readers(gm)
    graph_name = {}  # any name of a parameter the graph reads -> its graph name
    for nodes in readers.values():
        name = nodes[0].target
        for alias in record.aliases.get(name, [name]) + [n.target for n in nodes]:
            graph_name.setdefault(alias, name)
    values, buffers = {}, []
    for path, value in saved.items():
        if path in graph_name:
            values[placement.trained_key(graph_name[path])] = value
        elif path in record.aliases:
            buffers.append(path)
        else:
            values[path] = value  # no such parameter: reported as a tensor the adapter lacks
    problems = []
    if buffers:
        problems.append("modules_to_save tensors that are no parameters the graph reads (buffers such as "
                        f"batch-norm statistics, which lowrank_fx does not train): {', '.join(buffers[:5])}")
    return values, problems


def saved_config_and_tensors(gm: fx.GraphModule, adapter: str, prefix: str) -> tuple[list[str] | None, dict]:
    """(modules_to_save, {PEFT key: copy}) of `adapter`; (None, {}) if it trains no module."""
    group = trained_group(gm, adapter)
    if group is None:
        return None, {}
    record = Record.require(gm, "lfx.save_peft")
    modules = resolve_trained(gm, record.adapters[adapter].spec).modules
    tensors = {}
    for name, copy in group.copies().items():
        aliases = record.aliases.get(name, [name])
        # not a single parameter (peft_bias.py)
        if any(alias.startswith(m + ".") for alias in aliases for m in modules):
            tensors.update({f"{prefix}{alias}": copy for alias in aliases})
    return modules or None, tensors
