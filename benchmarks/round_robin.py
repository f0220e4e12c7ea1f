"""Timing configurations in one process, interleaved round-robin, so that a change in the
machine's load falls on every configuration alike."""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable


def round_robin(fns: dict[str, Callable[[], object]], rounds: int, steps: int) -> tuple[dict[str, float], list[float]]:
    """Each fn called twice untimed (compile, warm-up), then `rounds` rounds of `steps` timed calls
    each, configuration after configuration. Returns (median seconds per call by key, the
    1-minute load average before the first round and after each)."""
    for fn in fns.values():
        fn(), fn()
    times: dict[str, list[float]] = {key: [] for key in fns}
    loads = [os.getloadavg()[0]]
    for _ in range(rounds):
        for key, fn in fns.items():
            for _ in range(steps):
                started = time.perf_counter()
                fn()
                times[key].append(time.perf_counter() - started)
        loads.append(os.getloadavg()[0])
    return {key: statistics.median(t) for key, t in times.items()}, loads
