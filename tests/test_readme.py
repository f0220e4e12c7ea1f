"""The README's quickstart runs as pasted: its python blocks, in order, in a fresh directory.

Oracle: the quickstart asserts itself that the reloaded adapters, the merged graph, the plain
model loading `merged_state_dict` and ONNX Runtime all give the trained graph's logits (< 1e-4).
Here we also check that the README stays a page, not a manual, and that its two commands are the
ones CI runs.
"""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")


def _blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", text, flags=re.S | re.M)


def test_readme_is_a_page():
    assert len(README.splitlines()) <= 150


def test_readme_test_command_is_what_ci_runs():
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    command = "scripts/bootstrap.sh && .venv/bin/python -m pytest -q"
    assert command in ci
    assert command in "\n".join(_blocks(README, "bash"))


def test_readme_quickstart_runs_as_pasted(tmp_path, monkeypatch, capsys):
    blocks = _blocks(README, "python")
    assert blocks, "the README has no python block"
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__readme__"}
    for i, block in enumerate(blocks):
        exec(compile(block, f"README.md python block {i + 1}", "exec"), namespace)
    out = capsys.readouterr().out
    for line in ("reloaded adapters", "merged graph", "plain model", "ONNX Runtime"):
        assert line in out
    assert (tmp_path / "adapter.safetensors").exists() and (tmp_path / "model.onnx").exists()


def test_readme_links_point_at_files():
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", README)
    assert links
    missing = [link for link in links if "://" not in link and not (ROOT / link).exists()]
    assert not missing, f"README links to files that do not exist: {missing}"
