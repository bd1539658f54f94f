"""The README's RAH-LoRA key table lists exactly RahArguments, with its defaults and allowed values."""

from __future__ import annotations

import re
from dataclasses import fields

import yaml

from conftest import REPO
from llamafactory_hera.rah.args import RahArguments


def test_rah_key_table_matches_the_arguments() -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = re.search(r"^### Every `rah_\*` key$(.*?)(?=^## |\Z)", readme, flags=re.M | re.S).group(1)
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip().strip("|"))]
        if line.startswith("|") and cells[0].startswith("`rah_"):
            rows[cells[0].strip("`")] = cells[1:]
    specs = {spec.name: spec for spec in fields(RahArguments)}
    assert list(rows) == list(specs)
    for name, spec in specs.items():
        default, allowed, meaning = rows[name]
        assert yaml.safe_load(default.strip("`")) == spec.default, name
        assert meaning.replace("\\|", "|") == spec.metadata["help"], name
        for choice in spec.metadata.get("choices", ()):
            assert f"`{choice}`" in allowed, name
        for bound, text in (("min", ">="), ("min_exclusive", ">"), ("max", "<="), ("max_exclusive", "<")):
            if bound in spec.metadata:
                assert f"{text} {spec.metadata[bound]}" in allowed, (name, bound)
