"""Progress of the steps that take seconds on a real model (capture, the quantized layer checks,
folding, the merged state dict, ONNX and generation export, a first compile).

    with stage("exporting ONNX (torch.onnx.export)"):   # or @stage("...") on a function
        ...
    for layer in steps(layers, "checking quantized layers"):
        ...
    note("compiling the decode step ...")              # one line, nothing timed

`stage` logs a start line and an end line with the seconds taken (or "failed after") to the
"lowrank_fx" logger at INFO. `steps` wraps a per-layer loop in a tqdm bar on stderr that
appears only once the loop has run `BAR_DELAY` seconds, so small models show no bar; it is
removed when the loop ends. `note` logs one line.

Who sees them (logs.py: the default handler when logging is not configured):
  - LOWRANK_FX_QUIET=1: nothing, no record and no bar;
  - otherwise the records follow the "lowrank_fx" logger's level and handlers:
    `logging.getLogger("lowrank_fx").setLevel(logging.WARNING)` silences both lines and bars.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Iterable, Iterator

from .logs import LOGGER, logger, quiet

BAR_DELAY = 2.0  # seconds a loop runs before its bar appears


def _shown() -> bool:
    """Whether progress is shown (the default handler set up first, logs.configure)."""
    return not quiet() and logger().isEnabledFor(logging.INFO)


def note(what: str) -> None:
    """Log `what` as one progress line (before a wait that has no end line of its own)."""
    if _shown():
        LOGGER.info("%s", what)


@contextlib.contextmanager
def stage(what: str) -> Iterator[None]:
    """Log "`what` ..." on entry and "`what`: done in S s" (or "failed after S s") on exit."""
    if not _shown():
        yield
        return
    LOGGER.info("%s ...", what)
    start = time.perf_counter()
    try:
        yield
    except BaseException:
        LOGGER.info("%s: failed after %.1f s", what, time.perf_counter() - start)
        raise
    LOGGER.info("%s: done in %.1f s", what, time.perf_counter() - start)


def steps(iterable: Iterable, desc: str, total: int | None = None) -> Iterable:
    """`iterable` under a tqdm bar on stderr (shown after BAR_DELAY seconds, then removed), or
    `iterable` itself where progress is not shown."""
    if not _shown():
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=f"lowrank_fx: {desc}", total=total, delay=BAR_DELAY, leave=False,
                file=sys.stderr)
