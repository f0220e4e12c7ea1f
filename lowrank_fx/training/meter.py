"""Trainer.fit's progress: the tqdm bar (loss, tokens/s) and the tokens/s it returns.

The first step of a call compiles, so tokens/s counts the micro-batches after it.
"""

from __future__ import annotations

import time


class Meter:
    def __init__(self, show: bool, total: int | None, initial: int):
        self.bar = None
        if show:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)
        self.tokens, self.started, self.timing = 0, time.perf_counter(), False

    def micro_batch(self, tokens: int) -> None:
        self.tokens += tokens

    def step(self, loss: float) -> None:
        if not self.timing:  # the first step compiles
            self.timing, self.tokens, self.started = True, 0, time.perf_counter()
        if self.bar is not None:
            self.bar.update(1)
            rate = self.rate()
            self.bar.set_postfix(loss=f"{loss:.4f}", **({"tok_s": f"{rate:,.0f}"} if rate else {}))

    def rate(self) -> float | None:
        """Tokens per second over the micro-batches after the first step; None before any."""
        return self.tokens / max(time.perf_counter() - self.started, 1e-9) if self.tokens else None

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
