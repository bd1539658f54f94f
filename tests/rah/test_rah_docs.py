"""docs/rah.md's key table lists exactly RahArguments, with its defaults and allowed values."""

from __future__ import annotations

from dataclasses import fields

import yaml

from llamafactory_hera.rah.config import RahArguments
from markdown_docs import key_table, read


def test_rah_key_table_matches_the_arguments() -> None:
    rows = key_table(read("docs/rah.md"), "Every `rah_*` key", "rah_")
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
