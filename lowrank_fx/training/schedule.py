"""Learning-rate schedules: a factor of each parameter group's own base rate, by optimizer step.

    warmup:  f(t) = (t + 1) / warmup                        for t < warmup
    cosine:  f(t) = m + (1 - m) · (1 + cos(π p)) / 2        p = (t - warmup) / (total - warmup)
    linear:  f(t) = m + (1 - m) · (1 - p)
    constant: f(t) = 1
with m = min_ratio, p clipped to [0, 1]. The LoRA+ groups keep their ratio: every group's
rate is its base rate times the same f(t). Up to `total` these are torch's schedulers:
LinearLR(1 / warmup, 1, warmup - 1), then CosineAnnealingLR(total - warmup, eta_min = m · lr)
or LinearLR(1, m, total - warmup).
"""

from __future__ import annotations

import math

from ..errors import SpecError

SCHEDULES = ("cosine", "linear", "constant")


def check_schedule(name: str, warmup: int, total: int | None) -> None:
    if name not in SCHEDULES:
        raise SpecError(f"schedule must be one of {SCHEDULES}, got {name!r}")
    if not isinstance(warmup, int) or warmup < 0:
        raise SpecError(f"warmup_steps must be a non-negative integer, got {warmup!r}")
    if name != "constant" and total is None:
        raise SpecError(f"the {name!r} schedule needs the number of steps: fit(batches, steps=N), "
                        "fit(batches, epochs=N) over batches that have a len(), or schedule='constant'")


def lr_factor(step: int, name: str, warmup: int, total: int | None, min_ratio: float = 0.0) -> float:
    """f(step) for optimizer step `step` (0-based)."""
    if step < warmup:
        return (step + 1) / warmup
    if name == "constant":
        return 1.0
    progress = min(max((step - warmup) / max(total - warmup, 1), 0.0), 1.0)
    shape = (1 + math.cos(math.pi * progress)) / 2 if name == "cosine" else 1 - progress
    return min_ratio + (1 - min_ratio) * shape
