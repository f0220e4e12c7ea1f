"""Progress of the steps that take seconds on a real model (capture, the quantized layer checks,
folding, the merged state dict, ONNX and generation export).

    with stage("exporting ONNX (torch.onnx.export)"):   # or @stage("...") on a function
        ...
    for layer in steps(layers, "checking quantized layers"):
        ...

`stage` logs a start line and an end line with the seconds taken (or "failed after") to the
"lowrank_fx" logger at INFO. `steps` wraps a per-layer loop in a tqdm bar on stderr that
appears only once the loop has run `BAR_DELAY` seconds, so small models show no bar; it is
removed when the loop ends.

Who sees it:
  - LOWRANK_FX_QUIET=1 (any value but "" or "0"): nothing, no record and no bar;
  - logging not configured (the root logger and "lowrank_fx" have no handlers): the lines go to
    stderr through a default handler lowrank_fx attaches (the logger's level set to INFO while
    it is attached, unless the user set a level); it is taken off again once logging is
    configured or QUIET is set;
  - logging configured: the records go where the user's handlers send them, at the levels the
    user set (INFO is below the root logger's default WARNING: show them with
    `logging.getLogger("lowrank_fx").setLevel(logging.INFO)`).
`logging.getLogger("lowrank_fx").setLevel(logging.WARNING)` silences both lines and bars.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time

LOGGER = logging.getLogger("lowrank_fx")
QUIET = "LOWRANK_FX_QUIET"
BAR_DELAY = 2.0  # seconds a loop runs before its bar appears


class _Stderr(logging.Handler):
    """The default handler: each record as "lowrank_fx: message" on the current sys.stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(f"{record.name}: {record.getMessage()}\n")
            sys.stderr.flush()
        except Exception:  # a closed or broken stderr: logging's own policy
            self.handleError(record)


_DEFAULT = _Stderr()
_SET_LEVEL = False  # whether lowrank_fx set the logger's level to INFO with its default handler


def quiet() -> bool:
    """Whether $LOWRANK_FX_QUIET silences progress."""
    return os.environ.get(QUIET, "") not in ("", "0")


def _configure() -> bool:
    """Attach or take off the default handler (module docstring); whether progress is shown."""
    global _SET_LEVEL
    wanted = not quiet() and not logging.getLogger().handlers and all(h is _DEFAULT for h in LOGGER.handlers)
    if wanted and _DEFAULT not in LOGGER.handlers:
        LOGGER.addHandler(_DEFAULT)
        if LOGGER.level == logging.NOTSET:
            LOGGER.setLevel(logging.INFO)
            _SET_LEVEL = True
    elif not wanted and _DEFAULT in LOGGER.handlers:
        LOGGER.removeHandler(_DEFAULT)
        if _SET_LEVEL and LOGGER.level == logging.INFO:
            LOGGER.setLevel(logging.NOTSET)
        _SET_LEVEL = False
    return not quiet() and LOGGER.isEnabledFor(logging.INFO)


@contextlib.contextmanager
def stage(what: str):
    """Log "`what` ..." on entry and "`what`: done in S s" (or "failed after S s") on exit."""
    if not _configure():
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


def steps(iterable, desc: str, total: int | None = None):
    """`iterable` under a tqdm bar on stderr (shown after BAR_DELAY seconds, then removed), or
    `iterable` itself where progress is not shown."""
    if not _configure():
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=f"lowrank_fx: {desc}", total=total, delay=BAR_DELAY, leave=False,
                file=sys.stderr)
