"""`combine_adapters(gm, {"a": 0.7, "b": 0.3}, adapter="ab", combination=...)`: a new LoRA adapter
made from weighted adapters of the graph, with PEFT's `add_weighted_adapter` numerics.

For each target adapted by any of the adapters (those that lack it are left out there), with
weights w_i and scales s_i (alpha / r):

  - "linear", "ties", "dare_linear", "dare_ties", "magnitude_prune" merge the factors, A from
    the A_i with weights sign(w_i s_i) √|w_i s_i| and B from the B_i with weights √|w_i s_i|
    (combine_math.merge); every adapter needs the same rank r, the result has rank r. For more
    than one adapter B A is then a product of sums, not Σ w_i ΔW_i (PEFT's approximation);
  - "cat" stacks A' = [w_1 s_1 A_1; …], B' = [B_1 … B_n]: B' A' = Σ w_i ΔW_i exactly, rank Σ r_i;
  - "svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd" merge the
    updates ΔW_i themselves (in the layout PEFT merges them: the stored weight's, so an
    embedding's (num, dim)) and keep the best rank-`svd_rank` factors of the result (default
    the largest adapter rank). These accept any method with a ΔW: LoRTA, RandLoRA and DoRA too
    (DoRA's whole update; PEFT would use its LoRA part only).

The new adapter is `LoRA(rank=R, alpha=R)` (scale 1: B A is the combined update) over exactly
those targets, with the first adapter's dropout. Ranks below R at a target are zero rows of A
and columns of B (no update). As in PEFT it starts inactive and frozen: the active set and
every `requires_grad` stay as they were. One adapter alone is always combined "linear" (PEFT
does the same). DARE draws its masks with torch's Bernoulli sampler, target by target in the
model's module order (A's then B's for the factor combinations): `seed=None` uses torch's global
generator exactly as PEFT does, an int seed a generator of its own (the global one untouched).
"""

from __future__ import annotations

import math
import numbers
import re

import torch
from torch import fx

from ..deprecation import api_options
from ..errors import SpecError, nearest
from ..graph.gates import GATES
from ..graph.op_kinds import ConvKind, EmbeddingKind
from ..graph.record import CONTAINER, Record, check_adapter_name, require_graph
from ..graph.targets import Target, find_targets
from ..methods.lora import LoRA
from ..methods.lora_unit import LoRAUnit
from ..passes.fold_updates import base_matrix
from ..passes.layers import flat_view
from ..spec import Spec
from .combine_math import COMBINATIONS, SIGN_METHODS, merge, pad_rank, svd_factors
from .hotswap import loaded_factor
from .rewrite import resolve, rewrite

SVD_METHODS = ("lora", "lorta", "randlora")  # methods whose ΔW an SVD combination reads


@api_options(positional=2, renamed={"name": "adapter"})
def combine_adapters(gm: fx.GraphModule, weights: dict[str, float], *, adapter: str, combination: str = "svd",
                     density: float | None = None, majority_sign_method: str = "total", svd_rank: int | None = None,
                     svd_clamp: float | None = None, svd_full_matrices: bool = True,
                     seed: int | None = None) -> fx.GraphModule:
    """Add adapter `adapter` to `gm`, IN PLACE, combined from `weights` by `combination`.

    Like `rewrite` on a rewritten graph, this adds an adapter to the graph itself (the source
    adapters stay as they are) and returns `gm`; the new adapter starts inactive and frozen
    (module docstring). Nothing changes if anything is refused.

    Args:
        gm: a graph from `lfx.rewrite` holding the adapters to combine.
        weights: {adapter name: weight}; a negative weight subtracts an adapter.
        adapter: the new adapter's name (it must not exist yet). Was `name=`.
        combination: "svd" (default), "linear", "cat", "ties", "dare_linear", "dare_ties",
            "magnitude_prune", or an "_svd" form of the pruning ones (module docstring).
        density: the kept fraction, in (0, 1], for the pruning combinations.
        majority_sign_method: "total" or "frequency", for the ties ones.
        svd_rank: the new adapter's rank for the SVD ones (default: the largest adapter rank).
        svd_clamp: a quantile in [0, 1] clamping the SVD factors' entries (None: no clamping).
        svd_full_matrices: passed to torch.linalg.svd, as PEFT does.
        seed: DARE's sampler seed (None: torch's global generator, as PEFT).

    Returns:
        `gm` itself, now holding the new adapter.

    Raises:
        ModelTypeError: `gm` is not a GraphModule.
        SpecError: an unknown or existing adapter name, bad weights or options, or adapters
            the combination cannot read (DoRA, LoRA bias, Spec.train, unequal ranks, ...).
    """
    require_graph(gm, "lfx.combine_adapters")
    view = flat_view(gm)
    record = Record.find(view)
    known = list(record.adapters) if record is not None else []
    _check_call(weights, adapter, combination, known, density, majority_sign_method, svd_rank, svd_clamp,
                svd_full_matrices, seed)
    targets = find_targets(view, record.aliases)
    adapters = {source: _AdapterView(view, record, source) for source in weights}
    if len(adapters) == 1 and next(iter(adapters.values())).plain_lora():
        combination = "linear"  # as PEFT: one adapter is a scaled copy
    via_svd = COMBINATIONS[combination][2]
    for source in adapters.values():
        source.check(combination, targets)
    rank = _new_rank(combination, adapters, svd_rank)
    order = _module_order(record, targets, {t for a in adapters.values() for t in a.methods})
    generator = None if seed is None else _generator(seed, view, adapters)
    factors = {}
    with torch.no_grad():
        for target in order:
            present = [(adapters[a], float(w)) for a, w in weights.items() if target in adapters[a].methods]
            if via_svd:
                factors[target] = _svd_combined(view, targets[target], present, combination, rank, density,
                                                majority_sign_method, svd_clamp, svd_full_matrices, generator)
            else:
                factors[target] = _factor_combined(targets[target], present, combination, rank, density,
                                                   majority_sign_method, generator)
    first = next(iter(adapters.values()))
    dropout = getattr(first.methods[next(t for t in order if t in first.methods)], "dropout", 0.0)
    pattern = "re:^(?:" + "|".join(re.escape(t) for t in order) + ")$"
    spec = Spec(targets=[pattern], method=LoRA(rank=rank, alpha=float(rank), dropout=dropout))
    _install(gm, adapter, spec, factors)
    return gm


class _AdapterView:
    """One source adapter: its target -> method map and its units."""

    def __init__(self, gm: fx.GraphModule, record: Record, adapter: str):
        self.name = adapter
        info = record.adapters[adapter]
        if info.spec.train:
            raise SpecError(f"adapter {adapter!r} trains whole modules ({', '.join(info.spec.train)}, Spec.train): "
                            "full copies of a module cannot be combined by these rules; combine adapters "
                            "without Spec.train")
        assigned = resolve(gm, info.spec)[1]
        self.methods = {target: assigned[target] for target in info.groups}
        self.groups = {t: getattr(gm, CONTAINER)[adapter][group] for t, group in info.groups.items()}

    def unit(self, target: str):
        return self.groups[target].unit(target)

    def rank(self) -> int:
        """The adapter's rank: its largest over its targets (PEFT: max of r and rank_pattern)."""
        return max(method.rank for method in self.methods.values())

    def plain_lora(self) -> bool:
        return all(type(self.unit(t)) is LoRAUnit and self.unit(t).lora_B_bias is None for t in self.methods)

    def check(self, combination: str, targets: dict[str, Target]) -> None:
        via_svd = COMBINATIONS[combination][2]
        for target, method in self.methods.items():
            unit, kind = self.unit(target), targets[target].kind
            where = f"adapter {self.name!r} at {target}"
            if getattr(unit, "lora_B_bias", None) is not None:
                raise SpecError(f"{where} has a LoRA bias (LoRA(bias=True)), which no combination carries over "
                                "(PEFT drops it); combine adapters without bias")
            if via_svd and method.kind not in SVD_METHODS:
                raise SpecError(f"{where} is {type(method).__name__}, which has no low-rank update to combine; "
                                f"{combination!r} takes {', '.join(SVD_METHODS)} adapters")
            if not via_svd and type(unit) is not LoRAUnit:
                what = ("DoRA (its magnitude vector has no weighted sum)" if method.kind == "lora"
                        else type(method).__name__)
                raise SpecError(
                    f"{where} is {what}; {combination!r} combines LoRA factors A and B, so it takes plain LoRA "
                    f"adapters only. The SVD combinations ('svd', 'ties_svd', ...) combine any method's ΔW"
                )
            if isinstance(kind, ConvKind) and kind.groups > 1 and (via_svd or combination == "cat"):
                raise SpecError(f"{where} is a {kind.name} with groups={kind.groups}, whose LoRA is one block per "
                                f"group; {combination!r} cannot build grouped factors: use 'linear', 'ties', "
                                "'dare_linear', 'dare_ties' or 'magnitude_prune', or exclude it")


def _check_call(weights, name, combination, known, density, sign_method, svd_rank, svd_clamp, full, seed) -> None:
    """SpecError for anything wrong in the call itself, before any adapter is read."""
    if not known:
        raise SpecError("this graph has no adapters to combine; add some with lfx.rewrite(model, spec, adapter=...)")
    if not isinstance(weights, dict) or not weights:
        raise SpecError(f"weights must be a non-empty dict {{adapter name: weight}}, e.g. {{'a': 0.7, 'b': 0.3}}; "
                        f"got {weights!r}")
    unknown = [a for a in weights if a not in known]
    if unknown:
        raise SpecError(f"no adapter named {', '.join(map(repr, unknown))} in this graph; its adapters are "
                        f"{', '.join(map(repr, known))}")
    bad = {a: w for a, w in weights.items()
           if isinstance(w, bool) or not isinstance(w, numbers.Real) or not math.isfinite(w)}
    if bad:
        raise SpecError(f"weights must be finite numbers (negative ones subtract an adapter); got {bad}")
    check_adapter_name(name, "the new adapter's name")
    if name in known:
        raise SpecError(f"this graph already has an adapter named {name!r}; choose another name, or "
                        f"lfx.delete_adapter(gm, {name!r}) first")
    if combination not in COMBINATIONS:
        close = ", ".join(nearest(str(combination), COMBINATIONS, 3))
        raise SpecError(f"unknown combination {combination!r}; nearest: {close} (all: {', '.join(COMBINATIONS)})")
    pruning, _, via_svd = COMBINATIONS[combination]
    if pruning is not None and (isinstance(density, bool) or not isinstance(density, numbers.Real)
                                or not 0 < density <= 1):
        raise SpecError(f"{combination!r} prunes: give density=, the fraction of entries kept, in (0, 1]; "
                        f"got {density!r}")
    if pruning is None and density is not None:
        raise SpecError(f"density= only applies to the pruning combinations (ties, dare_*, magnitude_prune*), "
                        f"not {combination!r}")
    if sign_method not in SIGN_METHODS:
        raise SpecError(f"majority_sign_method must be 'total' or 'frequency', got {sign_method!r}")
    if not via_svd and (svd_rank is not None or svd_clamp is not None or full is not True):
        raise SpecError(f"svd_rank, svd_clamp and svd_full_matrices only apply to the SVD combinations, "
                        f"not {combination!r}")
    if svd_rank is not None and (isinstance(svd_rank, bool) or not isinstance(svd_rank, int) or svd_rank < 1):
        raise SpecError(f"svd_rank must be an int >= 1 (None: the largest rank of the adapters), got {svd_rank!r}")
    if svd_clamp is not None and (isinstance(svd_clamp, bool) or not isinstance(svd_clamp, numbers.Real)
                                  or not 0 <= svd_clamp <= 1):
        raise SpecError(f"svd_clamp is a quantile in [0, 1] (None: no clamping), got {svd_clamp!r}")
    if not isinstance(full, bool):
        raise SpecError(f"svd_full_matrices must be True or False, got {full!r}")
    if seed is not None and pruning != "random":
        raise SpecError(f"seed= only applies to the DARE combinations, which sample; {combination!r} draws nothing")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise SpecError(f"seed must be an int (None: torch's global generator), got {seed!r}")


def _new_rank(combination: str, adapters: dict[str, _AdapterView], svd_rank: int | None) -> int:
    ranks = {name: adapter.rank() for name, adapter in adapters.items()}
    if combination == "cat":
        return sum(ranks.values())
    if COMBINATIONS[combination][2]:
        return svd_rank or max(ranks.values())
    if len(set(ranks.values())) > 1:
        raise SpecError(f"{combination!r} merges the factors entry by entry, so every adapter needs the same rank "
                        f"(as in PEFT); these have {ranks}. Use 'cat' (rank {sum(ranks.values())}) or 'svd'")
    for target in {t for adapter in adapters.values() for t in adapter.methods}:
        at = {name: loaded_factor(adapter.unit(target), "lora_A").shape[0] for name, adapter in adapters.items()
              if target in adapter.methods}
        if len(set(at.values())) > 1:
            raise SpecError(f"{combination!r} needs equal ranks at every target; at {target} they are {at}. "
                            "Use 'cat' or 'svd'")
    return next(iter(ranks.values()))


def _module_order(record: Record, targets: dict[str, Target], chosen: set[str]) -> list[str]:
    """`chosen` in the model's module order (its state_dict's), the order PEFT visits layers."""
    position = {key: i for i, key in enumerate(record.state_keys)}

    def key(item):
        index, name = item
        names = record.aliases.get(targets[name].weight, [targets[name].weight])
        return min((position[n] for n in names if n in position), default=len(position)), index

    return [name for _, name in sorted(((i, n) for i, n in enumerate(targets) if n in chosen), key=key)]


def _generator(seed: int, gm: fx.GraphModule, adapters: dict[str, _AdapterView]) -> torch.Generator:
    device = next(p for a in adapters.values() for p in getattr(gm, CONTAINER)[a.name].parameters()).device
    return torch.Generator(device=device).manual_seed(seed)


def _weights(values: list[float], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values).to(like.device)


def _factor_combined(target: Target, present, combination: str, rank: int, density, sign_method,
                     generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of one target from the adapters' LoRA factors (module docstring)."""
    units = [(adapter.unit(target.name), weight) for adapter, weight in present]
    As = [loaded_factor(unit, "lora_A").detach() for unit, _ in units]  # a hot-swap slot's: its loaded rank
    Bs = [loaded_factor(unit, "lora_B").detach() for unit, _ in units]
    if combination == "cat":
        A = torch.cat([a * weight * float(unit.scale) for a, (unit, weight) in zip(As, units)], dim=0)
        B = torch.cat(Bs, dim=1)
    else:
        scaled = [weight * float(unit.scale) for unit, weight in units]
        weights_A = _weights([math.sqrt(abs(w)) * (1 if w >= 0 else -1) for w in scaled], As[0])
        weights_B = _weights([math.sqrt(abs(w)) for w in scaled], Bs[0])
        A = merge(As, weights_A, combination, density, sign_method, generator).to(As[0].dtype)
        B = merge(Bs, weights_B, combination, density, sign_method, generator).to(As[0].dtype)
    return pad_rank(A, rank, 0), pad_rank(B, rank, 1)


def _delta(gm: fx.GraphModule, adapter: _AdapterView, target: Target) -> torch.Tensor:
    """ΔW (out, in) that folding `adapter` adds to `target`, in fp32 (LoRA: s · B A as PEFT computes it)."""
    unit = adapter.unit(target.name)
    if type(unit) is LoRAUnit:
        dtype = torch.promote_types(unit.lora_A.dtype, torch.float32)
        a, b = loaded_factor(unit, "lora_A"), loaded_factor(unit, "lora_B")
        return (b.to(dtype).flatten(1) @ a.to(dtype).flatten(1)) * float(unit.scale)
    base = base_matrix(gm, target) if unit.uses_base_weight else None
    return adapter.groups[target.name].delta_weight(target.name, base)


def _transposed(target: Target) -> bool:
    """Whether the stored weight is the transpose of the (out, in) matrix (embedding, Conv1D)."""
    return isinstance(target.kind, EmbeddingKind) or target.layout == "in_out"


def _svd_combined(gm, target: Target, present, combination: str, rank: int, density, sign_method, clamp,
                  full_matrices, generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of one target: the merged ΔW's best rank-`rank` factors (module docstring)."""
    flip = _transposed(target)
    deltas = [_delta(gm, adapter, target) for adapter, _ in present]
    deltas = [d.t() if flip else d for d in deltas]  # merged in the stored weight's layout, as PEFT does
    merged = merge(deltas, _weights([w for _, w in present], deltas[0]), combination, density, sign_method, generator)
    return svd_factors(merged.t() if flip else merged, rank, clamp, full_matrices)


def _install(gm: fx.GraphModule, name: str, spec: Spec, factors: dict) -> None:
    """Add adapter `name` by `rewrite` (its init draws from a forked generator), give it `factors`,
    and leave it inactive and frozen, every other parameter's requires_grad as it was."""
    trains = {param: param.requires_grad for param in gm.parameters()}
    with torch.random.fork_rng(devices=[]):
        rewrite(gm, spec, adapter=name)
    for param, flag in trains.items():
        param.requires_grad_(flag)
    record = Record.find(gm)
    container = getattr(gm, CONTAINER)[name]
    with torch.no_grad():
        for target, (A, B) in factors.items():
            unit = container[record.adapters[name].groups[target]].unit(target)
            unit.lora_A.copy_(A.reshape(unit.lora_A.shape))
            unit.lora_B.copy_(B.reshape(unit.lora_B.shape))
        getattr(getattr(gm, GATES), name).fill_(0.0)
    for param in container.parameters():
        param.requires_grad_(False)
