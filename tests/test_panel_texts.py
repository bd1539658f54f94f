"""The LlamaBoard panels' texts are data: ``panel_texts.yaml`` beside each panel declaration, read by the one builder.

Every declared field has a label and an info in every LlamaBoard language, and no text names a key the panel does
not declare (the texts ship with the package: these tests are their check).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from llamafactory_hera import methods
from llamafactory_hera.board.builder import build_panel, read_texts
from llamafactory_hera.board.spec import LANGS, Field, LossPlot, PanelDeclaration

PANELS = {method.stage: method.panel() for method in methods.declared_methods() if method.panel}


@dataclasses.dataclass
class ToyArguments:
    toy_rows: int = 3
    toy_name: str = "rows"


def test_every_method_has_a_panel() -> None:
    assert set(PANELS) == {"hera", "rah", "harc"}


def _in_every_language(entry: Any, label_and_info: bool) -> bool:
    """``entry`` maps exactly LlamaBoard's languages to a text ([label, info], both non-empty, for a field)."""
    def fits(text: Any) -> bool:
        if label_and_info:
            return isinstance(text, list) and len(text) == 2 and all(isinstance(t, str) and t for t in text)
        return isinstance(text, str)

    return isinstance(entry, dict) and set(entry) == set(LANGS) and all(map(fits, entry.values()))


@pytest.mark.parametrize("stage", sorted(PANELS))
def test_every_declared_field_has_every_language_and_no_text_names_an_undeclared_key(stage: str) -> None:
    panel = PANELS[stage]
    texts = read_texts(panel.declaration.package)
    assert set(texts) <= {"fields", "note", "only_with_note"}
    assert list(texts["fields"]) == list(panel.keys)  # every field, no other key, in the panel's order
    assert [key for key, entry in texts["fields"].items() if not _in_every_language(entry, True)] == []
    assert [name for name, entry in texts.items() if name != "fields" and not _in_every_language(entry, False)] == []
    for key in panel.keys:
        assert set(panel.locales[key]) == set(LANGS), key


def test_the_shared_texts_have_every_language() -> None:
    texts = read_texts("llamafactory_hera.board")
    assert set(texts) == {"tab_title", "error_prefix", "plan_button", "plan_box"}
    assert all(_in_every_language(entry, False) for entry in texts.values())


def test_a_panel_is_built_from_its_package_texts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    package = tmp_path / "toy_panel"
    package.mkdir()
    (package / "__init__.py").write_text("")
    texts_file = package / "panel_texts.yaml"
    lines = ["fields:", "  toy_rows:"] + [f"    {lang}: [Rows, How many rows.]" for lang in LANGS]
    monkeypatch.syspath_prepend(str(tmp_path))
    declaration = PanelDeclaration(name="Toy", prefix="toy_", package="toy_panel", arguments=ToyArguments,
                                   parse=lambda raw: ToyArguments(**raw), fields=(Field("toy_rows", 0),),
                                   loss_plot=LossPlot())
    texts_file.write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert build_panel(declaration).locales["toy_rows"]["ko"] == {"label": "Rows", "info": "How many rows."}
