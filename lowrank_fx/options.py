"""`@options`: a frozen dataclass whose constructor rejects unknown keywords with a hint, and takes
its options after the first two by keyword only; and the checks its `__post_init__` runs on
each value (type, finiteness, range), each raising SpecError with the option, the value and
what is valid."""

import dataclasses
import functools
import inspect
import math
import numbers
import warnings

from .deprecation import LowRankFxDeprecationWarning
from .errors import SpecError, nearest

POSITIONAL = 2  # `LoRA(8, 16.0)`; the options after these are keyword-only


def options(cls):
    """Make `cls` a frozen dataclass; `cls(rnak=8)` raises SpecError naming the known options.

    The first two fields may be given by position, the others by keyword only (the signature
    says so); a third positional value still works for one release, with a
    LowRankFxDeprecationWarning naming the keyword.
    """
    cls = dataclasses.dataclass(frozen=True)(cls)
    init = cls.__init__
    known = [f.name for f in dataclasses.fields(cls)]

    @functools.wraps(init)
    def checked_init(self, *args, **kwargs):
        if len(args) > POSITIONAL:
            args = _old_positional(cls.__name__, known, args, kwargs)
        for key in kwargs:
            if key not in known:
                hint = nearest(key, known, n=1)
                raise SpecError(
                    f"{cls.__name__} got an unknown option {key!r}"
                    + (f"; did you mean {hint[0]!r}?" if hint else "")
                    + f" Known options: {', '.join(known)}."
                )
        init(self, *args, **kwargs)

    signature = inspect.signature(init)
    checked_init.__signature__ = signature.replace(parameters=[
        p.replace(kind=inspect.Parameter.KEYWORD_ONLY) if i > POSITIONAL else p  # 0 is self
        for i, p in enumerate(signature.parameters.values())])
    cls.__init__ = checked_init
    return cls


def _old_positional(owner: str, known: list[str], args: tuple, kwargs: dict) -> tuple:
    """`args` beyond the first two moved into `kwargs` under their field names, with a warning."""
    extra = args[POSITIONAL:]
    if len(extra) > len(known) - POSITIONAL:
        raise TypeError(f"{owner} takes at most {len(known)} options, {len(args)} were given by position")
    names = known[POSITIONAL:POSITIONAL + len(extra)]
    for name, value in zip(names, extra):
        if name in kwargs:
            raise TypeError(f"{owner} got {name!r} both by position and as a keyword")
        kwargs[name] = value
    warnings.warn(f"lowrank_fx.{owner}: pass {', '.join(names)} by keyword ({', '.join(f'{n}=...' for n in names)}); "
                  "passing them by position stops working in the next release", LowRankFxDeprecationWarning,
                  stacklevel=3)
    return args[:POSITIONAL]


def set_options(instance, **values) -> None:
    """Store checked (normalised) values on a frozen options instance, from its `__post_init__`."""
    for name, value in values.items():
        object.__setattr__(instance, name, value)


def integer(owner: str, name: str, value, low: int = 1, high: int | None = None) -> int:
    """`value` as an int in [low, high]; SpecError naming the option otherwise (floats, strings and
    bools are refused, not rounded or parsed)."""
    top = math.inf if high is None else high
    if isinstance(value, numbers.Integral) and not isinstance(value, bool) and low <= value <= top:
        return int(value)
    if high is None:
        valid = "a positive integer" if low == 1 else f"an integer >= {low}"
    else:
        valid = f"an integer in [{low}, {high}]"
    raise SpecError(f"{owner} {name} must be {valid}, got {value!r}")


def number(owner: str, name: str, value, valid: str, accept, why: str = "") -> float:
    """`value` as a finite float for which `accept(value)` holds; SpecError saying `valid` (and
    `why`) otherwise (NaN, inf, bools and strings are refused)."""
    if isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value) and accept(value):
        return float(value)
    raise SpecError(f"{owner} {name} must be {valid}, got {value!r}" + (f" ({why})" if why else ""))


def flag(owner: str, name: str, value) -> bool:
    """`value` if it is True or False; SpecError otherwise (1, "yes" and None are refused)."""
    if isinstance(value, bool):
        return value
    raise SpecError(f"{owner} {name} must be True or False, got {value!r}")


def choice(owner: str, name: str, value, choices: tuple[str, ...]) -> str:
    """`value` if it is one of `choices`; SpecError listing them otherwise."""
    if isinstance(value, str) and value in choices:
        return value
    raise SpecError(f"{owner} {name} must be one of {tuple(choices)}, got {value!r}")


def compile_backend(owner: str, name: str, value) -> None:
    """SpecError unless a string `value` names a torch.compile backend (True, False, dicts and
    callables are the caller's to check)."""
    if not isinstance(value, str):
        return
    import torch._dynamo

    known = torch._dynamo.list_backends(exclude_tags=())
    if value not in known:
        hint = nearest(value, known, n=1)
        raise SpecError(f"{owner} {name}={value!r} is not a torch.compile backend"
                        + (f" (did you mean {hint[0]!r}?)" if hint else "")
                        + f"; use True (inductor), False (eager) or one of {', '.join(known)}")
