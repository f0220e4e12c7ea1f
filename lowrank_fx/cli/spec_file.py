"""The `--spec` JSON file: targets and method(s) for plan and train.

    {"targets": ["q_proj", "v_proj"], "method": {"method": "lora", "rank": 8},
     "exclude": [], "train": ["classifier"]}
    {"targets": {"re:.*_proj": {"method": "lorta", "rank": 8}}}        # a method per pattern

A method is an object: "method" names its kind (lowercase, as `Method.kind`), the other keys
are its constructor's options (DoRA is {"method": "lora", "dora": true}). Every mistake is
refused with the file's name and what to write instead; nothing is silently ignored.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import LowRankFxError, SpecError
from ..files.serial import method_classes
from ..methods.base import Method
from ..spec import Spec

KEYS = ("targets", "method", "exclude", "train")
EXAMPLE = '{"method": "lora", "rank": 8}'
ALIASES = {"dora": '{"method": "lora", "dora": true}'}  # PEFT's use_dora is a LoRA option here too


def _fail(path, message: str) -> SpecError:
    return SpecError(f"spec file {path}: {message}")


def _load(path: str) -> dict:
    file = Path(path)
    if not file.is_file():
        what = "is a folder" if file.is_dir() else "does not exist"
        raise SpecError(f"spec file {path} {what}; give a JSON file like "
                        '{"targets": ["q_proj", "v_proj"], "method": ' + EXAMPLE + "}")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as err:
        raise SpecError(f"spec file {path} cannot be read ({err})") from None
    except json.JSONDecodeError as err:
        raise SpecError(
            f"spec file {path} is not valid JSON ({err.msg} at line {err.lineno}, column {err.colno})") from None
    if not isinstance(data, dict):
        raise SpecError(f"spec file {path} must hold a JSON object with the keys {', '.join(KEYS)}, not a "
                        f"{type(data).__name__}")
    unknown = [key for key in data if key not in KEYS]
    if unknown:
        raise _fail(path, f"unknown key {unknown[0]!r}; the keys are {', '.join(KEYS)} "
                          f"(method options such as rank go inside \"method\", e.g. {EXAMPLE})")
    if "targets" not in data and not data.get("train"):
        raise SpecError(f'spec file {path} has no "targets": give a list of patterns, or {{pattern: method}}')
    return data


def _tuples(value):
    """JSON lists as tuples, as the methods' options are given in Python."""
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def _method(path, entry, where: str) -> Method:
    """The Method an entry describes, or SpecError naming the accepted kinds and options."""
    classes = method_classes()
    kinds = ", ".join(sorted(classes))
    if not isinstance(entry, dict) or not isinstance(entry.get("method"), str):
        raise _fail(path, f"{where} must be an object naming its kind, e.g. {EXAMPLE} (kinds: {kinds}); got "
                          f"{json.dumps(entry)}")
    kind = entry["method"]
    cls = classes.get(kind)
    if cls is None:
        hint = f"; for {kind} write {ALIASES[kind.lower()]}" if kind.lower() in ALIASES else ""
        if kind.lower() in classes:
            hint = f"; kinds are lowercase: {kind.lower()!r}"
        raise _fail(path, f"{where} has unknown method {kind!r}; the methods are {kinds}{hint}")
    options = {key: _tuples(value) for key, value in entry.items() if key != "method"}
    try:
        return cls(**options)
    except (LowRankFxError, TypeError, ValueError) as err:
        raise _fail(path, f"{where}: {err}") from None


def read_spec(path: str) -> Spec:
    """The Spec a `--spec` file describes (see the module docstring)."""
    data = _load(path)
    targets: Any = data.get("targets")  # Spec checks its type
    extra = {"exclude": data.get("exclude", ()), "train": data.get("train", ())}
    try:
        if isinstance(targets, dict):
            if "method" in data:
                raise _fail(path, 'with "targets" as {pattern: method}, give each method there, not a "method" key too')
            return Spec(targets={p: _method(path, m, f"the method for {p!r}") for p, m in targets.items()}, **extra)
        method = _method(path, data["method"], '"method"') if "method" in data else None
        return Spec(targets=targets, method=method, **extra)
    except SpecError as err:
        raise err if str(err).startswith("spec file ") else _fail(path, str(err)) from None
