"""Every public name documents itself in Google style: Args naming every parameter, and Returns.

For each name in `lowrank_fx.__all__`: a function's docstring has "Args:" (unless it takes no
arguments) naming each parameter of its signature, and "Returns:"; a class's docstring has
"Args:" for its constructor (unless it takes none), and each public method or property that
the class or a lowrank_fx base defines is checked like a function (a property: Returns only).
"""

from __future__ import annotations

import inspect
import re

import pytest

import lowrank_fx as lfx


def _section(doc: str, name: str) -> str | None:
    """The text of section `name` ("Args") of a Google-style docstring, or None."""
    lines = doc.splitlines()
    for i, line in enumerate(lines):
        if line.strip() == f"{name}:":
            indent = len(line) - len(line.lstrip())
            body = []
            for following in lines[i + 1:]:
                if following.strip() and len(following) - len(following.lstrip()) <= indent:
                    break
                body.append(following)
            return "\n".join(body)
    return None


def _documented(args: str) -> set[str]:
    """The parameter names an Args section lists (`name:`, `*name:`, `**name:`, `name (type):`), read
    from the lines at the section's own indent (deeper lines continue a description)."""
    lines = [line for line in args.splitlines() if line.strip()]
    if not lines:
        return set()
    indent = min(len(line) - len(line.lstrip()) for line in lines)
    entries = "\n".join(line[indent:] for line in lines if len(line) - len(line.lstrip()) == indent)
    return set(re.findall(r"^\**(\w+)(?: \([^)]*\))?:", entries, flags=re.MULTILINE))


def _parameters(function, skip_self: bool) -> list[str]:
    params = list(inspect.signature(function).parameters.values())
    if skip_self and params and params[0].name in ("self", "cls"):
        params = params[1:]
    return [p.name for p in params]


def _problems_of_function(where: str, function, skip_self: bool = False, returns: bool = True) -> list[str]:
    doc = inspect.getdoc(function) or ""
    problems = []
    names = _parameters(function, skip_self)
    if names:
        args = _section(doc, "Args")
        if args is None:
            problems.append(f"{where}: no Args section")
        else:
            documented = _documented(args)
            problems += [f"{where}: Args does not name {n!r}" for n in names if n not in documented]
            # the docs site's renderer cannot check this for @options classes: the signature is runtime's
            problems += [f"{where}: Args names {n!r}, which is not a parameter" for n in sorted(documented - set(names))]
    if returns and _section(doc, "Returns") is None:
        problems.append(f"{where}: no Returns section")
    return problems


def _own_init(cls) -> bool:
    """Whether the constructor is lowrank_fx's (or a dataclass's made for a lowrank_fx class)."""
    return any(klass.__module__.startswith("lowrank_fx") and "__init__" in vars(klass) for klass in cls.__mro__)


def _members(cls):
    """(name, member) of the public methods and properties that cls or a lowrank_fx base defines."""
    seen = set()
    for klass in cls.__mro__:
        if not klass.__module__.startswith("lowrank_fx"):
            continue
        for name, member in vars(klass).items():
            if name.startswith("_") or name in seen:
                continue
            if isinstance(member, (property, staticmethod, classmethod)) or inspect.isfunction(member):
                seen.add(name)
                yield name, getattr(cls, name) if not isinstance(member, property) else member


def _problems(name: str) -> list[str]:
    obj = getattr(lfx, name)
    if not callable(obj):
        return []  # __version__
    if not (inspect.getdoc(obj) or "").strip():
        return [f"{name}: no docstring"]
    if not inspect.isclass(obj):
        return _problems_of_function(name, obj)
    problems = []
    doc = inspect.getdoc(obj) or ""
    if issubclass(obj, BaseException):
        if _section(doc, "Args") is None:  # an exception takes its message
            problems.append(f"{name}: no Args section (the message)")
    elif _own_init(obj):  # the class docstring names every constructor argument
        problems += _problems_of_function(name, obj, returns=False)
    for member_name, member in _members(obj):
        where = f"{name}.{member_name}"
        if isinstance(member, property):
            if _section(inspect.getdoc(member) or "", "Returns") is None:
                problems.append(f"{where}: no Returns section")
        else:
            problems += _problems_of_function(where, member, skip_self=True)
    return problems


@pytest.mark.parametrize("name", lfx.__all__)
def test_public_name_is_documented(name):
    problems = _problems(name)
    assert not problems, "\n".join(problems)


def test_the_check_can_fail():
    def undocumented(gm, adapter="default"):
        """Does something.

        Args:
            gm: a graph.
        """

    assert _problems_of_function("f", undocumented) == ["f: Args does not name 'adapter'", "f: no Returns section"]

    def stale(gm):
        """Does something.

        Args:
            gm: a graph.
            adapter: a parameter the function no longer takes.
                more: a continuation line, not a parameter.

        Returns:
            Nothing.
        """

    assert _problems_of_function("g", stale) == ["g: Args names 'adapter', which is not a parameter"]
