"""EVA (explained variance adaptation): A from the principal directions of each target's inputs.

Over a calibration run every target's input rows X (n, in) feed an incremental PCA (PEFT's
numerics: rows centred on the running mean, the previous components scaled by their singular
values stacked above the new rows and a mean-correction row, then `torch.svd_lowrank` with
q = 2k, 4 iterations, seed 42, signs flipped so each component's largest entry is positive).
A component set has converged when each of its rows has cosine similarity ≥ tau with the
previous step's. Targets that read the same activation share one PCA.

Ranks: each target may take up to round(rho · r) components; after every batch the rank budget
Σ r goes to the components with the largest explained-variance ratios over all targets, so a
target ends with k ∈ [0, round(rho · r)] (rho = 1: k = r everywhere). The run repeats until the
components each target was given have converged. Then A = the top k components (k, in)
(whiten: divided by √ of their singular values), B = 0; with adjust_scaling_factors the alpha
becomes alpha · k / r (the scale alpha / r stays), and a target with k = 0 gets no adapter.
"""

from __future__ import annotations

from collections import Counter

import torch

from ..errors import SpecError
from ..options import flag, number, options, set_options

SEED, NITER = 42, 4


@options
class EvaSettings:
    """PEFT's EvaConfig (without its label mask: every input row counts)."""

    rho: float = 2.0
    tau: float = 0.99
    whiten: bool = False
    adjust_scaling_factors: bool = True

    def __post_init__(self):
        set_options(self, rho=number("LoRA eva_config", "rho", self.rho, ">= 1", lambda v: v >= 1,
                                     why="a target may take up to round(rho * r) components"),
                    tau=number("LoRA eva_config", "tau", self.tau, "in [0, 1]", lambda v: 0 <= v <= 1,
                               why="a cosine-similarity threshold"),
                    whiten=flag("LoRA eva_config", "whiten", self.whiten),
                    adjust_scaling_factors=flag("LoRA eva_config", "adjust_scaling_factors",
                                                self.adjust_scaling_factors))


def eva_settings(init: str, value) -> EvaSettings | None:
    """The EVA settings of a LoRA (None unless init='eva'); `value` a dict, EvaSettings or None."""
    if init != "eva":
        if value is not None:
            raise SpecError(f"LoRA eva_config={value!r} only applies to init='eva', got init={init!r}")
        return None
    if value is None or isinstance(value, EvaSettings):
        return value or EvaSettings()
    if isinstance(value, dict):
        return EvaSettings(**value)
    raise SpecError(f"LoRA eva_config must be a dict of rho, tau, whiten, adjust_scaling_factors, got {value!r}")


class IncrementalPCA:
    """PCA of the rows of all batches seen, updated one batch at a time (see the module docstring)."""

    def __init__(self, components: int, tau: float):
        self.k, self.tau = components, tau
        # the running statistics and the last step's PCA: None until the first batch
        self.count: torch.Tensor | None = None
        self.mean: torch.Tensor | None = None
        self.var: torch.Tensor | None = None
        self.components: torch.Tensor | None = None
        self.values: torch.Tensor | None = None
        self.ratio: torch.Tensor | None = None
        self.converged = torch.zeros(components, dtype=torch.bool)

    def _mean_var(self, x: torch.Tensor):
        """Running mean and variance (float64) with the batch x (n, in) added (Chan et al.)."""
        n = torch.tensor([x.shape[0]], device=x.device)
        batch_sum = x.sum(0, dtype=torch.float64)
        centred = x - batch_sum / n
        spread = centred.square().sum(0, dtype=torch.float64) - centred.sum(0, dtype=torch.float64).square() / n
        if self.count is None or self.mean is None or self.var is None:  # the first batch
            return batch_sum / n, spread / n, n
        total = self.count + n
        last_sum = self.mean * self.count
        ratio = self.count.double() / n
        spread = self.var * self.count + spread + ratio / total * (last_sum / ratio - batch_sum).square()
        return (last_sum + batch_sum) / total, spread / total, total

    def update(self, x: torch.Tensor) -> None:
        """One PCA step on the rows x (n, in), then the convergence test against the last step."""
        if x.shape[0] < self.k:  # too few rows for k components: the batch is skipped (as PEFT)
            return
        x = x.to(torch.float32).clone()
        previous = None if self.components is None else self.components.clone()
        mean, var, total = self._mean_var(x)
        if previous is None or self.count is None or self.mean is None or self.values is None:
            x -= mean
        else:
            batch_mean = x.mean(0)
            x -= batch_mean
            correction = torch.sqrt(self.count.double() / total * x.shape[0]) * (self.mean - batch_mean)
            x = torch.vstack((self.values.view(-1, 1) * previous, x, correction))
        with torch.random.fork_rng():  # as PEFT: the seed does not touch the caller's random state
            torch.manual_seed(SEED)
            _, values, right = torch.svd_lowrank(x, q=2 * self.k, niter=NITER)
        rows = right.mH
        signs = torch.sign(rows[range(rows.shape[0]), rows.abs().argmax(1)])
        rows = rows * signs.view(-1, 1)
        self.count, self.mean, self.var = total, mean, var
        self.components, self.values = rows[:self.k], values[:self.k]
        self.ratio = (values.square() / torch.sum(var * total))[:self.k]
        if previous is not None:
            self.converged = (torch.nn.functional.cosine_similarity(self.components, previous) >= self.tau).cpu()


def rank_distribution(ratios: dict[str, torch.Tensor], budget: int, leaders: dict[str, str]) -> dict[str, int]:
    """Ranks by target: the `budget` largest explained-variance ratios over all targets (each
    target listing its leader's, up to its own cap, `ratios` in PEFT's order: leaders first);
    a leader then holds the largest rank of the targets sharing its PCA."""
    keys, values = zip(*[(name, value) for name, ratio in ratios.items() for value in ratio])
    order = torch.stack(values).argsort(descending=True)
    counts = Counter(keys[i] for i in order[:budget])
    ranks = {name: counts.get(name, 0) for name in ratios}
    for name, leader in leaders.items():
        if name != leader and ranks[leader] < ranks[name]:
            ranks[leader], ranks[name] = ranks[name], ranks[leader]
    return ranks
