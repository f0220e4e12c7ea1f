"""LoRA+ (Hayou, Ghosh, Yu 2024): the output-side factor learns ratio times faster.

LoRA's update s · B A starts at 0 because B = 0; the paper shows that with one learning
rate for both factors, feature learning is inefficient at large width, and that B should
get ratio · lr (ratio ≈ 16) while A keeps lr. Which parameters play B's role is up to each
method (`Unit.output_side()` for per-target parameters, `AdapterGroup.output_side()` for
shared ones):

  - LoRA: B (out, r).
  - LoRTA: the shared B (r, d_head): zero at init and nearest the output, exactly LoRA's B.
    A and the mode factors C_H, C_L, C_M keep lr: their sizes H, L, M do not grow with the
    width, and each entry scales a whole head, layer or matrix, so a 16x rate would make
    them jump rather than learn faster.
  - RandLoRA: λ (r, N), zero at init like LoRA's B, so it is what first moves ΔW off zero
    (and 1-D per basis, which LoRA+'s reference grouping also speeds up). γ (N, d) keeps lr:
    one entry per coordinate of the smaller side, summed over d in every output, like
    LoRA's A.

Every other trainable parameter of the graph (adapter or not) gets lr.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import fx

from ..deprecation import api_options
from ..errors import LowRankFxError, SpecError
from ..graph.record import CONTAINER, require_graph
from ..options import number


def _output_side(gm: fx.GraphModule) -> list[torch.nn.Parameter]:
    found = []
    for groups in getattr(gm, CONTAINER, {}).values():
        for group in groups.values():
            found += group.output_side()
            for unit in group.units.values():
                found += unit.output_side()
    return found


@api_options(positional=2)
def loraplus_param_groups(gm: fx.GraphModule, lr: float, *, ratio: float = 16.0,
                          weight_decay: float = 0.0) -> list[dict[str, Any]]:
    """Optimizer parameter groups: {"name": "base_lr"} at lr, {"name": "ratio_lr"} at ratio · lr.

    Only parameters that require grad are included, each once; an empty group is left out.

    Args:
        gm: a graph from `lfx.rewrite`.
        lr: the base learning rate (finite, > 0).
        ratio: the output-side factors' rate multiple (finite, > 0; 1 is one rate for all).
        weight_decay: every group's weight decay (finite, >= 0).

    Returns:
        A list of torch.optim parameter groups: dicts with "name", "params", "lr" and
        "weight_decay".

    Raises:
        ModelTypeError: `gm` is not a GraphModule.
        SpecError: a bad `lr`, `ratio` or `weight_decay`.
        LowRankFxError: the graph has no trainable parameters.
    """
    require_graph(gm, "lfx.loraplus_param_groups")
    lr = number("LoRA+", "lr", lr, "a finite number > 0", lambda v: v > 0)
    ratio = number("LoRA+", "ratio", ratio, "a finite number > 0 (1 is one rate for all)", lambda v: v > 0)
    weight_decay = number("LoRA+", "weight_decay", weight_decay, "a finite number >= 0", lambda v: v >= 0)
    fast = {id(p) for p in _output_side(gm)}
    trainable = [p for p in gm.parameters() if p.requires_grad]
    if not trainable:
        raise LowRankFxError("the graph has no trainable parameters; call lfx.rewrite(model, spec, ...) first")
    groups = [
        {"name": "base_lr", "params": [p for p in trainable if id(p) not in fast], "lr": lr,
         "weight_decay": weight_decay},
        {"name": "ratio_lr", "params": [p for p in trainable if id(p) in fast], "lr": lr * ratio,
         "weight_decay": weight_decay},
    ]
    return [g for g in groups if g["params"]]


@api_options(positional=2)
def loraplus_optimizer(gm: fx.GraphModule, lr: float, *, ratio: float = 16.0,
                       optimizer_cls: Callable[..., torch.optim.Optimizer] = torch.optim.AdamW,
                       weight_decay: float = 0.0, **kwargs: Any) -> torch.optim.Optimizer:
    """An optimizer over `loraplus_param_groups(gm, lr, ratio=ratio, weight_decay=weight_decay)`.

    Args:
        gm: a graph from `lfx.rewrite`.
        lr: the base learning rate (finite, > 0).
        ratio: the output-side factors' rate multiple (finite, > 0).
        optimizer_cls: the optimizer class, called as optimizer_cls(groups, lr=lr, **kwargs).
        weight_decay: every group's weight decay (finite, >= 0).
        **kwargs: further options of `optimizer_cls` (betas=..., eps=...).

    Returns:
        The optimizer.

    Raises:
        ModelTypeError: `gm` is not a GraphModule.
        SpecError: a bad option, or `optimizer_cls` refusing one of `kwargs`.
        LowRankFxError: the graph has no trainable parameters.
    """
    groups = loraplus_param_groups(gm, lr, ratio=ratio, weight_decay=weight_decay)
    return make_optimizer(optimizer_cls, groups, lr, kwargs)


def make_optimizer(optimizer_cls, groups: list[dict], lr: float, kwargs: dict) -> torch.optim.Optimizer:
    """`optimizer_cls(groups, lr=lr, **kwargs)`; SpecError naming the class when it is not one or
    refuses an option (a misspelt keyword)."""
    if not callable(optimizer_cls):
        raise SpecError(f"optimizer_cls must be an optimizer class such as torch.optim.AdamW, got {optimizer_cls!r}")
    try:
        return optimizer_cls(groups, lr=lr, **kwargs)
    except TypeError as err:
        name = getattr(optimizer_cls, "__name__", repr(optimizer_cls))
        raise SpecError(f"{name}(params, lr=..., {', '.join(f'{k}=...' for k in kwargs)}) failed: {err}; "
                        f"the extra keyword arguments go to {name}, so pass only options it takes") from None
