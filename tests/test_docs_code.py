"""Every code block of the documentation runs or says why not.

A block whose first line is `# not run: <reason>` is shown only (the reason is visible on the
page). Every other block must be python, and runs: a page's blocks in order, in one namespace,
in a fresh directory, so a page's later blocks use what its first ones built. Mermaid diagrams
are pictures, not code. The examples assert their own results against an oracle (the graph's
own forward, PEFT, ONNX Runtime), so a block that drifts from the API fails here.
"""

import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parent.parent / "docs"
FENCE = re.compile(r"^(?P<indent> *)```(?P<info>[^\n`]*)\n(?P<body>.*?)^(?P=indent)```", re.S | re.M)
NOT_RUN = re.compile(r"#\s*not run:\s*\S")
PAGES = sorted(p for p in DOCS.rglob("*.md"))
def blocks(page: Path) -> list[tuple[str, str, int]]:
    """(language, code, line) of every fenced block of a page."""
    text = page.read_text(encoding="utf-8")
    out = []
    for match in FENCE.finditer(text):
        language = match["info"].strip().split(" ")[0].lstrip(".{")
        body = "\n".join(line[len(match["indent"]):] for line in match["body"].splitlines())
        out.append((language, body, text.count("\n", 0, match.start()) + 1))
    return out


def runnable(page: Path) -> list[tuple[str, int]]:
    return [(code, line) for language, code, line in blocks(page)
            if language != "mermaid" and not NOT_RUN.match(code.lstrip().split("\n", 1)[0])]


def test_blocks_are_found():
    assert PAGES and sum(len(blocks(p)) for p in PAGES) > 20


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(DOCS)) for p in PAGES])
def test_every_block_runs_or_says_why_not(page, tmp_path, monkeypatch):
    for language, code, line in blocks(page):
        first = code.lstrip().split("\n", 1)[0]
        assert language == "mermaid" or language == "python" or NOT_RUN.match(first), (
            f"{page.name}:{line}: a {language or 'plain'} block must start with '# not run: <reason>'")
    todo = runnable(page)
    if not todo:
        return
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": f"__docs_{page.stem}__"}
    for code, line in todo:
        exec(compile(code, f"{page.relative_to(DOCS)}:{line}", "exec"), namespace)
