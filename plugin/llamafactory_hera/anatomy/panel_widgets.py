"""What every method's LlamaBoard panel shares: the languages, the locale tables, the gradio inputs and markup.

A panel module (see :class:`llamafactory_hera.methods.Method`, ``panel``) lists its fields as objects with
``key``, ``widget`` (textbox | number | int | dropdown | checkbox), ``row``, ``scale``, ``default`` and
``choices``; this module builds LlamaBoard's locale entries and the gradio components from them. gradio is
passed in (imported by the caller only when LlamaBoard is built).
"""

from __future__ import annotations

import dataclasses
import html
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

LANGS = ("en", "ru", "zh", "ko", "ja")  # LlamaBoard's languages (top.lang); every locale entry needs all of them


class PanelField(Protocol):
    """One input of a panel: a recipe key, its widget and its row in the accordion."""

    key: str
    widget: str
    row: int
    scale: int

    @property
    def default(self) -> Any: ...

    @property
    def choices(self) -> tuple[str, ...] | None: ...


def build_locales(tab: str, tab_labels: dict[str, str], texts: dict[str, dict[str, tuple[str, str]]],
                  keys: Iterable[str], note: Callable[[str, str], str] | None = None
                  ) -> dict[str, dict[str, dict[str, str]]]:
    """LlamaBoard's LOCALES shape (element name -> language -> {"label", "info"}) for a panel.

    ``texts``: key -> language -> (label, info), English where a language is missing; ``note(key, lang)``
    is put before the info (e.g. "With heads = auto: ").
    """
    locales: dict[str, dict[str, dict[str, str]]] = {tab: {lang: {"label": tab_labels[lang]} for lang in LANGS}}
    for key in keys:
        entry = {}
        for lang in LANGS:
            label, info = texts[key].get(lang, texts[key]["en"])
            entry[lang] = {"label": label, "info": (note(key, lang) if note else "") + info}
        locales[key] = entry
    return locales


def localized_in(locales: dict[str, dict[str, dict[str, str]]], key: str, lang: str) -> dict[str, str]:
    """Label (and info) of a panel element in ``lang``, English where the language is unknown."""
    entry = locales[key]
    return dict(entry.get(lang, entry["en"]))


def as_markup(text: str) -> str:
    """``text`` for LlamaBoard's alert toast and output box, which render HTML (Markdown): ``L<layer>H<head>``
    would otherwise be read as two unknown tags and disappear."""
    return html.escape(text, quote=False)


def create_widgets(gr: Any, panel_fields: Iterable[PanelField],
                   locales: dict[str, dict[str, dict[str, str]]]) -> dict[str, Any]:
    """The panel's inputs in the current gradio layout context (an accordion), row by row; key -> component.

    Labels are English here; LlamaBoard replaces them from the locales when the language is set.
    """
    ordered = list(panel_fields)
    elems: dict[str, Any] = {}
    for row in sorted({f.row for f in ordered}):
        with gr.Row():
            for field in (f for f in ordered if f.row == row):
                common = dict(elem_id=f"train-{field.key}", scale=field.scale,
                              **localized_in(locales, field.key, "en"))
                if field.widget == "textbox":
                    elem = gr.Textbox(value=field.default, **common)
                elif field.widget in ("int", "number"):
                    # No minimum / precision: gradio would reject a value out of range with a message that
                    # names no field, or round 1.5 to 2 silently; the panel's validate() names the key and range.
                    elem = gr.Number(value=field.default, **common)
                elif field.widget == "dropdown":
                    elem = gr.Dropdown(choices=list(field.choices or ()), value=field.default, **common)
                else:
                    elem = gr.Checkbox(value=bool(field.default), **common)
                elems[field.key] = elem
    return elems


def typed_value(widget: str, value: Any) -> Any:
    """A panel value as a recipe value: whole-number floats of int fields as int, text stripped."""
    if widget == "int" and isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        return value.strip()
    return value


@dataclass(frozen=True)
class ArgumentField:
    """A :class:`PanelField` for one key of a method's arguments dataclass (``arguments``): its default and choices
    are that dataclass field's default and ``metadata["choices"]``."""

    key: str
    widget: str  # textbox | number | int | dropdown | checkbox
    row: int
    scale: int = 1
    arguments: type | None = None

    def _spec(self) -> dataclasses.Field:
        return next(spec for spec in dataclasses.fields(self.arguments) if spec.name == self.key)

    @property
    def default(self) -> Any:
        return self._spec().default

    @property
    def choices(self) -> tuple[str, ...] | None:
        return self._spec().metadata.get("choices")


def argument_fields(arguments: type, layout: Iterable[tuple[Any, ...]]) -> tuple[ArgumentField, ...]:
    """The panel's fields from ``(key, widget, row[, scale])`` entries of ``arguments``' keys."""
    return tuple(ArgumentField(*entry[:3], scale=entry[3] if len(entry) > 3 else 1, arguments=arguments)
                 for entry in layout)


def arguments_from_values(panel_fields: Iterable[PanelField], values: dict[str, Any]) -> dict[str, Any]:
    """Recipe arguments from a panel's values: every field, missing ones at their defaults, typed
    (:func:`typed_value`)."""
    ordered = list(panel_fields)
    merged = {field.key: values.get(field.key, field.default) for field in ordered}
    return {field.key: typed_value(field.widget, merged[field.key]) for field in ordered}


def validation_problem(parse: Callable[[dict[str, Any]], Any], args: dict[str, Any]) -> str:
    """Empty when ``parse(args)`` accepts the arguments, else its ``ValueError`` message (which names the key)."""
    try:
        parse(args)
    except ValueError as err:
        return str(err)
    return ""
