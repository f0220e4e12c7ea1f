"""Old spellings of the public API, accepted for one release with a warning.

`api_options(positional=n, renamed={"old": "new"})` wraps a public function whose options
after the first `n` parameters became keyword-only, or whose keywords were renamed:

    f(a, b, c)          ->  f(a, b, example_inputs=c)   + LowRankFxDeprecationWarning
    f(a, b, model=p)    ->  f(a, b, model_path=p)       + LowRankFxDeprecationWarning

The old positional order is the keyword-only parameters' order in the new signature, so a
parameter only ever moves behind the `*`, never elsewhere. `inspect.signature` of the wrapper
shows the new signature.
"""

from __future__ import annotations

import functools
import inspect
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


class LowRankFxDeprecationWarning(FutureWarning):
    """A call used a spelling that the next release removes; the message gives the new one.

    Filter it like any warning, e.g. `warnings.simplefilter("error", lfx.LowRankFxDeprecationWarning)`
    to find every old spelling in your code.

    Args:
        message: the old spelling, the new one, and when the old one stops working.
    """


def api_options(positional: int | None = None, renamed: dict[str, str] | None = None,
                name: str | None = None) -> Callable[[F], F]:
    """Accept the old positional options and renamed keywords of the decorated function.

    Args:
        positional: how many leading parameters stay positional; later positional arguments
            are passed on as the keyword-only parameters they used to be, with a warning.
            None leaves positional arguments to Python.
        renamed: old keyword -> new keyword; an old keyword is passed on under its new name,
            with a warning.
        name: the public name the messages use (`lowrank_fx.<name>`), where it is not the
            function's own (`fold`, exported as `merge`); a method's is `Class.method`, an
            `__init__`'s the class.

    Returns:
        A decorator; the wrapped function has the original's name, docstring and signature.
    """
    renamed = dict(renamed or {})

    def decorate(fn: F) -> F:
        params = list(inspect.signature(fn).parameters.values())
        keyword_only = [p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY]
        where = "lowrank_fx." + (name or fn.__qualname__.removesuffix(".__init__"))

        @functools.wraps(fn)
        def call(*args: Any, **kwargs: Any) -> Any:
            if positional is not None and len(args) > positional:
                extra = args[positional:]
                if len(extra) > len(keyword_only):
                    raise TypeError(f"{where} takes {positional} positional arguments and "
                                    f"{len(keyword_only)} keyword options; {len(args)} positional were given")
                names = keyword_only[:len(extra)]
                for name, value in zip(names, extra):
                    if name in kwargs:
                        raise TypeError(f"{where} got {name!r} both positionally and as a keyword")
                    kwargs[name] = value
                args = args[:positional]
                warnings.warn(f"{where}: pass {', '.join(names)} as keyword argument"
                              f"{'s' if len(names) > 1 else ''} ({', '.join(f'{n}=...' for n in names)}); "
                              "passing them positionally stops working in the next release",
                              LowRankFxDeprecationWarning, stacklevel=2)
            for old, new in renamed.items():
                if old in kwargs:
                    if new in kwargs:
                        raise TypeError(f"{where} got both {old}= (its old name) and {new}=; pass only {new}=")
                    kwargs[new] = kwargs.pop(old)
                    warnings.warn(f"{where}: {old}= is now {new}=; the old name stops working in the next release",
                                  LowRankFxDeprecationWarning, stacklevel=2)
            return fn(*args, **kwargs)

        return call  # type: ignore[return-value]

    return decorate
