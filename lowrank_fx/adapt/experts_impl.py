"""Which transformers experts implementation a capture traces (graph/experts.py).

transformers 5 runs a mixture-of-experts block through `config._experts_implementation`: "eager"
loops over the experts hit, a data-dependent loop that torch.export would fix to the example's
routing; "batched_mm" (index the stack by each pair's expert, then bmm) and "grouped_mm" (rows
sorted by expert, one grouped matmul) keep the routing a tensor of the graph. A capture traces
"batched_mm" unless `experts_implementation("grouped_mm")` says otherwise: batched graphs also
export to ONNX; grouped ones train faster (ONNX has no grouped matmul). The model's own setting
is put back after the capture, and the choice is part of the capture's memo and cache keys.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

from torch import nn

from ..errors import SpecError

IMPLEMENTATIONS = ("batched_mm", "grouped_mm")
_chosen = contextvars.ContextVar("lowrank_fx_experts_implementation", default="batched_mm")


@contextlib.contextmanager
def experts_implementation(name: str) -> Iterator[None]:
    """Captures inside this `with` block trace transformers' `name` experts implementation.

    Args:
        name: "batched_mm" (the default outside the block: exports to ONNX too) or
            "grouped_mm" (trains faster; ONNX has no grouped matmul).

    Returns:
        A context manager; `rewrite` and `plan` called inside it capture with `name`.

    Raises:
        SpecError: `name` is not one of the two.
    """
    if name not in IMPLEMENTATIONS:
        raise SpecError(f"experts_implementation must be one of {', '.join(map(repr, IMPLEMENTATIONS))}, got "
                        f"{name!r} (the eager loop over experts would fix the example's routing into the graph)")
    token = _chosen.set(name)
    try:
        yield
    finally:
        _chosen.reset(token)


def chosen() -> str:
    """The experts implementation a capture made now traces."""
    return _chosen.get()


def _experts_configs(model: nn.Module) -> list:
    """The configs the model's transformers experts modules dispatch on, once each."""
    configs = {}
    for module in model.modules():
        config = getattr(module, "config", None)
        if hasattr(module, "_is_expert_parallel") and hasattr(config, "_experts_implementation_internal"):
            configs[id(config)] = config
    return list(configs.values())


def has_experts(model: nn.Module) -> bool:
    return bool(_experts_configs(model))


@contextlib.contextmanager
def traced_experts(model: nn.Module):
    """While exporting: every experts module of `model` runs the chosen implementation."""
    configs = _experts_configs(model)
    saved = [config._experts_implementation_internal for config in configs]
    for config in configs:
        config._experts_implementation_internal = chosen()
    try:
        yield
    finally:
        for config, value in zip(configs, saved):
            config._experts_implementation_internal = value
