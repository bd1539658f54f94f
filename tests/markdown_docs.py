"""The README and docs/*.md read as GitHub renders them: headings outside code fences, their anchors, sections,
key tables, links and the lines of ```bash blocks."""

from __future__ import annotations

import re
from pathlib import Path

from conftest import REPO

DOCS = REPO / "docs"
FENCE = re.compile(r"^\s*```")
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")


def read(relative: str) -> str:
    """Text of a document of the repository, e.g. ``"README.md"`` or ``"docs/hera.md"``."""
    return (REPO / relative).read_text(encoding="utf-8")


def documents() -> list[str]:
    """The README and every docs/*.md, as paths relative to the repository root."""
    return ["README.md", *sorted(f"docs/{path.name}" for path in DOCS.glob("*.md"))]


def prose_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) of the lines outside code fences (a ``#`` in a YAML block is not a heading)."""
    lines, fenced = [], False
    for number, line in enumerate(text.splitlines(), start=1):
        if FENCE.match(line):
            fenced = not fenced
        elif not fenced:
            lines.append((number, line))
    return lines


def headings(text: str) -> list[tuple[int, str]]:
    """(level, title) of every heading, in order."""
    found = []
    for _, line in prose_lines(text):
        match = re.match(r"^(#{1,6}) +(.+?) *#*$", line)
        if match:
            found.append((len(match.group(1)), match.group(2)))
    return found


def anchor(title: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation other than ``-`` and ``_`` dropped, spaces to ``-``."""
    return re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")


def anchors(text: str) -> set[str]:
    """Every heading's anchor, repeated titles numbered as GitHub numbers them (``-1``, ``-2``)."""
    seen: dict[str, int] = {}
    result = set()
    for _, title in headings(text):
        base = anchor(title)
        count = seen.get(base, 0)
        result.add(base if count == 0 else f"{base}-{count}")
        seen[base] = count + 1
    return result


def section(text: str, title: str) -> str:
    """Body of the heading ``title`` (exact), up to the next heading of the same or a higher level."""
    lines = text.splitlines()
    fenced, start, level = False, None, 0
    for index, line in enumerate(lines):
        if FENCE.match(line):
            fenced = not fenced
            continue
        match = None if fenced else re.match(r"^(#{1,6}) +(.+?) *#*$", line)
        if not match:
            continue
        if start is None and match.group(2) == title:
            start, level = index + 1, len(match.group(1))
        elif start is not None and len(match.group(1)) <= level:
            return "\n".join(lines[start:index])
    assert start is not None, f"no heading {title!r}"
    return "\n".join(lines[start:])


def key_table(text: str, title: str, prefix: str) -> dict[str, list[str]]:
    """Rows of the key table under heading ``title``: key -> [default, allowed values, meaning] (``\\|`` kept)."""
    rows: dict[str, list[str]] = {}
    for line in section(text, title).splitlines():
        cells = [cell.strip() for cell in re.split(r"(?<!\\)\|", line.strip().strip("|"))]
        if line.startswith("|") and cells[0].startswith(f"`{prefix}"):
            key = cells[0].strip("`")
            assert key not in rows, f"{key} is listed twice"
            rows[key] = cells[1:]
    return rows


def links(text: str) -> list[str]:
    """Targets of the markdown links outside code fences (``docs/hera.md#recipes``, ``#install``, URLs)."""
    return [target for _, line in prose_lines(text) for target in LINK.findall(line)]


def bash_lines(text: str) -> list[str]:
    """Every line of the ```bash blocks, comments dropped."""
    blocks = re.findall(r"^```bash\n(.*?)^```", text, flags=re.M | re.S)
    return [line.split("#")[0].strip() for block in blocks for line in block.splitlines() if line.strip()]


def resolve(source: str, target: str) -> tuple[Path, str]:
    """(file, anchor) a relative link of the document ``source`` points to; the file is ``source`` for ``#x``."""
    path, _, fragment = target.partition("#")
    file = (REPO / source).parent.joinpath(path).resolve() if path else REPO / source
    return file, fragment
