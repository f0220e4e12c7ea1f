"""Non-tensor example arguments become defaults of a captured graph's `forward`.

torch.export fixes every argument that holds no tensor (`use_cache=False`, `return_dict=True`,
`attention_mask=None`) at its example value, yet its forward still requires it. After
`set_call_defaults` the graph's code generator writes, for examples `(ids,)` and
`{"attention_mask": m, "labels": y, "use_cache": False}`:

    @_lowrank_fx_signature
    def forward(self, input_ids, *_lowrank_fx_extra, attention_mask, labels, use_cache=False,
                **_lowrank_fx_unknown):
        if _lowrank_fx_extra or _lowrank_fx_unknown:
            _lowrank_fx_call.refuse(_lowrank_fx_extra, _lowrank_fx_unknown)
        _lowrank_fx_captured('use_cache', use_cache, False)
        ...
        try:
            <the graph's code>
        except Exception as _lowrank_fx_error:
            _lowrank_fx_call.explain(self, _lowrank_fx_error, locals())
            raise

Positional examples stay positional (trailing non-tensor ones get defaults), keyword examples
become keyword-only, and every argument without a tensor defaults to its example value. Passing
another value raises CaptureError naming the captured one; an argument the graph was not
captured with, and an error its code raises because of what the capture fixed (a size, the
dtype), raise a CaptureError that says so (passes/call_errors.py). `inspect.signature(gm.forward)`
lists the model's argument names (the catch-alls hidden), which is what `transformers.Trainer`
picks dataset columns from. The generator lives on the graph, so every later `recompile()`
keeps this signature.
"""

from __future__ import annotations

import ast
import inspect
import keyword

import torch
from torch import fx, nn
from torch.fx.graph import _PyTreeCodeGen
from torch.utils import _pytree as pytree

from ..errors import CaptureError
from .call_errors import CallErrors, guarded_body, public

CHECK = "_lowrank_fx_captured"  # the global the generated forward calls for each fixed argument
VALUES = "_lowrank_fx_values"  # a global tuple of the fixed values that have no literal form
CALL = "_lowrank_fx_call"  # the global CallErrors: stray arguments and errors of the body go to it
SIGNATURE = "_lowrank_fx_signature"  # the global decorator that hides the catch-alls from inspect
EXTRA, UNKNOWN, ERROR = "_lowrank_fx_extra", "_lowrank_fx_unknown", "_lowrank_fx_error"


def _holds_tensor(value) -> bool:
    return any(isinstance(leaf, torch.Tensor) for leaf in pytree.tree_leaves(value))


def _literal(value) -> str | None:
    """Python source that evaluates to `value`, or None when its repr does not read back."""
    text = repr(value)
    try:
        back = ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return None
    return text if type(back) is type(value) and back == value else None


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    if value is None or isinstance(value, (bool, int, float, str)):
        return repr(value)
    return f"a {type(value).__name__}"


def captured(name: str, given, value) -> None:
    """Raise CaptureError unless `given` is `value`, the example `name` was captured with."""
    if given is value or (type(given) is type(value) and given == value):
        return
    raise CaptureError(
        f"this graph was captured with {name}={_describe(value)} and cannot be called with "
        f"{name}={_describe(given)}: torch.export fixes arguments that hold no tensor at their "
        f"example value. Leave {name} out (it defaults to the captured value), or capture again "
        f"with the value you need: lfx.rewrite(model, spec, example_kwargs={{..., {name!r}: ...}})."
    )


def _guarded(body: list[str]) -> list[str]:
    return guarded_body(body, CALL, ERROR)


class CallDefaultsCodeGen(_PyTreeCodeGen):
    """torch.export's pytree code generator, writing a check for every entry of `fixed`.

    `positional` is how many of `pytree_info.orig_args` were positional examples; the rest
    become keyword-only. `fixed` maps the arguments that hold no tensor to their captured
    values; all of them get it as default except those in `required` (a non-tensor positional
    followed by a tensor one). `errors` explains a call the graph cannot serve.
    """

    def __init__(self, pytree_info, positional: int, fixed: dict[str, object], required, errors: CallErrors):
        super().__init__(pytree_info)
        self.positional = positional
        self.fixed = dict(fixed)
        self.required = set(required)
        self.errors = errors
        self._body_transformer = _guarded

    def _value_source(self, name: str) -> str:
        text = _literal(self.fixed[name])
        return text if text is not None else f"{VALUES}[{self._unwritten().index(name)}]"

    def _unwritten(self) -> list[str]:
        return [name for name, value in self.fixed.items() if _literal(value) is None]

    def additional_globals(self) -> list[tuple[str, object]]:
        values = tuple(self.fixed[name] for name in self._unwritten())  # hashable, as fx needs
        return [*super().additional_globals(), (CHECK, captured), (CALL, self.errors), (SIGNATURE, public),
                *([(VALUES, values)] if values else [])]

    def gen_fn_def(self, free_vars: list[str], maybe_return_annotation: str, *,
                   expanded_def: bool = False) -> str:
        names = list(self.pytree_info.orig_args)
        params = ["self", *names[:self.positional], f"*{EXTRA}", *names[self.positional:], f"**{UNKNOWN}"]
        params = [f"{name}={self._value_source(name)}" if name in self.fixed and name not in self.required
                  else name for name in params]
        lines = [f"@{SIGNATURE}"]
        if expanded_def:
            lines += [f"def {self._func_name}(\n{self._format_multiline_args(params)}){maybe_return_annotation}:"]
        else:
            lines += [f"def {self._func_name}({', '.join(params)}){maybe_return_annotation}:"]
        lines += [f"    if {EXTRA} or {UNKNOWN}:", f"        {CALL}.refuse({EXTRA}, {UNKNOWN})"]
        lines += [f"    {CHECK}({name!r}, {name}, {self._value_source(name)})" for name in self.fixed]
        code = "\n".join(lines)
        if free_vars:
            code += self.gen_var_bindings(names, free_vars, expanded_def)
        return code


def _parameters(model: nn.Module | None) -> list[str] | None:
    """The names model.forward takes as named parameters, or None when they cannot be read."""
    try:
        params = inspect.signature(model.forward).parameters.values() if model is not None else None
    except (TypeError, ValueError):
        return None
    return None if params is None else [p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def set_call_defaults(gm: fx.GraphModule, args: tuple, kwargs: dict,
                      model: nn.Module | None = None) -> dict[str, object]:
    """Give gm's forward the signature described above, from the examples it was exported with
    (from `model`: the messages name its class and forward's parameters).

    Returns {argument name: captured value} of the defaults. Leaves gm unchanged (and returns
    {}) unless its graph takes `(args, kwargs)` through torch.export's pytree code generator.
    """
    codegen = gm.graph._codegen
    info = getattr(codegen, "pytree_info", None)
    if not isinstance(codegen, _PyTreeCodeGen) or info is None or info.in_spec is None:
        return {}
    spec = info.in_spec
    if not (spec.type is tuple and spec.num_children == 2 and spec.child(0).type is tuple
            and spec.child(1).type is dict):
        return {}
    positional = spec.child(0).num_children
    keys = list(spec.child(1).context)
    names = list(info.orig_args)
    if (positional != len(args) or sorted(keys) != sorted(kwargs) or len(names) != positional + len(keys)
            or names[positional:] != keys
            or any(not n.isidentifier() or keyword.iskeyword(n) or n == "self" for n in names)):
        return {}
    values = {**dict(zip(names, args)), **{k: kwargs[k] for k in keys}}
    fixed = {n: v for n, v in values.items() if not _holds_tensor(v)}
    last_tensor = max((i for i, n in enumerate(names[:positional]) if n not in fixed), default=-1)
    required = [n for n in names[:last_tensor] if n in fixed]  # a default there would need all later ones
    errors = CallErrors(gm, names, positional, type(model).__name__ if model is not None else "the model",
                        _parameters(model), {n: v.dtype for n, v in values.items() if isinstance(v, torch.Tensor)})
    gm.graph.set_codegen(CallDefaultsCodeGen(info, positional, fixed, required, errors))
    gm.recompile()
    return {n: v for n, v in fixed.items() if n not in required}
