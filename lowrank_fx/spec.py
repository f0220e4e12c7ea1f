"""`Spec`: which targets to adapt and with which method.

Patterns are matched against target names (see `graph/targets.py`):
  - a glob, matched against the whole name or any dotted suffix of it, so "q_proj",
    "*.q_proj" and "model.layers.0.self_attn.q_proj" all match that target; a parameter's
    name ("lin0.weight", "*.in_proj_weight") selects the target of that weight, as PEFT's
    `target_parameters` do;
  - "re:<regex>", searched (re.search) in the full name;
  - "all-linear": every linear layer except the output head, as PEFT means it; embeddings
    and convolutions are targets by name only (graph/heads.py `left_out` says what is left
    out and why).
`targets` is a list of patterns sharing `method`, or a dict {pattern: method} for mixed
specs (the first matching pattern wins). `exclude` removes targets matched by any pattern.

`train` names modules whose parameters the adapter trains in full, as copies of its own
(PEFT's `modules_to_save`; passes/train_modules.py): globs or "re:" patterns as above, matched
against module paths ("classifier", "bert.pooler") and parameter names ("*.bias": single
parameters, PEFT's bias="all"). A trained module's weights are left out of
the adapter's targets, as PEFT does. With `train`, `targets` may be empty (`targets=[]`): an
adapter that only trains those modules.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import re
from typing import Mapping, Sequence, Union

from .errors import SpecError, nearest
from .methods.base import Method
from .methods.lora import LoRA
from .options import options

ALL_LINEAR = "all-linear"


def _compile(pattern: str):
    if not isinstance(pattern, str) or not pattern:
        raise SpecError(f"target pattern {pattern!r} must be a non-empty string")
    if pattern.startswith("re:"):
        try:
            regex = re.compile(pattern[3:])
        except re.error as err:
            raise SpecError(f"bad regular expression in {pattern!r}: {err}") from None
        return lambda name: regex.search(name) is not None
    if pattern == ALL_LINEAR:
        return None  # resolved against the graph by `Spec.assign`

    # A parameter's name selects the target of that weight ("lin0.weight" -> "lin0"), as PEFT's
    # target_parameters do.
    module = next((pattern[: -len(s)] for s in (".weight", "_weight") if pattern.endswith(s) and len(pattern) > len(s)), None)

    def glob(name: str) -> bool:
        parts = name.split(".")
        suffixes = [".".join(parts[i:]) for i in range(len(parts))]
        return any(fnmatch.fnmatchcase(suffix, pattern) or (module is not None and fnmatch.fnmatchcase(suffix, module))
                   for suffix in suffixes)

    return glob


def _patterns(option: str, value) -> tuple[str, ...]:
    """A pattern or a sequence of patterns as a tuple of strings; SpecError naming `option` otherwise."""
    if isinstance(value, str):
        return (value,)
    if isinstance(value, Sequence) and all(isinstance(p, str) for p in value):
        return tuple(value)
    raise SpecError(f"Spec.{option} must be a pattern (a string) or a list of patterns, got {value!r}")


@options
class Spec:
    """What to adapt. `Spec(targets=["*.q_proj", "*.v_proj"], method=LoRA(rank=8))`.

    Args:
        targets: a pattern, a list of patterns sharing `method`, or a dict {pattern: method}
            for mixed specs (the first matching pattern wins); patterns are globs, "re:<regex>"
            or "all-linear" (module docstring). Default "all-linear".
        method: the method of a pattern list (default `LoRA()`); None with a dict.
        exclude: patterns whose targets are left out.
        train: module or parameter patterns the adapter trains in full, as copies of its own
            (PEFT's `modules_to_save`); their weights are then no targets.

    Raises:
        SpecError: a bad pattern, a method that is not a `Method`, `method` given with a dict,
            or no targets and nothing to train.
    """

    targets: Union[str, Sequence[str], Mapping[str, Method]] = ALL_LINEAR
    method: Method | None = None
    exclude: Sequence[str] = ()
    train: Sequence[str] = ()

    def __post_init__(self):
        if self.targets is None and self.train:
            object.__setattr__(self, "targets", [])
        if isinstance(self.targets, Mapping):
            if self.method is not None:
                raise SpecError("give either targets={pattern: method} or method=..., not both")
            rules = list(self.targets.items())
        else:
            object.__setattr__(self, "targets", list(_patterns("targets", self.targets)))
            if self.method is None:
                object.__setattr__(self, "method", LoRA())
            rules = [(p, self.method) for p in self.targets]
        object.__setattr__(self, "exclude", _patterns("exclude", self.exclude))
        object.__setattr__(self, "train", _patterns("train", self.train))
        if not rules and not self.train:
            raise SpecError("Spec.targets is empty; give at least one pattern, or 'all-linear' "
                            "(or train=[...] for an adapter that only trains whole modules)")
        for pattern, method in rules:
            _compile(pattern)
            if not isinstance(method, Method):
                raise SpecError(
                    f"the method for {pattern!r} is {type(method).__name__}, not a method; "
                    "use lfx.LoRA(...), lfx.LoRTA(...) or lfx.RandLoRA(...)"
                )
            _check_method_class(type(method))
        for pattern in self.exclude:
            if pattern == ALL_LINEAR:
                raise SpecError("Spec.exclude takes target patterns ('lm_head', 're:...'), not 'all-linear', "
                                "which would exclude every target")
            _compile(pattern)
        for pattern in self.train:
            if pattern == ALL_LINEAR:
                raise SpecError("Spec.train takes module patterns ('classifier', 're:...'), not 'all-linear'")
            _compile(pattern)

    def rules(self) -> list[tuple[str, Method]]:
        """The spec as (pattern, method) pairs, in order.

        Returns:
            One pair per target pattern.
        """
        if isinstance(self.targets, Mapping):
            return list(self.targets.items())
        return [(p, self.method) for p in self.targets]

    def assign(self, names: Sequence[str], heads: set[str]) -> dict[str, Method]:
        """Map each matched target name to its method, in graph order.

        Args:
            names: every target name of the graph, in graph order.
            heads: the names that "all-linear" leaves out (vocabulary-sized output heads).

        Returns:
            {target name: method} for the matched targets that are not excluded.

        Raises:
            SpecError: a pattern matches nothing (naming the nearest target names), or every
                match is excluded.
        """
        excluded = [_compile(p) for p in self.exclude]
        chosen: dict[str, Method] = {}
        for pattern, method in self.rules():
            match = _compile(pattern)
            hits = [n for n in names if (n not in heads if match is None else match(n))]
            if not hits:
                raise SpecError(_no_match_message(pattern, names))
            for name in hits:
                if name not in chosen and not any(ex(name) for ex in excluded):
                    chosen[name] = method
        if not chosen and self.rules():
            patterns = [p for p, _ in self.rules()]
            raise SpecError(
                f"every target matched by {', '.join(map(repr, patterns))} is excluded by {list(self.exclude)}; "
                "narrow Spec.exclude or add target patterns"
            )
        return {n: chosen[n] for n in names if n in chosen}


def _check_method_class(cls: type) -> None:
    """SpecError unless a Method class is a frozen dataclass (hashed, and stored by its fields) with a `kind`."""
    frozen = dataclasses.is_dataclass(cls) and cls.__dataclass_params__.frozen
    if not frozen or not isinstance(getattr(cls, "kind", None), str):
        raise SpecError(f"{cls.__name__} is an lfx.Method, but a method must be a frozen dataclass with a class "
                        "attribute kind (a name of its own): decorate it with @dataclasses.dataclass(frozen=True) "
                        "and set kind = '<name>' (docs/write_a_method.md)")


def _no_match_message(pattern: str, names: Sequence[str]) -> str:
    if not names:
        return f"pattern {pattern!r} matched nothing: the model has no linear-like targets"
    key = pattern[3:] if pattern.startswith("re:") else pattern.strip("*.")
    # Compare against whole names and their last parts, so "q_prj" finds "...q_proj".
    leaf_of = {}
    for n in names:
        leaf_of.setdefault(n.rsplit(".", 1)[-1], n)
    close = nearest(key, list(leaf_of) + list(names), n=5)
    shown = []
    for c in close:
        full = leaf_of.get(c, c)
        if full not in shown:
            shown.append(full)
    return (
        f"pattern {pattern!r} matched no linear-like target. Nearest target names: "
        + ", ".join(shown)
        + f" ({len(names)} targets in all; lfx.plan(model, lfx.Spec('all-linear'), ...) lists them)"
    )
