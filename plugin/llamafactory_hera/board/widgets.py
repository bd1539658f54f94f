"""The gradio side of a method's LlamaBoard panel. gradio is passed in by the caller."""

from __future__ import annotations

import html
import re
from collections.abc import Iterable, Sequence
from typing import Any


def as_markup(text: str) -> str:
    """Else ``L<layer>H<head>`` reads as tags and vanishes."""
    return html.escape(text, quote=False)


def create_widgets(
    gr: Any, panel_fields: Iterable[Any], locales: dict[str, dict[str, dict[str, str]]], datasets: Sequence[str] = ()
) -> dict[str, Any]:
    """Labels are English (LlamaBoard swaps in the locale's); a dataset box is a dropdown that takes typed names too."""
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
                    # no minimum / precision: gradio's range error names no field, and it rounds 1.5 to 2
                    # silently; validate() names the key and range
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
    if widget == "int" and isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        return value.strip()
    return value


def comma_list(text: str) -> str:
    """``[L1H0; 'L1H2' L3H4]`` -> ``L1H0,L1H2,L3H4``."""
    items = (item.strip("'\" ") for item in re.split(r"[,\s;]+", text.strip().strip("[]() ")))
    return ",".join(item for item in items if item)
