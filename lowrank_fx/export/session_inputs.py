"""The feeds of an ONNX Runtime run, checked against the model's own inputs before ORT sees them.

Every name must be an input of the model: an input the model was exported without (an
`attention_mask` the graph never read) would otherwise be dropped and change nothing. Every
input must be given, with the model's element type, rank and fixed sizes. Each mismatch
raises InputError naming the inputs the model takes.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping

import numpy as np

from ..errors import InputError

# ORT's element types as numpy dtypes (bfloat16 has none: such inputs are not type-checked here)
DTYPES = {"tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16,
          "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int16)": np.int16,
          "tensor(int8)": np.int8, "tensor(uint8)": np.uint8, "tensor(bool)": np.bool_}


def _array(value) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def _describe(arg) -> str:
    return f"{arg.name} ({arg.type.removeprefix('tensor(').removesuffix(')')}, shape {list(arg.shape)})"


def described(model: str, args: list) -> str:
    """'<model> takes input_ids (int64, shape [...]), ...': what a message about inputs ends with."""
    return f"{model} takes {', '.join(_describe(arg) for arg in args)}"


def check_feeds(model: str, args: list, inputs, extra: str = "") -> dict[str, np.ndarray]:
    """{name: array} for `inputs` (a mapping by name, a sequence in order, or one value) checked
    against `args`, the ORT NodeArgs of `model`'s inputs. `extra`: a hint for unknown names."""
    names = [arg.name for arg in args]
    takes = described(model, args)
    if not isinstance(inputs, Mapping):
        values = list(inputs) if isinstance(inputs, (list, tuple)) else [inputs]
        if len(values) > len(names):
            raise InputError(f"{len(values)} inputs given in order, but {takes}")
        inputs = dict(zip(names, values))
    unknown = [name for name in inputs if name not in names]
    if unknown:
        hint = difflib.get_close_matches(str(unknown[0]), names, n=1)
        raise InputError(
            f"{', '.join(map(repr, unknown))} {'is not an input' if len(unknown) == 1 else 'are not inputs'} of "
            f"this model, so {'it' if len(unknown) == 1 else 'they'} would change nothing; {takes}"
            + (f" (did you mean {hint[0]!r}?)" if hint else "")
            + ". An input the model was exported without is not read: export with it in example_kwargs"
            + (f"; {extra}" if extra else "") + "."
        )
    missing = [name for name in names if name not in inputs]
    if missing:
        raise InputError(f"missing input{'s' * (len(missing) > 1)} {', '.join(map(repr, missing))}: {takes}")
    feeds = {}
    for arg in args:
        array = _array(inputs[arg.name])
        want = DTYPES.get(arg.type)
        if want is not None and array.dtype != want:
            raise InputError(f"input {arg.name!r} is {array.dtype}, the model takes {np.dtype(want)} "
                             f"(convert it first, e.g. .astype(np.{np.dtype(want)})); {takes}")
        shape = list(arg.shape) if arg.shape is not None else None
        if shape is not None and (array.ndim != len(shape) or any(
                isinstance(fixed, int) and size != fixed for size, fixed in zip(array.shape, shape))):
            raise InputError(f"input {arg.name!r} has shape {list(array.shape)}; {takes}")
        feeds[arg.name] = array
    return feeds
