"""ruff and mypy over the package, with the settings in pyproject.toml; a finding fails the test
and shows the tool's own report.

mypy keeps its cache in .mypy_cache/ (ignored by git): a cold run takes a few minutes on two
cores, a warm one seconds.
"""

import importlib.util
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
LINTED = [p for p in ("lowrank_fx", "tests", "benchmarks", "examples") if (ROOT / p).is_dir()]


def _run(tool: str, *args: str) -> None:
    if importlib.util.find_spec(tool) is None:
        pytest.skip(f"{tool} is not installed (pip install -e '.[test]')")
    done = subprocess.run([sys.executable, "-m", tool, *args], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, f"{tool} {' '.join(args)} found problems:\n{done.stdout}{done.stderr}"


def test_ruff():
    _run("ruff", "check", *LINTED)


def test_mypy():
    _run("mypy")  # files, strictness and cache_dir come from [tool.mypy] in pyproject.toml
