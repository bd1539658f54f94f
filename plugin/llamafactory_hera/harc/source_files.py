"""Reading HARC's source files (``harc-data``'s inputs) into rows: .json (a list, one object, or JSON Lines under
a .json name), .jsonl, .csv with a header, .parquet. Every error names the option and the file."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from llamafactory_hera.short_errors import RecipeError

Row = dict[str, Any]
READABLE = (".json", ".jsonl", ".csv", ".parquet")


def _parse_json(text: str, where: str) -> list[Any]:
    """The records of a JSON file: a list as it is, one object as one record; else JSON Lines (the reference's
    ``advbench.json`` is JSON Lines under a .json name)."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        if len([line for line in text.splitlines() if line.strip()]) < 2:
            raise RecipeError(f"{where}: not JSON ({err}).") from None
        return _parse_jsonl(text, where)
    return data if isinstance(data, list) else [data]


def _parse_jsonl(text: str, where: str) -> list[Any]:
    """The records of a JSON Lines text, one per non-blank line."""
    records = []
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise RecipeError(f"{where}: line {number} is not JSON ({err}).") from None
    return records


def read_rows(path: Path, option: str) -> list[Row]:
    """The rows of a source file (.json list or JSON Lines, .jsonl, .csv with a header, .parquet), each a dict.

    Errors name ``option`` and the path: a missing file (FileNotFoundError), a folder, another suffix, text that does
    not parse, a record that is not an object (ValueError)."""
    where = f"{option} {path}"
    if not path.exists():
        raise FileNotFoundError(f"{option}: no such file: {path}")
    if not path.is_file():
        raise RecipeError(f"{where}: not a file.")
    suffix = path.suffix.lower()
    if suffix not in READABLE:
        raise RecipeError(f"{where}: cannot read a {suffix or 'suffix-less'} file; give one of {', '.join(READABLE)}.")
    records: list[Any]
    try:
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            try:
                records = pq.read_table(path).to_pylist()
            except (ValueError, OSError) as err:  # pyarrow's errors do not name the file
                raise RecipeError(f"{where}: cannot read it as parquet ({err}).") from None
        elif suffix == ".csv":
            with path.open(encoding="utf-8-sig", newline="") as handle:
                records = list(csv.DictReader(handle))
        else:
            text = path.read_text(encoding="utf-8-sig")
            records = _parse_jsonl(text, where) if suffix == ".jsonl" else _parse_json(text, where)
    except (UnicodeDecodeError, csv.Error) as err:
        raise RecipeError(f"{where}: cannot read it ({err}).") from None
    for number, record in enumerate(records, 1):
        if not isinstance(record, dict):
            raise RecipeError(f"{where}: row {number} is a {type(record).__name__}, not an object with columns.")
    return records


def missing_column(row: Row, number: int, column: str, where: str) -> RecipeError:
    """The error for a row without ``column``: the file, the row number (1-based), the column and the row's columns."""
    return RecipeError(f"{where}: row {number} has no column '{column}' (its columns: {', '.join(map(str, row))}).")


def column_text(row: Row, number: int, column: str, where: str) -> str:
    """The text in ``column`` of row ``number`` (1-based); "" for a null. ValueError for a missing column (naming
    the row and the column) or a value that is not text."""
    if column not in row:
        raise missing_column(row, number, column, where)
    value = row[column]
    if value is None:
        return ""
    if not isinstance(value, str):
        raise RecipeError(f"{where}: row {number}, column '{column}': expected text, got {type(value).__name__}.")
    return value
