"""Builds every method's LlamaBoard panel; gradio is passed in."""

from __future__ import annotations

import re
from collections.abc import Mapping
from importlib import resources
from typing import Any

import yaml

from llamafactory_hera.board.panel_checks import dataset_names, unknown_datasets
from llamafactory_hera.board.spec import (
    NO_FIELD,
    UNKNOWN_KEY,
    WIDGETS,
    Field,
    PanelDeclaration,
    default_of,
    widget_for,
)
from llamafactory_hera.board.widgets import as_markup, create_widgets, typed_value
from llamafactory_hera.plots.training import TrainingPlot, draw_training, series

Locales = dict[str, dict[str, dict[str, str]]]  # element -> language -> {"label", "info"} or {"value"}

TEXTS_FILE = "panel_texts.yaml"  # a method's: fields (key -> language -> [label, info]), note, only_with_note; this
# package's: tab_title, error_prefix, plan_button, plan_box (language -> text with {name}); all in every language


def read_texts(package: str) -> dict[str, Any]:
    return yaml.safe_load(resources.files(package).joinpath(TEXTS_FILE).read_text(encoding="utf-8")) or {}


class BoxField:
    def __init__(self, declared: Field, declaration: PanelDeclaration) -> None:
        spec = declaration.spec(declared.key)
        self.key = declared.key
        self.row = declared.row
        self.scale = declared.scale
        self.widget = declared.widget or widget_for(spec)
        if self.widget not in WIDGETS:
            raise ValueError(f"{declared.key}: widget {self.widget!r} is not one of {', '.join(WIDGETS)}")
        self.default = default_of(spec) if declared.default is None else declared.default
        self.choices: tuple[str, ...] | None = spec.metadata.get("choices")
        self.normalize = declared.normalize
        self.only_with = declared.only_with

    def recipe_value(self, value: Any) -> Any:
        """A checkbox as a bool, which the web-UI patch keeps where LlamaBoard drops false values."""
        if self.widget == "checkbox":
            return bool(value)
        if self.widget == "dataset" and value is None:
            value = ""  # a cleared dropdown
        value = typed_value(self.widget, value)
        return self.normalize(value) if self.normalize else value


class MethodPanel:
    def __init__(self, declaration: PanelDeclaration, texts: Mapping[str, Any], shared: Mapping[str, Any]) -> None:
        self.declaration = declaration
        self.fields = tuple(BoxField(declared, declaration) for declared in declaration.fields)
        self.tab = f"{declaration.prefix}tab"  # accordion's element id
        self.note = f"{declaration.prefix}note" if "note" in texts else ""  # note's element id, if any
        self.keys = tuple(field.key for field in self.fields)
        self.defaults = {field.key: field.default for field in self.fields}
        self.error_prefix = {lang: text.format(name=declaration.name) for lang, text in shared["error_prefix"].items()}
        self.locales: Locales = {
            self.tab: {
                lang: {"label": text.format(name=declaration.name)} for lang, text in shared["tab_title"].items()
            }
        }
        if self.note:
            self.locales[self.note] = {lang: {"value": text} for lang, text in texts["note"].items()}
        self.plan_button = f"{declaration.prefix}plan_btn"
        self.plan_box = f"{declaration.prefix}plan_box"
        self.locales[self.plan_button] = {lang: {"value": text} for lang, text in shared["plan_button"].items()}
        self.locales[self.plan_box] = {lang: {"label": text} for lang, text in shared["plan_box"].items()}
        for field in self.fields:
            lead = texts.get("only_with_note", {}) if field.only_with else {}
            self.locales[field.key] = {
                lang: {"label": label, "info": lead.get(lang, "") + info}
                for lang, (label, info) in texts["fields"][field.key].items()
            }

    def create_panel(self, gr: Any, dataset_dir: str | None = None) -> dict[str, Any]:
        note = {}
        if self.note:
            note[self.note] = gr.Markdown(elem_id=f"train-{self.note}", **self.locales[self.note]["en"])
        names = dataset_names(dataset_dir) if dataset_dir else []
        elems = {**note, **create_widgets(gr, self.fields, self.locales, names)}
        elems[self.plan_button] = gr.Button(elem_id=f"train-{self.plan_button}", **self.locales[self.plan_button]["en"])
        elems[self.plan_box] = gr.Textbox(
            elem_id=f"train-{self.plan_box}",
            interactive=False,
            lines=4,
            max_lines=30,
            **self.locales[self.plan_box]["en"],
        )
        return elems

    def inputs(self, elems: Mapping[str, Any]) -> dict[str, Any]:
        return {key: elem for key, elem in elems.items() if key in self.keys}

    def bind(self, gr: Any, train_elems: Mapping[str, Any], own: Mapping[str, Any]) -> None:
        """Dataset boxes list the Data dir's datasets, re-read when it changes or a box opens (as LlamaBoard's)."""
        boxes = [own[field.key] for field in self.fields if field.widget == "dataset"]
        dataset_dir = train_elems.get("dataset_dir")
        if not boxes or dataset_dir is None:
            return

        def list_datasets(directory: str) -> list[Any]:
            return [gr.Dropdown(choices=dataset_names(directory)) for _ in boxes]

        list_datasets.__name__ = f"list_{self.declaration.prefix}datasets"
        dataset_dir.change(list_datasets, [dataset_dir], boxes, queue=False)
        for box in boxes:
            box.focus(
                lambda directory: gr.Dropdown(choices=dataset_names(directory)), [dataset_dir], [box], queue=False
            )

    def build_args(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """Missing values: defaults; unmet ``only_with`` fields left out."""
        merged = {field.key: values.get(field.key, field.default) for field in self.fields}
        recipe = {field.key: field.recipe_value(merged[field.key]) for field in self.fields}
        return {
            field.key: recipe[field.key]
            for field in self.fields
            if not field.only_with or recipe.get(field.only_with[0]) == field.only_with[1]
        }

    def method_keys(self, extra: Mapping[str, Any] | None) -> dict[str, Any]:
        """They win over the panel."""
        return {key: value for key, value in (extra or {}).items() if str(key).startswith(self.declaration.prefix)}

    def host_args(self, args: dict[str, Any], extra: Mapping[str, Any] | None) -> dict[str, Any]:
        return {
            key: value
            for key, value in args.items()
            if key not in self.declaration.unused_host_keys or key in (extra or {})
        }

    def validate(
        self,
        values: Mapping[str, Any],
        extra: Mapping[str, Any] | None = None,
        context: Mapping[str, Any] | None = None,
    ) -> str:
        """Empty when the values and "Extra arguments" make a valid run, else one line naming the key."""
        raw = {**self.build_args(values), **self.method_keys(extra)}
        try:
            parsed = self.declaration.parse(raw)
        except ValueError as err:
            return self._with_field_hint(str(err))
        context = context or {}
        for check in self.declaration.checks:
            problem = check(parsed, context)
            if problem:
                return self._with_field_hint(problem)
        return self._dataset_problem(raw, context.get("dataset_dir"))

    def error_text(self, problem: str, lang: str) -> str:
        return self.error_prefix.get(lang, self.error_prefix["en"]) + as_markup(problem)

    def _with_field_hint(self, problem: str) -> str:
        match = re.match(r"(\w+):", problem) or re.search(r"key '(\w+)'", problem)
        key = match.group(1) if match else ""
        if not key.startswith(self.declaration.prefix) or key in self.keys:
            return problem
        try:
            self.declaration.spec(key)
        except KeyError:
            return problem + UNKNOWN_KEY.format(name=self.declaration.name)
        return problem + NO_FIELD.format(key=key, name=self.declaration.name)

    def _dataset_problem(self, raw: Mapping[str, Any], dataset_dir: Any) -> str:
        named = {
            key: value for key, value in raw.items() if value and self.declaration.spec(key).metadata.get("dataset")
        }
        missing = unknown_datasets(dataset_dir, named)
        if not missing:
            return ""
        key, (name, listed) = next(iter(missing.items()))
        listed_text = ", ".join(listed[:8]) + (", ..." if len(listed) > 8 else "") if listed else "no dataset"
        hint = f" {self.declaration.dataset_hint}" if self.declaration.dataset_hint else ""
        return self._with_field_hint(
            f"{key}: dataset '{name}' is not in {dataset_dir}/dataset_info.json (it lists "
            f"{listed_text}). Pick one of those or add it there.{hint}"
        )

    def owns_loss_plot(self, trainer_log: list[dict[str, Any]]) -> bool:
        plot = self.declaration.loss_plot
        markers = (plot.marker,) if plot.marker else plot.plot.terms if plot.plot else ()
        return any(log.get(key) is not None for log in trainer_log for key in markers)

    def loss_figure(self, trainer_log: list[dict[str, Any]], smooth: Any) -> Any:
        """The declared figure, else ``training.png``'s with LlamaBoard's smoothing; None if nothing was logged."""
        plot = self.declaration.loss_plot
        if plot.figure is not None:
            return plot.figure(trainer_log, smooth)
        data = series((log.get("current_steps"), log) for log in trainer_log)
        return draw_training(data, plot.plot or TrainingPlot((), ""), smooth)  # no plot: loss alone


def build_panel(declaration: PanelDeclaration) -> MethodPanel:
    return MethodPanel(declaration, read_texts(declaration.package), read_texts(__package__))
