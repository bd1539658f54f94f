"""Write the selected heads into a LLaMA-Factory YAML recipe without disturbing anything else.

Recipes are hand-written: comments, blank lines, ``### section`` headers, key order, quoting and line
endings must survive. So this module edits text, not a re-dumped mapping: it finds the top-level
(column 0) ``hera_heads`` entry, works out which lines its value spans, and swaps exactly those lines for
``hera_heads: [L13H12, L7H6]``. Every edit is checked with ``yaml.safe_load`` before anything is written,
and files are replaced atomically.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path
from typing import Any

import yaml

from llamafactory_hera.anatomy.heads import parse_head
from llamafactory_hera.anatomy.safe_write import check_folder_writable, write_text_atomic

__all__ = ["HeadsExistError", "check_folder_writable", "check_writable", "read_heads_entry", "set_hera_heads",
           "update_recipe", "write_text_atomic"]
KEY = "hera_heads"

_Line = tuple[str, str]  # (content without line ending, line ending: "\n", "\r\n" or "" for an unterminated last line)
_BLOCK_ITEM_RE = re.compile(r"^-(?:[ \t]|$)")
_TRAILING_RE = re.compile(r"^([ \t]*)(#.*)?$")


class HeadsExistError(ValueError):
    """The recipe already names its heads explicitly and neither ``--force`` nor ``--output`` was given."""


def _key_re(key: str) -> re.Pattern[str]:
    """A top-level ``key:`` at column 0, plain or quoted (a BOM allowed); the match ends after the colon."""
    quoted = re.escape(key)
    return re.compile(rf"^\ufeff?(?:{quoted}|\"{quoted}\"|'{quoted}')[ \t]*:(?=[ \t]|$)")


def _split_lines(text: str) -> list[_Line]:
    """Split on ``\\n`` only (not on the other characters ``str.splitlines`` treats as breaks)."""
    lines: list[_Line] = []
    pos = 0
    while pos < len(text):
        nl = text.find("\n", pos)
        if nl == -1:
            lines.append((text[pos:], ""))
            break
        content = text[pos:nl]
        if content.endswith("\r"):
            lines.append((content[:-1], "\r\n"))
        else:
            lines.append((content, "\n"))
        pos = nl + 1
    return lines


def _join(lines: list[_Line]) -> str:
    return "".join(content + eol for content, eol in lines)


def _file_eol(lines: list[_Line]) -> str:
    """The file's line ending, judged by its first line break (``\\n`` for a file without one)."""
    for _, eol in lines:
        if eol:
            return eol
    return "\n"


def _is_blank_or_comment(content: str) -> bool:
    stripped = content.strip()
    return not stripped or stripped.startswith("#")


def _split_comment(rest: str) -> tuple[str, str, str]:
    """Split the text after ``key:`` into (value, whitespace before the comment, comment).

    A ``#`` starts a comment only outside quotes and after whitespace, as in YAML.
    """
    pos = 0
    stripped = rest.lstrip(" \t")
    start = len(rest) - len(stripped)
    if stripped[:1] in ("'", '"'):
        quote = stripped[0]
        pos = start + 1
        while pos < len(rest):
            ch = rest[pos]
            if quote == '"' and ch == "\\":
                pos += 2
                continue
            if ch == quote:
                if quote == "'" and rest[pos + 1:pos + 2] == "'":
                    pos += 2
                    continue
                pos += 1
                break
            pos += 1
    while pos < len(rest):
        if rest[pos] == "#" and (pos == 0 or rest[pos - 1] in " \t"):
            value = rest[:pos].rstrip(" \t")
            return value, rest[len(value):pos], rest[pos:]
        pos += 1
    return rest.rstrip(" \t"), "", ""


def _scan_flow(lines: list[_Line], line_no: int, col: int) -> tuple[int, int, str]:
    """Find the bracket closing the flow collection opened at ``lines[line_no][col]``.

    Quotes (which may span lines) and ``# comments`` are skipped. Returns (line, column after the closing
    bracket, first comment seen on the opening line or "").
    """
    depth = 0
    quote: str | None = None
    first_comment = ""
    for li in range(line_no, len(lines)):
        content = lines[li][0]
        c = col if li == line_no else 0
        prev = " "
        while c < len(content):
            ch = content[c]
            if quote == "'":
                if ch == "'":
                    if content[c + 1:c + 2] == "'":
                        c += 2
                        continue
                    quote = None
            elif quote == '"':
                if ch == "\\":
                    c += 2
                    continue
                if ch == '"':
                    quote = None
            elif ch == "#" and prev in " \t":
                if li == line_no and not first_comment:
                    first_comment = content[c:]
                break
            elif ch in "'\"" and prev in " \t[{,":
                quote = ch
            elif ch in "[{":
                depth += 1
            elif ch in "]}":
                depth -= 1
                if depth == 0:
                    return li, c + 1, first_comment
            prev = ch
            c += 1
    raise ValueError(f"line {line_no + 1}: the flow collection opened here is never closed with ']'")


def _entry_span(lines: list[_Line], line_no: int, colon_end: int) -> tuple[int, str, str]:
    """Last line of the top-level entry starting at ``line_no`` and the comment to keep with it.

    Returns (last line index, whitespace before the kept comment, kept comment or "").
    The entry covers: a one-line scalar; a flow collection however many lines it spans; a block sequence
    (``-`` items at column 0 or indented, comment and blank lines between them); indented continuation lines.
    Blank and comment lines after the last value line belong to what follows and are not part of the entry.
    """
    content = lines[line_no][0]
    value, gap, comment = _split_comment(content[colon_end:])
    if value.strip()[:1] in ("[", "{"):
        col = colon_end + (len(content[colon_end:]) - len(content[colon_end:].lstrip(" \t")))
        return _close_flow(lines, line_no, col, gap, comment)
    last = line_no
    first_content = not value.strip()
    for k in range(line_no + 1, len(lines)):
        text = lines[k][0]
        if _is_blank_or_comment(text):
            continue
        if text[:1] in (" ", "\t"):
            if first_content and text.lstrip(" \t")[:1] in ("[", "{"):
                close_line, close_gap, close_comment = _close_flow(lines, k, len(text) - len(text.lstrip(" \t")),
                                                                   "", "")
                return close_line, gap or close_gap, comment or close_comment
            last = k
        elif not value.strip() and _BLOCK_ITEM_RE.match(text):
            last = k
        else:
            break
        first_content = False
    return last, gap, comment


def _close_flow(lines: list[_Line], line_no: int, col: int, gap: str, comment: str) -> tuple[int, str, str]:
    """Span of a flow collection opening at (line_no, col); keep the opening line's comment, else the closing one's."""
    close_line, close_col, first_comment = _scan_flow(lines, line_no, col)
    trailing = _TRAILING_RE.match(lines[close_line][0][close_col:])
    if trailing is None:
        raise ValueError(f"line {close_line + 1}: unexpected text after the closing bracket of a flow collection")
    if first_comment and close_line != line_no:
        opening = lines[line_no][0]
        pos = opening.index(first_comment, col)
        stripped = opening[:pos].rstrip(" \t")
        return close_line, opening[len(stripped):pos], first_comment
    if trailing.group(2):
        return close_line, trailing.group(1), trailing.group(2)
    return close_line, gap, comment


def _find_key(lines: list[_Line], key: str) -> tuple[int, int] | None:
    """(line index, column after the colon) of the top-level ``key``; ``ValueError`` if it appears twice."""
    pattern = _key_re(key)
    hits = [(i, m.end()) for i, (content, _) in enumerate(lines) if (m := pattern.match(content))]
    if len(hits) > 1:
        where = " and ".join(str(i + 1) for i, _ in hits)
        raise ValueError(f"top-level '{key}' appears {len(hits)} times (lines {where}); keep one and run again")
    return hits[0] if hits else None


def _format_heads(heads: list[str]) -> str:
    """``[L13H12, L7H6]``; every head is validated and normalised (``l7h6`` -> ``L7H6``)."""
    return "[" + ", ".join(str(parse_head(head)) for head in heads) + "]"


def read_heads_entry(text: str) -> str | list[str] | None:
    """Current top-level ``hera_heads`` value: a list of strings, a scalar string such as 'auto', or None if absent.

    The value is what ``yaml.safe_load`` (and so LLaMA-Factory) sees. An explicit null (``hera_heads:``) also
    reads as None. Raises ``ValueError`` if the text is not a YAML mapping.
    """
    data = yaml.safe_load(text)
    if data is None:
        return None
    if not isinstance(data, dict):
        raise ValueError(f"a recipe must be a YAML mapping of keys to values, got a {type(data).__name__}")
    value = data.get(KEY)
    if value is None:
        return None
    if isinstance(value, list):
        return [str(item) for item in value]
    return str(value)


def set_hera_heads(text: str, heads: list[str]) -> str:
    """Return `text` with the top-level `hera_heads` entry set to the flow list `[L13H12, L7H6]`.

    Replaces an existing top-level entry whatever its form: flow list on one line, a flow list spanning
    lines, a block list (`hera_heads:` followed by indented `- L1H2` lines, possibly with comments between),
    or a scalar (`auto`, quoted or not). A trailing comment on the `hera_heads:` line is kept (for a flow list
    spanning lines with no comment there, the comment after its closing bracket). Comments between the items
    of a replaced list go with the list. Every other byte of the file is unchanged. If absent: insert
    `hera_heads: [...]` on the line after the top-level `stage:` entry if there is one, else append at the end
    (adding a newline first if the file does not end with one). Keep the file's line endings (\\n or \\r\\n).

    Heads must look like ``L<layer>H<head>`` (``ValueError`` otherwise) and are written upper-case.
    """
    flow = _format_heads(heads)
    lines = _split_lines(text)
    eol = _file_eol(lines)
    found = _find_key(lines, KEY)
    if found is not None:
        start, colon_end = found
        end, gap, comment = _entry_span(lines, start, colon_end)
        new_content = lines[start][0][:colon_end] + " " + flow
        was_auto = _split_comment(lines[start][0][colon_end:])[0].strip().strip("'\"").lower() == "auto"
        if comment and was_auto:  # the comment described `auto`: say what the line holds now, drop its continuation
            while end + 1 < len(lines) and lines[end + 1][0].lstrip(" ").startswith("#") and \
                    lines[end + 1][0].index("#") == len(lines[start][0]) - len(comment):
                end += 1
            comment = "# chosen by `llamafactory-hera select` (was: auto)"
        if comment:
            new_content += (gap or "  ") + comment
        return _join(lines[:start] + [(new_content, lines[end][1])] + lines[end + 1:])
    new_line = (f"{KEY}: {flow}", eol)
    stage = _find_key(lines, "stage")
    if stage is not None:
        end, _, _ = _entry_span(lines, *stage)
        insert_at = end + 1
    else:
        insert_at = len(lines)
    before = list(lines[:insert_at])
    if before and not before[-1][1]:
        before[-1] = (before[-1][0], eol)
    return _join(before + [new_line] + lines[insert_at:])


def _load_mapping(text: str, path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ValueError(f"{path} is not valid YAML: {err}") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"{path} must be a YAML mapping of keys to values, got a {type(data).__name__}")
    return data


def _has_explicit_heads(value: str | list[str] | None) -> bool:
    """True for a non-empty list or a scalar other than ``auto``/empty: heads someone chose on purpose."""
    if value is None:
        return False
    if isinstance(value, list):
        return bool(value)
    return value.strip().lower() not in ("", "auto")


def check_writable(path: Path, *, force: bool = False, output: Path | None = None) -> Path:
    """The file :func:`update_recipe` would write, or the refusal it would raise (cheap: reads text only).

    Raises:
        HeadsExistError: the recipe (in-place update) already sets explicit heads and ``force`` is False.
        FileExistsError: ``output`` exists and ``force`` is False.
    """
    path = Path(path)
    if output is None or Path(output).resolve() == path.resolve():
        if not stat.S_IMODE(path.stat().st_mode) & stat.S_IWUSR or not os.access(path, os.W_OK):
            raise PermissionError(
                f"{path} is read-only (mode {stat.S_IMODE(path.stat().st_mode):04o}); it is left as it is. Write the "
                "selected heads into a copy with --output NEW.yaml (or make the recipe writable).")
        current = read_heads_entry(path.read_bytes().decode("utf-8"))
        if _has_explicit_heads(current) and not force:
            shown = "[" + ", ".join(current) + "]" if isinstance(current, list) else repr(current)
            raise HeadsExistError(
                f"{path} already sets hera_heads: {shown}. Pass --force to replace them, "
                f"or --output NEW.yaml to write the selected heads into a copy."
            )
        return path
    target = Path(output)
    if target.exists() and not force:
        raise FileExistsError(f"{target} already exists; pass --force to overwrite it, or choose another --output.")
    return target


def update_recipe(path: Path, heads: list[str], *, force: bool = False, output: Path | None = None) -> Path:
    """Write heads into the recipe (or into `output`, a new file: the source stays unchanged).

    Refuse (HeadsExistError) when the target already has an explicit non-empty list of heads and force is False
    (`auto` or an empty list or absence may be replaced without force). Refuse (FileExistsError naming the path and
    --force) when `output` exists and force is False. Returns the written path. The result must parse with
    yaml.safe_load and give the same mapping as before except hera_heads.

    An ``output`` that is the recipe itself counts as an in-place update. A new ``output`` gets the recipe's
    permission bits. Nothing is written if the check of the edited text fails.
    """
    path = Path(path)
    target = check_writable(path, force=force, output=output)
    text = path.read_bytes().decode("utf-8")
    before = _load_mapping(text, path)
    new_text = set_hera_heads(text, heads)
    expected = dict(before)
    expected[KEY] = [str(parse_head(head)) for head in heads]
    after = _load_mapping(new_text, target)
    if after != expected:
        changed = sorted(k for k in set(after) | set(expected) if after.get(k, None) != expected.get(k, None))
        raise RuntimeError(
            f"internal error: the edited {path} would not read back as before plus the new hera_heads (keys that "
            f"differ: {', '.join(changed)}); nothing was written. "
            f"Set hera_heads by hand: hera_heads: {_format_heads(heads)}"
        )
    write_text_atomic(target, new_text, mode=stat.S_IMODE(os.stat(path).st_mode))
    return target
