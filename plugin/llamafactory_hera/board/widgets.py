"""The gradio side of every method's LlamaBoard panel: its inputs, row by row, and text made safe for its toasts.

Fields are :class:`~llamafactory_hera.board.builder.BoxField` objects (``key``, ``widget``: textbox | number |
int | dropdown | checkbox | dataset, ``row``, ``scale``, ``default``, ``choices``). gradio is passed in (imported by
the caller only when LlamaBoard is built).
"""

from __future__ import annotations

import html
import re
from collections.abc import Iterable, Sequence
from typing import Any


def as_markup(text: str) -> str:
    """``text`` for LlamaBoard's alert toast and output box, which render HTML (Markdown): ``L<layer>H<head>``
    would otherwise be read as two unknown tags and disappear."""
    return html.escape(text, quote=False)


def create_widgets(
    gr: Any, panel_fields: Iterable[Any], locales: dict[str, dict[str, dict[str, str]]], datasets: Sequence[str] = ()
) -> dict[str, Any]:
    """The panel's inputs in the current gradio layout context (an accordion), row by row; key -> component. Labels
    are English here (LlamaBoard replaces them from the locales); a dataset box is a dropdown of ``datasets`` that
    also takes a typed name."""
    ordered = list(panel_fields)
    elems: dict[str, Any] = {}
    for row in sorted({f.row for f in ordered}):
        with gr.Row():
            for field in (f for f in ordered if f.row == row):
                entry = locales[field.key]["en"]
                common = dict(elem_id=f"train-{field.key}", scale=field.scale, label=entry["label"], info=entry["info"])
                if field.widget == "textbox":
                    elem = gr.Textbox(value=field.default, **common)
                elif field.widget in ("int", "number"):
                    # No minimum / precision: gradio would reject a value out of range with a message that
                    # names no field, or round 1.5 to 2 silently; the panel's validate() names the key and range.
                    elem = gr.Number(value=field.default, **common)
                elif field.widget == "dropdown":
                    elem = gr.Dropdown(choices=list(field.choices or ()), value=field.default, **common)
                elif field.widget == "dataset":
                    elem = gr.Dropdown(choices=list(datasets), value=field.default, allow_custom_value=True, **common)
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


def comma_list(text: str) -> str:
    """A list typed in a box (``[L1H0; 'L1H2' L3H4]``) as one recipe string without spaces (``L1H0,L1H2,L3H4``)."""
    items = (item.strip("'\" ") for item in re.split(r"[,\s;]+", text.strip().strip("[]() ")))
    return ",".join(item for item in items if item)
