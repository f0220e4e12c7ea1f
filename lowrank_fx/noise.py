"""Third-party notices that ask nothing of a lowrank_fx user, silenced during lowrank_fx's own
calls only (capture, ONNX and generation export, quantize_base, a first compile).

    with quiet_third_party():
        program = torch.onnx.export(...)

The known noise, and why the user cannot act on it:
  warnings
    FutureWarning "`isinstance(treespec, LeafSpec)` is deprecated": torch's own pytree code
        (torch.export, deep copies of its graphs) uses the form it deprecates.
  log records (logger: phrase)
    torch.onnx._internal.exporter._registration: "torchvision is not installed": torch.onnx
        skips torchvision's detection ops, on every export; no lowrank_fx graph holds them.
    torchao: "Failed to load": torchao's optional CUDA / mxfp8 kernels, absent from CPU
        builds, at torchao's first import.
    torch.utils._pytree: "register_constant() on Enum subclasses is deprecated": torchao
        registering its own enums, at its first import.
Everything else passes: other warnings, other records of those loggers, and all of it outside
the `with` block: nothing is filtered process-wide, so the same notice raised by the
application's own code still shows. torch, torchao and onnxscript write these notices through
`warnings` and `logging` only, so no stream is redirected.

How: `warnings.catch_warnings()` around an "ignore" filter per warning above (category and
message pattern), so the filters the caller had come back on exit, an exception included; and a
`logging.Filter` per logger, added on entry and removed on exit. Nested blocks are fine.

Threads: the warnings filters are process-global (`warnings.catch_warnings` is not
thread-safe): while a block runs, a matching warning from another thread is silenced too, and
another thread's change to the filters in that time is undone on exit. The logging filters
drop only the records above, whichever thread makes them.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator

# (category, message pattern matched from the start of the message)
WARNINGS = (
    (FutureWarning, r"`isinstance\(treespec, LeafSpec\)` is deprecated"),
)

# logger name -> phrases that mark its unactionable records
RECORDS = {
    "torch.onnx._internal.exporter._registration": ("torchvision is not installed",),
    "torchao": ("Failed to load",),
    "torch.utils._pytree": ("register_constant() on Enum subclasses is deprecated",),
}


class _Drop(logging.Filter):
    """Drop a logger's records whose message holds one of `phrases`."""

    def __init__(self, phrases: tuple[str, ...]):
        super().__init__()
        self.phrases = phrases

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(phrase in message for phrase in self.phrases)


@contextlib.contextmanager
def quiet_third_party() -> Iterator[None]:
    """Silence the known third-party noise (module docstring) inside the block, and restore the
    warnings filters and logger filters on exit, an exception included."""
    added = [(logging.getLogger(name), _Drop(phrases)) for name, phrases in RECORDS.items()]
    with warnings.catch_warnings():
        for category, pattern in WARNINGS:
            warnings.filterwarnings("ignore", message=pattern, category=category)
        for log, drop in added:
            log.addFilter(drop)
        try:
            yield
        finally:
            for log, drop in added:
                log.removeFilter(drop)
