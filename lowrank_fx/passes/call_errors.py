"""Clear errors for calls that a captured graph cannot serve.

A graph from torch.export takes only the arguments it was captured with, keeps every size
torch.export fixed from the examples, and has the model's dtype and device written into its
code (casts, dtype checks). The forward that passes/call_defaults.py writes hands this module

  - any argument it has no place for (`gm(ids, attention_mask=m)` after a capture without
    `attention_mask`, a misspelt keyword, one positional argument too many): `refuse` names it
    and says how to capture with it;
  - any exception its body raises (the body runs inside `try`, so a call that succeeds pays
    nothing): `explain` turns a failed size guard ("Guard failed: input_ids.size()[0] == 1")
    and a failure after the graph's tensors changed dtype or device (`gm.float()` after a
    bfloat16 capture) into a CaptureError saying what the capture fixed, and a failed check
    of the model's own on values ("Runtime assertion failed for expression ...", LLaVA's
    image-token count) into an InputError; other errors pass through unchanged.
"""

from __future__ import annotations

import inspect
import re

import torch
from torch import fx

from ..errors import CaptureError, InputError, nearest

_GUARD = re.compile(r"Guard failed: (.*)")
_VALUE_CHECK = re.compile(r"Runtime assertion failed for expression (.*?) on node")
_SIZE_ONE = re.compile(r"^(\w+)(.*)\.size\(\)\[(\d+)\] == 1$")


def _kinds(gm: fx.GraphModule) -> tuple[set, set]:
    """(dtypes, devices) of the floating-point parameters and buffers of `gm`."""
    tensors = [t for t in [*gm.parameters(), *gm.buffers()] if t.is_floating_point()]
    return {t.dtype for t in tensors}, {t.device for t in tensors}


def _names(values) -> str:
    return ", ".join(sorted(str(v).replace("torch.", "") for v in values))


def _said(error: Exception) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"


class CallErrors:
    """What a graph was captured with, for the messages: its argument names (the first
    `positional` of them positional), the model's class name and the named parameters of its
    forward (None when unknown), and the dtypes and devices of its tensors."""

    def __init__(self, gm: fx.GraphModule, names: list[str], positional: int, model: str,
                 accepted: list[str] | None, input_dtypes: dict | None = None):
        self.names = list(names)
        self.input_dtypes = dict(input_dtypes or {})  # argument name -> dtype of its example tensor
        self.positional = positional
        self.model = model
        self.accepted = None if accepted is None else list(accepted)
        self.dtypes, self.devices = _kinds(gm)

    def _takes(self) -> str:
        given, named = self.names[:self.positional], self.names[self.positional:]
        parts = ([", ".join(given)] if given else []) + ([f"by name {', '.join(named)}"] if named else [])
        return f"takes {' and '.join(parts) or 'no arguments'}, as captured"

    def refuse(self, extra: tuple, unknown: dict) -> None:
        """Raise CaptureError for the positional arguments past the captured ones (`extra`) or
        the keywords the graph has no parameter for (`unknown`)."""
        capture = "lfx.rewrite(model, spec, example_kwargs={..., %r: ...})"
        if unknown:
            name = next(iter(unknown))
            if self.accepted is not None and name not in self.accepted:
                guess = nearest(name, self.accepted, n=1)
                raise CaptureError(
                    f"{name!r} is not a parameter of {self.model}.forward"
                    f"{f' (did you mean {guess[0]!r}?)' if guess else ''}; this graph {self._takes()}. An argument "
                    f"the forward takes through **kwargs must be in the examples too: {capture % name}"
                )
            raise CaptureError(
                f"this graph was captured without {name!r}, so it cannot take it: torch.export keeps only the "
                f"arguments given as examples (it {self._takes()}). Pass it in the examples when calling rewrite "
                f"(capture with it): {capture % name}"
            )
        count = self.positional
        raise CaptureError(
            f"this graph takes {count} positional argument{'' if count == 1 else 's'} and got {count + len(extra)}: "
            f"it {self._takes()}. Pass the others by name; one it was not captured with must be in the "
            f"capture's examples: {capture % '<name>'}"
        )

    def explain(self, gm: fx.GraphModule, error: Exception, given: dict | None = None) -> None:
        """Raise CaptureError if `error`, raised by gm's body, comes from what the capture fixed;
        InputError if it is a failed check of the model's own on input values. `given`: the
        call's arguments by name (the forward's locals)."""
        guard = _GUARD.match(str(error)) if isinstance(error, AssertionError) else None
        if guard is not None:
            raise CaptureError(_guard_message(guard.group(1).strip())) from error
        if not isinstance(error, RuntimeError):
            return
        for name, dtype in self.input_dtypes.items():
            value = (given or {}).get(name)
            if isinstance(value, torch.Tensor) and value.dtype != dtype:
                raise CaptureError(
                    f"{name} is {_names([value.dtype])} but this graph was captured with {_names([dtype])} "
                    f"{name} ({_said(error)}); pass {name}.to({dtype}), as the model takes it"
                ) from error
        dtypes, devices = _kinds(gm)
        if self.dtypes and not self.dtypes <= dtypes:
            wanted = sorted(map(str, dtypes - self.dtypes)) or ["dtype"]
            raise CaptureError(
                f"this graph was captured with the model in {_names(self.dtypes)} and now holds "
                f"{_names(dtypes)} tensors (after .float(), .half() or .to(dtype)): torch.export writes the "
                f"model's dtype into the graph (casts, dtype checks), so it runs only in that dtype ({_said(error)}). "
                f"Capture the model in the dtype you want to run: model.to({wanted[0]}) before "
                "lfx.rewrite(model, spec, ...)"
            ) from error
        if self.devices and not self.devices <= devices:
            raise CaptureError(
                f"this graph was captured with the model on {_names(self.devices)} and now holds tensors on "
                f"{_names(devices)}: torch.export writes the device into the graph, so it runs only there "
                f"({_said(error)}). Move the model before "
                "capturing: model.to(device) before lfx.rewrite(model, spec, ...)"
            ) from error
        check = _VALUE_CHECK.search(str(error))
        if check is not None:
            raise InputError(
                f"a check the model's code makes on input values failed ({check.group(1)}): the graph keeps "
                "the model's own checks, so the original model refuses these inputs too; e.g. LLaVA checks that "
                "input_ids hold one image token per image feature (images x tokens per image)"
            ) from error


def _guard_message(condition: str) -> str:
    one = _SIZE_ONE.match(condition)
    if one is not None:
        name, dim = one.group(1) + one.group(2), one.group(3)
        return (
            f"this graph was captured with {name} of size 1 in dimension {dim}, which torch.export "
            "specialises: the graph accepts only size 1 there. Capture with examples of size 2 or more in "
            "every dimension that varies (lowrank_fx itself traces a batch of 1 as a batch of 2 when the "
            "model allows it; a sequence of length 1 it cannot widen)"
        )
    return (
        f"this call breaks {condition}, which torch.export fixed from the capture's examples (dynamic=False, "
        "a size dynamic_shapes marks static, or one the model's code relies on). Call with inputs that keep "
        "it, or capture with examples (or dynamic_shapes=...) that allow these sizes"
    )


def public(forward):
    """`forward` as inspect shows it: without the catch-all parameters (names starting with
    `_lowrank_fx_`) that route stray arguments to `refuse`."""
    signature = inspect.signature(forward)
    forward.__signature__ = signature.replace(
        parameters=[p for p in signature.parameters.values() if not p.name.startswith("_lowrank_fx_")])
    return forward


def guarded_body(body: list[str], call: str, error: str) -> list[str]:
    """The lines of a generated forward's body inside `try`, handing an exception to
    `{call}.explain(self, {error}, locals())` before it is raised again."""
    lines = "".join(body).split("\n")
    return ["try:\n", *(f"    {line}\n" for line in lines if line.strip()),
            f"except Exception as {error}:\n", f"    {call}.explain(self, {error}, locals())\n", "    raise\n"]

