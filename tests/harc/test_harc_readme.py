"""The README's HARC key table lists exactly HarcArguments, with its defaults and allowed values; the recipes named
in the README exist."""

from __future__ import annotations

import re
from dataclasses import fields

import yaml

from conftest import REPO
from llamafactory_hera.harc.args import HarcArguments


def test_harc_key_table_matches_the_arguments() -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = re.search(r"^### Every `harc_\*` key$(.*?)(?=^## |\Z)", readme, flags=re.M | re.S).group(1)
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip().strip("|"))]
        if line.startswith("|") and cells[0].startswith("`harc_"):
            rows[cells[0].strip("`")] = cells[1:]
    specs = {spec.name: spec for spec in fields(HarcArguments)}
    assert list(rows) == list(specs)
    for name, spec in specs.items():
        default, allowed, meaning = rows[name]
        expected = spec.default
        assert (yaml.safe_load(default.strip("`")) or "") == expected, name
        assert meaning.replace("\\|", "|") == spec.metadata["help"], name
        for bound, text in (("min", ">="), ("min_exclusive", ">"), ("max", "<="), ("max_exclusive", "<")):
            if bound in spec.metadata:
                assert f"{text} {spec.metadata[bound]}" in allowed, (name, bound)


def test_the_readme_names_the_shipped_harc_recipes_and_no_placeholder() -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## HARC:"):readme.index("### Every `harc_*` key")]
    named = set(re.findall(r"recipes/(\w+_harc\.yaml)", section))
    assert named == {p.name for p in (REPO / "recipes").glob("*_harc.yaml")} == {"llama3_1_8b_harc.yaml",
                                                                                 "qwen2_5_7b_harc.yaml"}
    assert "HARC_BENCH_LINE" not in readme and "TODO" not in section
