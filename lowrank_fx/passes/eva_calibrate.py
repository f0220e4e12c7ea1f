"""EVA's data pass (methods/lora_eva.py): the components of each target's inputs, and its rank.

`rewrite(..., calibration=run)` calls run(graph) on the graph (in eval mode, without
gradients) before the adapter is added, and again while some target's components have not
converged (PEFT cycles its data loader the same way). Each call of the graph is one batch:
at its start the ranks are redistributed from the last batch's explained-variance ratios and
the targets whose given components have converged stop recording. Targets that read the same
activation node share one PCA, led by the first of them (PEFT: layers whose inputs are equal).
"""

from __future__ import annotations

import dataclasses
from typing import cast

import torch
from torch import fx

from ..errors import SpecError
from ..graph.targets import Target
from ..methods.lora_eva import IncrementalPCA, rank_distribution
from .calibrate import check_calibration, recording

MAX_PASSES = 100
_RUN: list = []  # the _EvaRun of the calibration under way


class _EvaRun:
    def __init__(self, leaders: dict[str, str], caps: dict[str, int], budget: int, tau: float):
        self.leaders, self.caps, self.budget = leaders, caps, budget
        self.pcas = {leader: IncrementalPCA(caps[leader], tau) for leader in dict.fromkeys(leaders.values())}
        self.order = [*self.pcas, *(name for name in leaders if name not in self.pcas)]  # PEFT's: leaders first
        self.ranks = dict(caps)
        self.active = dict.fromkeys(self.pcas, True)
        self.seen = dict.fromkeys(self.pcas, False)
        self.batches = 0

    def redistribute(self) -> None:
        """The ranks from the explained-variance ratios, once every PCA has had a step."""
        if self.batches and all(pca.components is not None for pca in self.pcas.values()):
            # every PCA has had a step, so each has its ratios
            ratios = {name: cast(torch.Tensor, self.pcas[self.leaders[name]].ratio)[:self.caps[name]]
                      for name in self.order}
            self.ranks = rank_distribution(ratios, self.budget, {n: self.leaders[n] for n in self.order})

    def batch_start(self) -> None:
        if self.finished:
            return
        self.redistribute()
        self.batches += 1
        self.active = {leader: not bool(pca.converged[:self.ranks[leader]].all()) for leader, pca in self.pcas.items()}

    @property
    def finished(self) -> bool:
        return self.batches > 0 and not any(self.active.values())

    def record(self, x: torch.Tensor, leader: str) -> None:
        self.seen[leader] = True
        if self.active[leader]:
            self.pcas[leader].update(x.detach().reshape(-1, x.shape[-1]))


def _batch_start() -> None:
    _RUN[-1].batch_start()


def _record(x: torch.Tensor, leader: str) -> None:
    _RUN[-1].record(x, leader)


def _eva_components(gm: fx.GraphModule, names: list[str], targets: dict[str, Target], ranks: dict[str, int],
                   settings, calibration) -> dict[str, torch.Tensor]:
    """{target: A (k, in) fp32} for `names` (in model order) with LoRA ranks `ranks`; k may be 0."""
    check_calibration("eva", calibration)
    rho = settings.rho
    if rho > 1000:  # PEFT's ceiling for very large rho
        rho = min(rho, max(max(p.shape) for p in gm.parameters()) // max(ranks.values()))
    nodes = {node.name: node for node in gm.graph.nodes}
    first_of: dict[tuple, str] = {}
    leaders = {}
    for name in names:
        target = targets[name]
        key = (tuple(target.inputs) if target.inputs else
               tuple(nodes[site].args[index] for site, index in zip(target.sites, target.activations)))
        leaders[name] = first_of.setdefault(key, name)
    caps = {name: round(ranks[name] * rho) for name in names}
    for name in names:  # a shared PCA gives every target of it the largest cap
        caps[name] = max(caps[n] for n in names if leaders[n] == leaders[name])
        if caps[name] > targets[name].in_features:
            raise SpecError(f"LoRA(init='eva') on {name}: round(rho * rank) = {caps[name]} components exceed its "
                            f"{targets[name].in_features} input features; lower the rank or eva_config's rho")
    run = _EvaRun(leaders, caps, sum(ranks[name] for name in names), settings.tau)
    _RUN.append(run)
    modes = {module: module.training for module in gm.modules()}
    gm.eval()
    try:
        with recording(gm, list(run.pcas), targets, _record, _batch_start), torch.no_grad():
            for _ in range(MAX_PASSES):
                calibration(gm)
                if not all(run.seen.values()) or any(pca.components is None for pca in run.pcas.values()):
                    break  # a target never reached, or no batch with enough rows: repeating changes nothing
                run.redistribute()  # after the pass's last batch, as before the next one
                if all(bool(pca.converged[:run.ranks[leader]].all()) for leader, pca in run.pcas.items()):
                    break
    finally:
        _RUN.pop()
        for module, training in modes.items():
            module.training = training
    unseen = [leader for leader, seen in run.seen.items() if not seen]
    if unseen:
        raise SpecError(f"the calibration run never reached {', '.join(unseen[:5])}: EVA needs their inputs; make "
                        "run(graph) call the graph on data that goes through every target")
    components = {}
    for name in names:
        pca, rank = run.pcas[leaders[name]], run.ranks[name]
        if pca.components is None or not bool(pca.converged[:rank].all()):
            raise SpecError(f"EVA's components of {name} did not converge in {MAX_PASSES} passes over the calibration "
                            f"data, or no batch had the {caps[name]} rows they need; give more (or larger) samples, "
                            f"or lower eva_config's tau ({settings.tau:g})")
        rows = pca.components[:rank]
        if settings.whiten and pca.values is not None:  # set with the components
            rows = rows / pca.values[:rank].sqrt().view(-1, 1)
        components[name] = rows.float()
    return components



def eva_assignment(gm: fx.GraphModule, assignment: dict, targets: dict[str, Target], calibration):
    """(the assignment with EVA's ranks, {target: A}) after EVA's data pass, for the targets
    whose method is LoRA(init='eva') (one pass per distinct EVA setting). A target given rank k ≠ r
    gets rank k (alpha · k / r with adjust_scaling_factors); one given 0 gets no adapter."""
    by_settings: dict = {}
    for name, method in assignment.items():
        if getattr(method, "init", "") == "eva":
            by_settings.setdefault(method.eva_config, []).append(name)
    if not by_settings:
        return assignment, {}
    components = {}
    for settings, names in by_settings.items():
        ranks = {name: assignment[name].rank for name in names}
        components.update(_eva_components(gm, names, targets, ranks, settings, calibration))
    result = {}
    for name, method in assignment.items():
        rows = components.get(name)
        if rows is None or rows.shape[0] == method.rank:
            result[name] = method
        elif rows.shape[0]:
            factor = rows.shape[0] / method.rank if method.eva_config.adjust_scaling_factors else 1.0
            result[name] = dataclasses.replace(method, rank=rows.shape[0], alpha=method.alpha * factor)
        else:
            del components[name]
    return result, components
