"""`@options`: a frozen dataclass whose constructor rejects unknown keywords with a hint."""

import dataclasses
import functools

from .errors import SpecError, nearest


def options(cls):
    """Make `cls` a frozen dataclass; `cls(rnak=8)` raises SpecError naming the known options."""
    cls = dataclasses.dataclass(frozen=True)(cls)
    init = cls.__init__
    known = [f.name for f in dataclasses.fields(cls)]

    @functools.wraps(init)
    def checked_init(self, *args, **kwargs):
        for key in kwargs:
            if key not in known:
                hint = nearest(key, known, n=1)
                raise SpecError(
                    f"{cls.__name__} got an unknown option {key!r}"
                    + (f"; did you mean {hint[0]!r}?" if hint else "")
                    + f" Known options: {', '.join(known)}."
                )
        init(self, *args, **kwargs)

    cls.__init__ = checked_init
    return cls
