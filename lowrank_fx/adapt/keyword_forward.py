"""Capturing a forward that takes some examples through its `**kwargs`.

torch.export builds its range constraints from the forward's signature, bound to the examples.
An example that lands in `**kwargs` (`use_cache=False` of LlavaForConditionalGeneration, `x` of
`def forward(self, **inputs)`) is counted twice there, and the export fails whenever a size is
left dynamic. While exporting, the model is therefore called through a temporary forward whose
signature names each such keyword (keyword-only, after the forward's own parameters) and which
passes every argument on to the real forward unchanged:

    forward(self, input_ids=None, pixel_values=None, ..., **kwargs)
      -> forward(input_ids=None, pixel_values=None, ..., *, use_cache=None)

The captured graph takes the same arguments, by the same names, as the model.
"""

from __future__ import annotations

import contextlib
import inspect

from torch import nn

_MISSING = object()


def _through_var_keyword(signature: inspect.Signature, kwargs: dict) -> list[str]:
    """The example keywords that the forward's **kwargs would receive."""
    params = signature.parameters.values()
    if not any(p.kind is p.VAR_KEYWORD for p in params):
        return []
    named = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return [name for name in kwargs if name not in named]


@contextlib.contextmanager
def keyword_forward(model: nn.Module, kwargs: dict):
    """Inside the block `model.forward` names every keyword of `kwargs` it would take through
    **kwargs (see the module docstring); the model's own forward afterwards."""
    try:
        signature = inspect.signature(model.forward)
    except (TypeError, ValueError):
        signature = None
    extra = _through_var_keyword(signature, kwargs) if signature is not None else []
    if signature is None or not extra:
        yield
        return
    original = model.forward
    params = [p for p in signature.parameters.values() if p.kind is not p.VAR_KEYWORD]
    params += [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None) for name in extra]

    def forward(*args, **named):
        return original(*args, **named)

    # inspect.signature reads __signature__, which function objects do not declare
    forward.__signature__ = signature.replace(parameters=params)  # type: ignore[attr-defined]
    own = model.__dict__.get("forward", _MISSING)  # a forward set on the instance (a hook library's)
    model.forward = forward
    try:
        yield
    finally:
        if own is _MISSING:
            del model.forward
        else:
            model.forward = own
