"""What to try after torch.export failed to capture a model: the CaptureError's "Try:" line.

Each hint says what torch.export could not do and what to pass or change, read from the
examples, the model's forward and config, and the error's text:

  - a 1-D `input_ids` (one sequence without its batch dimension): pass a 2-D (batch, seq) tensor;
  - Python code branching on a tensor's values (`if x.sum() > 0:`), at the line the error names:
    tensor ops (torch.where, torch.cond) or a branch on shapes only;
  - a decoder without `use_cache=False`; a dimension that could not stay dynamic.
"""

from __future__ import annotations

import inspect
import re

import torch
from torch import nn

_RAISED_AT = re.compile(r'The following call raised this error:\s*\n\s*File "([^"]+)", line (\d+), in (\S+)\n\s*(.+)')


def _bound(model: nn.Module, args: tuple, kwargs: dict) -> dict:
    """{argument name: example}, as far as known."""
    try:
        return dict(inspect.signature(model.forward).bind_partial(*args, **kwargs).arguments)
    except (TypeError, ValueError):
        return dict(kwargs)


def _flat_ids(model: nn.Module, named: dict) -> list[str]:
    """Hints for token ids given without a batch dimension."""
    main = getattr(model, "main_input_name", None)
    return [
        f"{name} is 1-D (shape {tuple(value.shape)}), while the model takes a batch: pass a 2-D "
        f"(batch, seq) tensor, e.g. {name}[None] or tokenizer(text, return_tensors='pt')"
        for name, value in named.items()
        if isinstance(value, torch.Tensor) and value.dim() == 1 and not value.is_floating_point()
        and (name.endswith("input_ids") or name == main)
    ]


def _data_dependent(text: str) -> str:
    where = _RAISED_AT.search(text)
    at = f" (at {where.group(1)}:{where.group(2)} in {where.group(3)}: `{where.group(4).strip()}`)" if where else ""
    return (
        f"the model's Python code branches on, or converts to a number, a tensor's values{at}, e.g. "
        "`if x.sum() > 0:` or `float(t)`, which torch.export cannot capture: move that branch out of forward, "
        "express it with tensor ops (torch.where, torch.cond), or make it depend on shapes only"
    )


def hint(model: nn.Module, args: tuple, kwargs: dict, error: Exception) -> str:
    """What to try after torch.export failed (see the module docstring)."""
    text = str(error)
    hints = _flat_ids(model, _bound(model, args, kwargs))
    config = getattr(model, "config", None)
    if getattr(config, "use_cache", False) and "use_cache" not in kwargs:
        hints.append("decoder models need example_kwargs={'use_cache': False}")
    if "data-dependent" in text or "DataDependent" in type(error).__name__:
        hints.append(_data_dependent(text))
    elif "Constraints violated" in text or "specialized" in text or "Dim" in text:
        hints.append(
            "a dimension could not stay dynamic: pass dynamic_shapes=... (torch.export form) "
            "marking it static, or dynamic=False"
        )
    hints.append("capture it yourself with torch.export and pass the resulting GraphModule")
    return "; or ".join(hints)
