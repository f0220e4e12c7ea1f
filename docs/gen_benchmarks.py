"""Write the benchmark pages (benchmarks/*.md) at build time from benchmarks/RESULTS.md.

Each `## ` section of RESULTS.md becomes a page (its `###` headings one level up), and the
text before the first section the index, which links every page. The PNGs a section names,
as an image link or as a `benchmarks/<name>.png` path, are copied next to the pages and shown.
"""

import re
from pathlib import Path

import mkdocs_gen_files

SOURCE = Path("benchmarks/RESULTS.md")
PNG_LINK = re.compile(r"\]\(([\w.-]+\.png)\)")
PNG_PATH = re.compile(r"`benchmarks/([\w.-]+\.png)`")


def slug(title: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")


def page(title: str, body: str) -> str:
    linked = PNG_LINK.findall(body)
    body = re.sub(r"^###", "##", body, flags=re.M)
    for png in dict.fromkeys(PNG_PATH.findall(body)):
        if png not in linked:
            body += f"\n\n![{png}]({png})\n"
    for png in set(PNG_LINK.findall(body)):
        with mkdocs_gen_files.open(f"benchmarks/{png}", "wb") as out:
            out.write((SOURCE.parent / png).read_bytes())
    return f"# {title}\n\n_From `benchmarks/RESULTS.md`._\n{body}"


def main() -> None:
    text = SOURCE.read_text(encoding="utf-8")
    intro, *sections = re.split(r"^## ", text, flags=re.M)
    index = [intro.replace("# Benchmark results", "# Benchmarks", 1).rstrip(), "",
             "Measured by the scripts in `benchmarks/`; each page says the machine and its load.", ""]
    for section in sections:
        title, _, body = section.partition("\n")
        name = slug(title)
        index.append(f"- [{title.strip()}]({name}.md)")
        with mkdocs_gen_files.open(f"benchmarks/{name}.md", "w") as out:
            out.write(page(title.strip(), body))
    with mkdocs_gen_files.open("benchmarks/index.md", "w") as out:
        out.write("\n".join(index) + "\n")


main()
