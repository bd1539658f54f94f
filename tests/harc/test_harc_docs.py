"""docs/harc.md's key table lists exactly HarcArguments, with its defaults and allowed values; the recipes it names
are the shipped ones."""

from __future__ import annotations

import re
from dataclasses import fields

import yaml

from conftest import REPO
from llamafactory_hera.harc.config import HarcArguments
from markdown_docs import key_table, read

KEYS = "Every `harc_*` key"


def test_harc_key_table_matches_the_arguments() -> None:
    rows = key_table(read("docs/harc.md"), KEYS, "harc_")
    specs = {spec.name: spec for spec in fields(HarcArguments)}
    assert list(rows) == list(specs)
    for name, spec in specs.items():
        default, allowed, meaning = rows[name]
        expected = spec.default
        assert (yaml.safe_load(default.strip("`")) or "") == ("" if expected is None else expected), name
        assert meaning.replace("\\|", "|") == spec.metadata["help"], name
        for bound, text in (("min", ">="), ("min_exclusive", ">"), ("max", "<="), ("max_exclusive", "<")):
            if bound in spec.metadata:
                assert f"{text} {spec.metadata[bound]}" in allowed, (name, bound)


def test_the_docs_name_the_shipped_harc_recipes_and_no_placeholder() -> None:
    text = read("docs/harc.md")
    prose = text[:text.index(f"## {KEYS}")]
    named = set(re.findall(r"recipes/(\w+_harc\.yaml)", prose))
    assert named == {p.name for p in (REPO / "recipes").glob("*_harc.yaml")} == {"llama3_1_8b_harc.yaml",
                                                                                 "qwen2_5_7b_harc.yaml"}
    assert "HARC_BENCH_LINE" not in text and "TODO" not in prose
