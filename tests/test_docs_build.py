"""The documentation site builds with `mkdocs build --strict`: no warning, so a broken link,
reference or docstring fails CI. The built site holds an API entry for every name of
`lowrank_fx.__all__` and the benchmark pages' PNGs.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

import lowrank_fx

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    out = tmp_path_factory.mktemp("site")
    env = dict(os.environ, DISABLE_MKDOCS_2_WARNING="true", NO_MKDOCS_2_WARNING="true")
    run = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    log = run.stdout + run.stderr
    assert run.returncode == 0, log
    warnings = [line for line in log.splitlines() if line.startswith(("WARNING", "ERROR"))]
    assert not warnings, "\n".join(warnings)
    return out


def test_reference_covers_every_public_name(site):
    html = "".join(p.read_text(encoding="utf-8") for p in (site / "reference").rglob("*.html"))
    missing = [name for name in lowrank_fx.__all__ if f'id="lowrank_fx.{name}"' not in html]
    assert not missing, f"names of lowrank_fx.__all__ without an API entry: {missing}"


def test_benchmark_pages_show_their_plots(site):
    pngs = sorted(p.name for p in (ROOT / "benchmarks").glob("*.png"))
    assert pngs
    for png in pngs:
        assert (site / "benchmarks" / png).is_file(), png
    pages = "".join(p.read_text(encoding="utf-8") for p in (site / "benchmarks").rglob("*.html"))
    for png in pngs:
        assert f'src="../{png}"' in pages, f"no benchmark page shows {png}"


def test_every_docs_page_is_built(site):
    for page in (ROOT / "docs").rglob("*.md"):
        rel = page.relative_to(ROOT / "docs").with_suffix("")
        built = site / ("index.html" if rel.name == "index" and rel.parent == Path(".") else rel.parent / (
            "index.html" if rel.name == "index" else Path(rel.name) / "index.html"))
        assert built.is_file(), f"{page} was not built"
