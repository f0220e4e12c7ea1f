"""`plan(model, spec)`: a dry run listing what `rewrite` would adapt, without changing anything.

Below the table: what "all-linear" left out and why (graph/heads.py), as `Plan.left_out`, and
with `layers=` the layer blocks `rewrite(..., layers=...)` would make (passes/layers.py), as `Plan.layers`.
A model with quantized layers gets a column naming each target's base: its scheme and the
bytes its quantized weight (and scales, bias) occupy, against fp32. A scheme whose kernel on
the layers' device is known to be slow is named below the table (`Plan.slow_kernels`,
graph/quant_formats.py `SLOW_KERNELS`) with what it costs.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..deprecation import api_options
from ..graph.experts import ExpertsKind
from ..graph.heads import left_out
from ..graph.quant_formats import SLOW_KERNELS
from ..graph.quantized import find_regions, region_bytes, region_device
from ..passes.inject import build_groups
from ..passes.layers import blocks, candidates, flat_view
from ..passes.train_modules import resolve_trained
from ..spec import ALL_LINEAR, Spec
from .capture import capture
from .rewrite import resolve


@dataclasses.dataclass
class PlanRow:
    """One target of a `Plan`: the table's row.

    Args:
        target: the target's name ("model.layers.0.self_attn.q_proj").
        op: the op that reads its weight ("linear", "conv2d", "embedding", ...).
        shape: the weight as a matrix, (out, in).
        method: the method and its rank and alpha, e.g. "lora(rank=8, alpha=16.0)".
        group: the adapter group the target's unit belongs to.
        trainable: parameters of this target's own unit.
        note: a remark, e.g. "rank > min(out, in)": exact, but the update is not low-rank there.
        scheme: a quantized base's scheme ("int8", "nf4", "int4", "bnb-nf4", ...); "" if dense.
        base_bytes: bytes of the base weight as stored (quantized data, scales, bias).
    """

    target: str
    op: str
    shape: tuple[int, int]
    method: str
    group: str
    trainable: int
    note: str = ""
    scheme: str = ""
    base_bytes: int = 0


@dataclasses.dataclass
class Plan:
    """What `lfx.plan` found: `print(plan)` shows it as a table.

    Args:
        rows: one `PlanRow` per target, in graph order.
        shared: group name -> parameters its targets share (LoRTA's factors, ...).
        trainable: parameters the adapter would train, shared and trained modules included.
        base: parameters of the model.
        modes: group name -> its shared structure, in words (LoRTA's modes).
        left_out: target -> why "all-linear" left it out (output heads, ...).
        trained: `Spec.train`: parameter name -> its size.
        layers: block path -> its layer's class, with `layers=` (or a graph that has blocks).
        slow_kernels: "scheme on device" -> what its known-slow kernel costs.
    """

    rows: list[PlanRow]
    shared: dict[str, int]
    trainable: int
    base: int
    modes: dict[str, str] = dataclasses.field(default_factory=dict)
    left_out: dict[str, str] = dataclasses.field(default_factory=dict)
    trained: dict[str, int] = dataclasses.field(default_factory=dict)
    layers: dict[str, str] = dataclasses.field(default_factory=dict)
    slow_kernels: dict[str, str] = dataclasses.field(default_factory=dict)

    def __str__(self) -> str:
        """The table: one line per target, the shared parameters, the totals, then what was left out."""
        header = ("target", "op", "weight (out x in)", "method", "trainable")
        body = [(r.target, r.op, f"{r.shape[0]} x {r.shape[1]}", r.method + (f"  [{r.note}]" if r.note else ""),
                 f"{r.trainable:,}") for r in self.rows]
        if any(r.scheme for r in self.rows):
            header = (*header, "base")
            body = [(*row, f"{r.scheme}, {r.base_bytes:,} B" if r.scheme else f"dense, {r.base_bytes:,} B")
                    for row, r in zip(body, self.rows)]
        shared = [(f"[shared by group {g}] {self.modes.get(g, '')}".rstrip(), f"{n:,}")
                  for g, n in self.shared.items() if n or self.modes.get(g)]
        widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
        widths[4] = max([widths[4], *(len(count) for _, count in shared)])
        line = "  ".join("-" * w for w in widths)
        fmt = lambda row: "  ".join(c.rjust(w) if i == 4 else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths)))
        span = sum(widths[:4]) + 2 * 3  # a group's line spans the first four columns (longer ones overflow)
        share = 100.0 * self.trainable / max(self.base, 1)
        quantized = [r for r in self.rows if r.scheme]
        lines = [fmt(header), line, *map(fmt, body),
                 *(f"{text.ljust(span)}  {count.rjust(widths[4])}" for text, count in shared), line,
                 (f"{len(self.rows)} targets; trainable {self.trainable:,} of base {self.base:,} "
                  f"parameters ({share:.3f}%)")]
        if quantized:
            stored = sum(r.base_bytes for r in quantized)
            dense = sum(4 * r.shape[0] * r.shape[1] for r in quantized)
            lines.append(f"{len(quantized)} quantized targets: {stored:,} bytes as stored, "
                         f"{dense:,} as fp32 weights ({stored / max(dense, 1):.2f}x)")
        for where, cost in self.slow_kernels.items():
            lines.append(f"slow kernel: {where}: {cost}")
        if self.trained:
            width = max(map(len, self.trained))
            lines += ["", f"trained in full by Spec.train ({sum(self.trained.values()):,} parameters, counted above):"]
            lines += [f"  {name.ljust(width)}  {count:,}" for name, count in self.trained.items()]
        if self.layers:
            kinds = sorted(set(self.layers.values()))
            lines += ["", f"layer blocks ({len(self.layers)}, {', '.join(kinds)}): {', '.join(self.layers)}"]
        if self.left_out:
            width = max(map(len, self.left_out))
            lines += ["", f"left out by all-linear ({len(self.left_out)}):"]
            lines += [f"  {name.ljust(width)}  {why}" for name, why in self.left_out.items()]
        return "\n".join(lines)


def _describe(method) -> str:
    options = ", ".join(f"{k}={v}" for k, v in method.config().items() if k in ("rank", "alpha"))
    return f"{method.kind}({options})"


def _dense_bytes(gm, target) -> int:
    try:
        weight = gm.get_parameter(target.weight)
    except AttributeError:
        return 0
    return weight.numel() * weight.element_size()


@api_options(positional=2)
def plan(model: nn.Module, spec: Spec, *, example_inputs: tuple[Any, ...] | None = None,
         example_kwargs: dict[str, Any] | None = None, layers: str | Sequence[str] | None = None,
         dynamic: bool = True, dynamic_shapes: Any = None, cache_dir: str | os.PathLike | None = None,
         trace_blocks: bool = True) -> Plan:
    """What `rewrite(model, spec, ...)` would adapt, as a printable table; the model is unchanged.

    The capture is memoised, so a following `rewrite` with the same model and examples does
    not trace again.

    Args:
        model: the model (an `nn.Module`), or a rewritten graph (then its existing adapters
            stay as they are and are not listed).
        spec: which targets to adapt and with which method.
        example_inputs: positional example arguments, as for `rewrite`.
        example_kwargs: keyword example arguments, as for `rewrite`.
        layers: "auto" or glob patterns, as for `rewrite`: also list the layer blocks it would
            make; a graph that has blocks already lists its own.
        dynamic: as for `rewrite`.
        dynamic_shapes: as for `rewrite`.
        cache_dir: as for `rewrite`.
        trace_blocks: as for `rewrite`.

    Returns:
        A `Plan`: `print(plan)` shows the targets, their methods and trainable parameters.

    Raises:
        ModelTypeError: `model` is not an `nn.Module`.
        CaptureError: the model could not be captured with these examples.
        SpecError: a bad spec or `layers`, or a pattern that matches nothing.
        TargetError: a pattern names a weight that is not linear-like.
    """
    gm = capture(model, example_inputs, example_kwargs, dynamic=dynamic, dynamic_shapes=dynamic_shapes,
                 cache_dir=cache_dir, trace_blocks=trace_blocks)
    existing = {path: type(gm.get_submodule(path)).__name__.removesuffix("Block") for path in blocks(gm)}
    gm = flat_view(gm)
    targets, assignment = resolve(gm, spec)
    with torch.device("meta"):
        groups, group_of = build_groups(assignment, targets)
    regions = {r.output: r for r in find_regions(gm)}
    rows, slow = [], {}
    for name, method in assignment.items():
        unit = groups[group_of[name]].unit(name)
        t = targets[name]
        rank = method.config().get("rank")
        note = "rank > min(out, in)" if isinstance(rank, int) and method.kind == "lora" and rank > min(t.shape) else ""
        if isinstance(t.kind, ExpertsKind):  # the weight column shows one expert's matrix
            note = f"{t.kind.experts} experts" + (", one update shared" if getattr(unit, "shared_experts", False) else "")
        region = regions.get(t.sites[0]) if t.quantized else None
        base_bytes = region_bytes(gm, region) if region is not None else _dense_bytes(gm, t)
        if region is not None and (t.kind.scheme, region_device(gm, region).type) in SLOW_KERNELS:
            device = region_device(gm, region).type
            slow[f"{t.kind.scheme} on {device}"] = SLOW_KERNELS[t.kind.scheme, device]
        rows.append(PlanRow(name, t.op, t.shape, _describe(method), group_of[name],
                            sum(p.numel() for p in unit.parameters()), note,
                            t.kind.scheme if t.quantized else "", base_bytes))
    shared = {g: sum(p.numel() for p in group.parameters()) - sum(p.numel() for p in group.units.parameters())
              for g, group in groups.items()}
    trained = {name: param.numel() for name, param in resolve_trained(gm, spec).params.items()}
    trainable = sum(p.numel() for group in groups.values() for p in group.parameters()) + sum(trained.values())
    base = sum(p.numel() for p in gm.parameters())
    modes = {g: group.describe() for g, group in groups.items() if group.describe()}
    uses_all_linear = any(pattern == ALL_LINEAR for pattern, _ in spec.rules())
    skipped = {n: why for n, why in left_out(gm, targets).items() if n not in assignment} if uses_all_linear else {}
    found = existing or (candidates(gm, layers) if layers is not None else {})
    return Plan(rows, shared, trainable, base, modes, skipped, trained, found, slow)
