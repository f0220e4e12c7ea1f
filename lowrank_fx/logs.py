"""The "lowrank_fx" logger: where the library's own messages go, and who sees them.

    from ..logs import logger
    logger("capture").info("tracing every block of %s: %s", name, why)   # "lowrank_fx.capture"

Call `logger(stage)` where a record is made, not once at import: it first attaches or takes off
the default handler below, as the application's logging setup stands at that moment.

Warning or log record (Python's convention: a warning asks the caller to change something, a
log record reports an event):
  - `warnings.warn`, with a category the caller can filter: the result is not what was asked,
    or may be wrong, and the message says what to change. RequantizeWarning (a requantized fold
    above its tolerance), "fit stopped early" (the batches ran out), "torch.compile failed"
    (training went on eagerly), a capture cache entry that could not be read or stored,
    examples of size 1 that fix an axis, targets that get no gradient, and
    LowRankFxDeprecationWarning.
  - a log record on "lowrank_fx" or a child "lowrank_fx.<stage>": what is happening and how
    long it took, nothing to change. INFO: the progress of slow stages and the first compile
    (progress.py), capture's fallbacks ("tracing every block of ...").

Who sees the records, with no logging set up by anyone:
  - the application configured no logging (the root logger and "lowrank_fx" have no
    handlers): a default handler on "lowrank_fx" writes each record as "lowrank_fx: message"
    to the current sys.stderr, and the logger's level is set to INFO while it is attached
    (unless the user set a level); it is taken off again once logging is configured;
  - logging configured: the records go where the application's handlers send them, at its
    levels (INFO is below the root logger's default WARNING: show them with
    `logging.getLogger("lowrank_fx").setLevel(logging.INFO)`);
  - `logging.getLogger("lowrank_fx").setLevel(logging.WARNING)` silences every INFO record;
  - LOWRANK_FX_QUIET=1 (any value but "" or "0"): no default handler, and no progress record
    or bar at all (progress.py); other records reach only handlers the application set up.
Third-party notices during lowrank_fx's calls: noise.py.
"""

from __future__ import annotations

import logging
import os
import sys

NAME = "lowrank_fx"
LOGGER = logging.getLogger(NAME)
QUIET = "LOWRANK_FX_QUIET"


class _Stderr(logging.Handler):
    """The default handler: each record as "lowrank_fx: message" on the current sys.stderr
    (pytest's capture and redirect_stderr included), above any tqdm bar shown there."""

    def emit(self, record: logging.LogRecord) -> None:
        line = f"{NAME}: {record.getMessage()}"
        try:
            bars = sys.modules.get("tqdm.std")
            if bars is not None:  # clears the bars on stderr, writes the line, draws them again
                bars.tqdm.write(line, file=sys.stderr)
            else:
                sys.stderr.write(line + "\n")
            sys.stderr.flush()
        except Exception:
            self.handleError(record)


_DEFAULT = _Stderr()
_SET_LEVEL = False  # whether this module set the logger's level to INFO with its default handler


def quiet() -> bool:
    """Whether $LOWRANK_FX_QUIET is set (to anything but "" or "0")."""
    return os.environ.get(QUIET, "") not in ("", "0")


def configure() -> None:
    """Attach or take off the default handler, as the module docstring says."""
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


def logger(stage: str | None = None) -> logging.Logger:
    """"lowrank_fx.`stage`" ("lowrank_fx" itself for None), with the default handler set up
    as the application's logging stands now."""
    configure()
    return LOGGER if stage is None else LOGGER.getChild(stage)
