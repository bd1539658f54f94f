"""The LlamaBoard panels' texts are data: ``panel_texts.yaml`` beside each panel declaration, read by the one builder.

Every declared field has a label and an info in every LlamaBoard language, and no text names a key the panel does
not declare; a file that breaks this stops the panel from being built, with the file and the key named.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from llamafactory_hera import methods
from llamafactory_hera.anatomy.panel_builder import (
    PANEL_SECTIONS,
    SHARED_SECTIONS,
    build_panel,
    read_texts,
    text_problems,
)
from llamafactory_hera.anatomy.panel_spec import LANGS, Field, LossPlot, PanelDeclaration

PANELS = {method.stage: method.load("panel") for method in methods.declared_methods() if method.panel}


@dataclasses.dataclass
class ToyArguments:
    toy_rows: int = 3
    toy_name: str = "rows"


def test_every_method_has_a_panel() -> None:
    assert set(PANELS) == {"hera", "rah", "harc"}


@pytest.mark.parametrize("stage", sorted(PANELS))
def test_every_declared_field_has_every_language_and_no_text_names_an_undeclared_key(stage: str) -> None:
    panel = PANELS[stage]
    texts = read_texts(panel.declaration.package)
    assert text_problems(texts, panel.keys, PANEL_SECTIONS) == []
    assert list(texts["fields"]) == list(panel.keys)  # the file reads in the panel's order
    for key in panel.keys:
        assert set(panel.locales[key]) == set(LANGS), key


def test_the_shared_texts_have_every_language() -> None:
    assert text_problems(read_texts("llamafactory_hera.anatomy"), (), SHARED_SECTIONS) == []


def test_text_problems_name_the_key_and_the_language() -> None:
    whole = {lang: ["Rows", "How many rows."] for lang in LANGS}
    texts = {"fields": {"toy_rows": {**whole, "xx": ["?", "?"]}, "toy_size": whole},
             "note": {"en": "A note."}, "notes": {}}
    assert text_problems(texts, ("toy_rows", "toy_name"), PANEL_SECTIONS) == [
        "notes: not one of fields, note, only_with_note",
        "fields: no texts for toy_name",
        "fields: toy_size is not a declared field",
        "fields: toy_rows: xx is not one of LlamaBoard's languages",
        "note: no ru text", "note: no zh text", "note: no ko text", "note: no ja text",
    ]
    assert text_problems({"note": "A note."}, (), PANEL_SECTIONS) == ["note: not a mapping of language -> text"]
    texts = {"fields": {"toy_rows": {**whole, "ja": ["Rows"]}, "toy_name": {**whole, "ko": ["", "Name."]}}}
    assert text_problems(texts, ("toy_rows", "toy_name"), PANEL_SECTIONS) == [
        "fields: toy_rows: ja is not [label, info]", "fields: toy_name: ko is not [label, info]"]


def test_a_panel_with_a_missing_translation_is_not_built(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    package = tmp_path / "toy_panel"
    package.mkdir()
    (package / "__init__.py").write_text("")
    texts_file = package / "panel_texts.yaml"
    lines = ["fields:", "  toy_rows:"] + [f"    {lang}: [Rows, How many rows.]" for lang in LANGS if lang != "ko"]
    texts_file.write_text("\n".join(lines) + "\n", encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    declaration = PanelDeclaration(name="Toy", prefix="toy_", package="toy_panel", arguments=ToyArguments,
                                   parse=lambda raw: ToyArguments(**raw), fields=(Field("toy_rows", 0),),
                                   loss_plot=LossPlot())
    with pytest.raises(ValueError, match=r"^Toy panel: toy_panel/panel_texts.yaml: fields: toy_rows: no ko text$"):
        build_panel(declaration)
    texts_file.write_text("\n".join(lines + ["    ko: [Rows, How many rows.]"]) + "\n", encoding="utf-8")
    assert build_panel(declaration).locales["toy_rows"]["ko"] == {"label": "Rows", "info": "How many rows."}
