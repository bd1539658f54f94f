"""docs/hera.md's key table lists exactly HeraArguments, in declaration order, with each default and allowed values."""

from __future__ import annotations

import re
from dataclasses import MISSING, fields
from typing import Any

import yaml

from llamafactory_hera.hera.config import HeraArguments
from markdown_docs import key_table, read


def _default(spec: Any) -> Any:
    return spec.default_factory() if spec.default is MISSING else spec.default


def test_reference_table_lists_every_key_with_default_and_range() -> None:
    rows = key_table(read("docs/hera.md"), "Every `hera_*` key", "hera_")
    specs = {spec.name: spec for spec in fields(HeraArguments)}
    assert list(rows) == list(specs), "the table must list exactly the HeraArguments keys, in declaration order"
    for name, spec in specs.items():
        default_cell, allowed, meaning = rows[name]
        assert yaml.safe_load(default_cell.strip("`")) == _default(spec), f"{name}: default cell {default_cell!r}"
        assert meaning, f"{name}: empty meaning"
        meta = spec.metadata
        for choice in meta.get("choices", ()):
            assert f"`{choice}`" in allowed, f"{name}: allowed values miss {choice!r}"
        if "min" in meta:
            bound = re.search(r">=\s*(-?[0-9.]+)", allowed)
            assert bound and float(bound.group(1)) == meta["min"], f"{name}: range should say >= {meta['min']}"
        if "min_exclusive" in meta:
            bound = re.search(r"(?<![>=])>\s*(-?[0-9.]+)", allowed)
            assert bound and float(bound.group(1)) == meta["min_exclusive"], f"{name}: range should say > ..."
        if _default(spec) is None:
            assert "`null`" in allowed, f"{name}: null must be listed as allowed"
