"""``harc-data``'s source files as rows; every error names the option and the file."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from llamafactory_hera.runtime.errors import RecipeError

Row = dict[str, Any]
READABLE = (".json", ".jsonl", ".csv", ".parquet")


def _parse_json(text: str, where: str) -> list[Any]:
    """A JSON file's records, else JSON Lines (the reference's ``advbench.json`` is JSON Lines under a .json name)."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        if len([line for line in text.splitlines() if line.strip()]) < 2:
            raise RecipeError(f"{where}: not JSON ({err}).") from None
        return _parse_jsonl(text, where)
    return data if isinstance(data, list) else [data]


def _parse_jsonl(text: str, where: str) -> list[Any]:
    records = []
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise RecipeError(f"{where}: line {number} is not JSON ({err}).") from None
    return records


def read_text(path: Path, where: str) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise _not_utf8(where, err) from None


def _not_utf8(where: str, err: UnicodeDecodeError) -> RecipeError:
    return RecipeError(
        f"{where}: not UTF-8 text (byte {err.object[err.start]:#04x} at offset {err.start}); save it as UTF-8."
    )


def read_csv(path: Path, where: str) -> list[tuple[int, Row]]:
    """A CSV file's rows, each with the line it starts on (a quoted field may span lines)."""
    rows: list[tuple[int, Row]] = []
    try:
        with path.open(encoding="utf-8-sig", newline="") as handle:
            reader = csv.reader(handle, strict=True)
            start = 1
            header = next(reader, [])
            while True:
                start = reader.line_num + 1
                fields = next(reader, None)
                if fields is None:
                    return rows
                if not fields:
                    continue
                label = f"row {len(rows) + 1} (line {start})"
                if len(fields) > len(header):
                    raise RecipeError(
                        f"{where}: {label} has {len(fields)} fields, more than the header's "
                        f"{len(header)} ({', '.join(header)}); quote a field that holds a comma."
                    )
                if len(fields) < len(header):
                    raise RecipeError(
                        f"{where}: {label} has {len(fields)} fields, fewer than the header's "
                        f"{len(header)}: no column '{header[len(fields)]}'."
                    )
                rows.append((start, dict(zip(header, fields, strict=True))))
    except UnicodeDecodeError as err:
        raise _not_utf8(where, err) from None
    except csv.Error as err:
        said = (
            "a quote opened there is never closed; close it"
            if "unexpected end of data" in str(err)
            else 'text after a closing quote; double a quote inside a quoted field ("")'
        )
        raise RecipeError(f"{where}: row {len(rows) + 1} (line {start}): {said} (csv: {err}).") from None


def read_rows(path: Path, option: str) -> list[Row]:
    where = f"{option} {path}"
    if not path.exists():
        raise FileNotFoundError(f"{option}: no such file: {path}")
    if not path.is_file():
        raise RecipeError(f"{where}: not a file.")
    suffix = path.suffix.lower()
    if suffix not in READABLE:
        raise RecipeError(f"{where}: cannot read a {suffix or 'suffix-less'} file; give one of {', '.join(READABLE)}.")
    records: list[Any]
    if suffix == ".parquet":
        import pyarrow.parquet as pq  # lazy: only for a parquet source

        try:
            records = pq.read_table(path).to_pylist()
        except (ValueError, OSError) as err:  # pyarrow's errors do not name the file
            raise RecipeError(f"{where}: cannot read it as parquet ({err}).") from None
    elif suffix == ".csv":
        records = [row for _, row in read_csv(path, where)]
    else:
        text = read_text(path, where)
        records = _parse_jsonl(text, where) if suffix == ".jsonl" else _parse_json(text, where)
    for number, record in enumerate(records, 1):
        if not isinstance(record, dict):
            raise RecipeError(f"{where}: row {number} is a {type(record).__name__}, not an object with columns.")
    return records


def missing_column(row: Row, number: int | str, column: str, where: str) -> RecipeError:
    return RecipeError(f"{where}: row {number} has no column '{column}' (its columns: {', '.join(map(str, row))}).")


def column_text(row: Row, number: int | str, column: str, where: str) -> str:
    """The text in ``column`` of row ``number``; "" for a null."""
    if column not in row:
        raise missing_column(row, number, column, where)
    value = row[column]
    if value is None:
        return ""
    if not isinstance(value, str):
        raise RecipeError(f"{where}: row {number}, column '{column}': expected text, got {type(value).__name__}.")
    return value
