"""Methods and specs as plain JSON data, and the fingerprint of a base graph's targets.

A method is stored as its `config()`: `{"method": kind, **options}`. It is rebuilt by looking
`kind` up among the `Method` subclasses that lowrank_fx has imported (every method the
package exports) and passing the options back to the constructor, which validates them; so
reading a file creates nothing but known classes with checked options, and runs no code.

A spec is `{"rules": [{"pattern": ..., "method": {...}}, ...], "exclude": [...]}`, plus
`"train": [...]` when it trains whole modules (`Spec.train`; absent otherwise, so older readers
refuse such a file by its extra tensors rather than load it without them).
"""

from __future__ import annotations

import hashlib
import json

from ..errors import AdapterFileError, LowRankFxError
from ..methods.base import Method
from ..spec import Spec


def method_classes() -> dict[str, type[Method]]:
    """Every imported Method subclass by its `kind`."""
    found: dict[str, type[Method]] = {}
    pending = list(Method.__subclasses__())
    while pending:
        cls = pending.pop()
        pending.extend(cls.__subclasses__())
        kind = cls.__dict__.get("kind")
        if isinstance(kind, str):
            found.setdefault(kind, cls)
    return found


def _method_to_json(method: Method) -> dict:
    """`method.config()` as JSON data (tuples become lists)."""
    return json.loads(json.dumps(method.config()))


def _tuples(value):
    """JSON lists back to tuples, so rebuilt options stay hashable like the originals."""
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def method_from_json(data) -> Method:
    if not isinstance(data, dict) or not isinstance(data.get("method"), str):
        raise AdapterFileError(f"a method entry must be an object with a 'method' kind, got {data!r}")
    classes = method_classes()
    cls = classes.get(data["method"])
    if cls is None:
        raise AdapterFileError(
            f"the file uses method {data['method']!r}, which this lowrank_fx does not have "
            f"(known: {', '.join(sorted(classes))}); upgrade lowrank_fx to load it"
        )
    options = {key: _tuples(value) for key, value in data.items() if key != "method"}
    try:
        return cls(**options)
    except (LowRankFxError, TypeError, ValueError) as err:
        raise AdapterFileError(f"the file's {data['method']} options {options} are not valid here: {err}") from None


def spec_to_json(spec: Spec) -> dict:
    data = {
        "rules": [{"pattern": pattern, "method": _method_to_json(method)} for pattern, method in spec.rules()],
        "exclude": list(spec.exclude),
    }
    if spec.train:
        data["train"] = list(spec.train)
    return data


def spec_from_json(data) -> Spec:
    """The spec back; rules that all share one method become `Spec(targets=[...], method=m)`."""
    try:
        rules = [(rule["pattern"], method_from_json(rule["method"])) for rule in data["rules"]]
        exclude = tuple(data.get("exclude", ()))
        train = tuple(data.get("train", ()))
    except (KeyError, TypeError) as err:
        raise AdapterFileError(f"malformed spec in the manifest ({type(err).__name__}: {err}): {data!r}") from None
    methods = {method for _, method in rules}
    try:
        if len(methods) == 1:
            return Spec(targets=[pattern for pattern, _ in rules], method=methods.pop(), exclude=exclude, train=train)
        return Spec(targets=dict(rules), exclude=exclude, train=train)
    except LowRankFxError as err:
        raise AdapterFileError(f"the manifest's spec is not valid: {err}") from None


def fingerprint(shapes: dict[str, tuple[int, int]]) -> str:
    """sha256 of the sorted (target name, out, in) list: which base weights, of which shapes."""
    rows = sorted([name, int(out), int(in_)] for name, (out, in_) in shapes.items())
    return "sha256:" + hashlib.sha256(json.dumps(rows, separators=(",", ":")).encode()).hexdigest()
