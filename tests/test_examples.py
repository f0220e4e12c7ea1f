"""The scripts in examples/ run as a user runs them, with --tiny (a model from a tiny config,
random weights, a few steps; nothing is downloaded): each in its own process (fsdp.py under
torchrun with two gloo ranks), importing this checkout's lowrank_fx, with the API's old
spellings (LowRankFxDeprecationWarning) turned into errors. Each must exit 0 and print
its "check: ... PASS" line, which it prints only after its own comparison with an oracle
(the folded original model, PEFT, ONNX Runtime, onnxruntime-genai, one unsharded process)."""

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
SCRIPTS = ["classify.py", "causal_lm.py", "qlora.py", "deploy_onnx.py", "generate_genai.py", "fsdp.py"]
TAKES_OUT = {"classify.py", "causal_lm.py", "deploy_onnx.py", "generate_genai.py", "fsdp.py"}


# runs `script args...` as `python script args...` would, with the API's old spellings as errors
STRICT = ("import runpy, sys, warnings; from lowrank_fx.deprecation import LowRankFxDeprecationWarning; "
          "warnings.simplefilter('error', LowRankFxDeprecationWarning); sys.argv = sys.argv[1:]; "
          "runpy.run_path(sys.argv[0], run_name='__main__')")


def _command(script: str, out: Path) -> list[str]:
    python = [sys.executable, "-c", STRICT, str(EXAMPLES / script), "--tiny"]
    python += ["--out", str(out)] if script in TAKES_OUT else []
    if script == "fsdp.py":
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "--no-python",
                *python]
    return python


def test_every_example_is_listed_here_and_in_the_readme():
    on_disk = sorted(p.name for p in EXAMPLES.glob("*.py"))
    assert on_disk == sorted(SCRIPTS)
    readme = (EXAMPLES / "README.md").read_text()
    assert all(f"examples/{name}" in readme for name in SCRIPTS), readme


@pytest.mark.parametrize("script", SCRIPTS)
def test_example_says_how_to_run_it(script):
    tree = ast.parse((EXAMPLES / script).read_text())
    doc = ast.get_docstring(tree) or ""
    assert "--tiny" in doc and "Run" in doc, f"{script}: the docstring must say how to run it, tiny and real"
    assert "--model" in doc, f"{script}: the docstring must show the realistic run"


@pytest.mark.parametrize("script", SCRIPTS)
def test_example_runs_tiny_and_passes_its_check(script, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "LOWRANK_FX_QUIET": "1", "OMP_NUM_THREADS": "1"}  # tiny models: threads would only contend
    process = subprocess.run(_command(script, tmp_path), check=False, cwd=tmp_path, env=env, capture_output=True,
                             text=True, timeout=600)
    output = process.stdout + process.stderr
    assert process.returncode == 0, f"{script} exited {process.returncode}:\n{output[-6000:]}"
    assert re.search(r"^check: .*: PASS$", process.stdout, re.MULTILINE), \
        f"{script} printed no check line:\n{output[-4000:]}"
