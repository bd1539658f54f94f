"""``llamafactory-hera data convert``: every ``id`` of a LLaVA JSON file a string (docs/llava-data.md)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llamafactory_hera.hera.selection.recipe_write import write_text_atomic
from llamafactory_hera.runtime.errors import RecipeError

SUFFIX = ".string_ids.json"


@dataclass(frozen=True)
class Conversion:
    output: Path
    rows: int
    ids_changed: int
    written: bool

    def summary(self) -> str:
        state = "wrote" if self.written else "up to date, nothing written:"
        return (
            f"{state} {self.output}: {self.rows:,} rows, {self.ids_changed:,} ids made strings (LLaMA-Factory's "
            "JSON loader needs one type per column); images and conversations unchanged"
        )


def default_output(source: Path) -> Path:
    return source.with_name(source.stem + SUFFIX)


def _read_rows(source: Path) -> list[dict[str, Any]]:
    if not source.is_file():
        raise RecipeError(
            f"data convert: {source} does not exist; give the path of LLaVA's JSON file (e.g. "
            "llava_v1_5_mix665k.json, see docs/llava-data.md)."
        )
    try:
        rows = json.loads(source.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as err:
        raise RecipeError(f"data convert: {source} is not JSON ({err}); download it again.") from None
    if not isinstance(rows, list) or not all(isinstance(row, dict) and "conversations" in row for row in rows):
        raise RecipeError(
            f"data convert: {source} is not a LLaVA data file (a JSON list of rows with "
            '"conversations"); give llava_v1_5_mix665k.json or blip_laion_cc_sbu_558k.json.'
        )
    return rows


def convert_file(source: Path, output: Path | None = None, force: bool = False) -> Conversion:
    """A rerun is a no-op; a different existing ``output`` is replaced only with ``force``."""
    target = output or default_output(source)
    if target.resolve() == source.resolve():
        raise RecipeError(
            f"data convert: --output {target} is the source file; the source is never overwritten. "
            "Give another --output (default: beside it, *.string_ids.json)."
        )
    rows = _read_rows(source)
    changed = 0
    for row in rows:
        if "id" in row and not isinstance(row["id"], str):
            row["id"] = str(row["id"])
            changed += 1
    text = json.dumps(rows, ensure_ascii=False)
    if target.is_file() and target.read_text(encoding="utf-8", errors="replace") == text:
        return Conversion(target, len(rows), changed, written=False)
    if target.exists() and not force:
        raise RecipeError(
            f"data convert: {target} exists and differs from this conversion of {source}; --force "
            "replaces it (or give another --output)."
        )
    write_text_atomic(target, text)
    return Conversion(target, len(rows), changed, written=True)
