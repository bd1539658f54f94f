"""What a method declares about its LlamaBoard panel; texts live in ``panel_texts.yaml``."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from llamafactory_hera.plots.training import TrainingPlot

LANGS = ("en", "ru", "zh", "ko", "ja")  # LlamaBoard's top.lang; every locale has all
WIDGETS = ("textbox", "number", "int", "dropdown", "checkbox", "dataset")


# (parsed arguments, context: model_path, dataset_dir) -> "" or a one-line problem naming the key
Check = Callable[[Any, Mapping[str, Any]], str]


@dataclass(frozen=True)
class Field:
    """``widget`` "": :func:`widget_for`; ``default`` None: the dataclass's; ``only_with`` (key, value): sent only
    while that field has ``value``."""

    key: str
    row: int
    scale: int = 1
    widget: str = ""
    default: Any = None
    normalize: Callable[[Any], Any] | None = None
    only_with: tuple[str, Any] | None = None


def row(index: int, *keys: str, **options: Any) -> tuple[Field, ...]:
    return tuple(Field(key, index, **options) for key in keys)


@dataclass(frozen=True)
class LossPlot:
    """A log is the method's when a line carries ``marker`` ("": any of ``plot``'s terms); ``figure``: ``(trainer_log
    lines, smooth) -> Figure`` drawn instead."""

    plot: TrainingPlot | None = None
    marker: str = ""
    figure: Callable[[list[dict[str, Any]], Any], Any] | None = None


@dataclass(frozen=True)
class PanelDeclaration:
    """``parse``: raw keys -> dataclass (``ValueError`` naming the key); ``unused_host_keys``: Train-tab arguments
    dropped unless set in "Extra arguments"; ``dataset_from_panel``: LlamaBoard's Dataset box may stay empty."""

    name: str
    prefix: str
    package: str
    arguments: type
    parse: Callable[[dict[str, Any]], Any]
    fields: tuple[Field, ...]
    loss_plot: LossPlot
    unused_host_keys: tuple[str, ...] = ()
    dataset_from_panel: bool = False
    dataset_hint: str = ""
    checks: tuple[Check, ...] = ()

    def spec(self, key: str) -> dataclasses.Field:
        specs = {spec.name: spec for spec in dataclasses.fields(self.arguments)}
        if key not in specs:
            raise KeyError(f"{key} is not a field of {self.arguments.__name__}")
        return specs[key]


def widget_for(spec: dataclasses.Field) -> str:
    if spec.metadata.get("dataset"):
        return "dataset"
    if spec.metadata.get("choices"):
        return "dropdown"
    kind = spec.type if isinstance(spec.type, str) else getattr(spec.type, "__name__", "")
    return {"bool": "checkbox", "int": "int", "float": "number"}.get(kind, "textbox")


def default_of(spec: dataclasses.Field) -> Any:
    if spec.default is not dataclasses.MISSING:
        return spec.default
    if spec.default_factory is not dataclasses.MISSING:
        return spec.default_factory()
    return None


# added to an error about a key without a field
NO_FIELD = ' ({key} has no field in the {name} panel: set it in the "Extra arguments" box, e.g. {{"{key}": ...}}.)'
UNKNOWN_KEY = ' (from the "Extra arguments" box; the {name} panel has no such field.)'
