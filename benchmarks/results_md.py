"""Writing one benchmark's section of RESULTS.md."""

from __future__ import annotations

from pathlib import Path


def replace_section(path: Path, section: str, text: str) -> None:
    """Put `text` in place of the section headed `section` (up to the next '## '), else append it."""
    old = path.read_text() if path.exists() else "# Benchmark results\n"
    start = old.find(section)
    if start < 0:
        path.write_text(old.rstrip("\n") + "\n\n" + text)
        return
    end = old.find("\n## ", start + len(section))
    path.write_text(old[:start] + text + ("\n" + old[end + 1:] if end >= 0 else ""))
