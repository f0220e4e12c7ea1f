"""What `Trainer.fit` reads: `batches` pass after pass (epochs), and how long that runs.

A re-iterable (a list, a DataLoader: each iter() starts over) is read pass after pass until
fit stops; a one-shot iterator (a generator, itertools.chain, ...) is a single pass. An
optimizer step takes `accumulate` micro-batches and never spans two passes, so a pass of n
micro-batches is ceil(n / accumulate) steps, the last one partial when accumulate does not
divide n. Resuming skips the micro-batches a checkpoint had consumed: whole passes without
reading them when len(batches) is known, the rest by reading them.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Iterator

from ..errors import SpecError


def one_shot(batches) -> bool:
    return isinstance(batches, Iterator)


def _pass_length(batches) -> int | None:
    """len(batches) for a re-iterable that has one, else None."""
    if one_shot(batches):
        return None
    try:
        return len(batches)
    except TypeError:
        return None


def check_fit(batches, steps, epochs) -> None:
    """Refuses what fit cannot train on: no batches, a length that is not a positive integer."""
    if not isinstance(batches, Iterable):
        raise SpecError(f"batches must be an iterable of batches (a list, a DataLoader, a generator), "
                        f"got {type(batches).__name__}")
    for name, value in (("steps", steps), ("epochs", epochs)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise SpecError(f"{name} must be a positive integer, got {value!r}")
    if steps is not None and epochs is not None:
        raise SpecError("pass steps=N (optimizer steps in all) or epochs=N (passes over the batches), not both")
    if epochs is not None and epochs > 1 and one_shot(batches):
        raise SpecError(f"epochs={epochs} reads the batches {epochs} times, but a {type(batches).__name__} "
                        "can be read once: pass a list or a DataLoader, or steps=N")
    if _pass_length(batches) == 0:
        raise SpecError("batches is empty: fit needs at least one batch")


def total_steps(batches, steps: int | None, epochs: int | None, accumulate: int) -> int | None:
    """The optimizer steps fit runs in all (the schedule's length); None when unknown."""
    if steps is not None:
        return steps
    length = _pass_length(batches)
    return None if length is None else (epochs or 1) * math.ceil(length / accumulate)


class Passes:
    """`batches` read pass after pass, from micro-batch `skip` (what a checkpoint consumed) on.

    `index`: passes read to their end; `length`: micro-batches per pass once known.
    """

    def __init__(self, batches, skip: int):
        self.batches, self.skip = batches, skip
        self.length = _pass_length(batches)
        self.index, self.position, self.opened = 0, 0, False
        if self.length:
            self.index, self.skip = divmod(skip, self.length)

    def open(self) -> Iterator | None:
        """An iterator over the rest of the next pass; None once a one-shot iterator was read."""
        if one_shot(self.batches) and self.opened:
            return None
        self.opened = True
        while True:
            iterator = self.batches if one_shot(self.batches) else iter(self.batches)
            self.position = sum(1 for _ in itertools.islice(iterator, self.skip))
            self.skip -= self.position
            if not self.skip or one_shot(self.batches) or not self.position:
                return iterator  # at the resume point, or the skip ran out of batches
            self.end(0)  # a whole pass consumed before the checkpoint

    def end(self, read: int) -> bool:
        """The pass ended after `read` more micro-batches; False when it gave none at all."""
        self.index += 1
        if not self.position + read:
            return False
        self.length = self.position + read
        return True

    def epochs(self, consumed: int) -> float | None:
        """Passes consumed in all (fractional: micro-batches / pass length); None while unknown."""
        return consumed / self.length if self.length else None
