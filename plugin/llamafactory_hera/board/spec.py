"""What a method declares about its LlamaBoard panel; :mod:`.builder` makes the panel from it. Per field only where it
sits (row, scale) and what differs from the arguments dataclass (key, type, default and choices come from the field:
:func:`widget_for`); the texts are data (``panel_texts.yaml`` beside the declaration). Imports nothing heavy.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from llamafactory_hera.plots.training import TrainingPlot

LANGS = ("en", "ru", "zh", "ko", "ja")  # LlamaBoard's languages (top.lang); every locale entry has all of them
WIDGETS = ("textbox", "number", "int", "dropdown", "checkbox", "dataset")


# (parsed arguments, LlamaBoard's context: model_path, dataset_dir) -> "" or the problem, one line naming the key
Check = Callable[[Any, Mapping[str, Any]], str]


@dataclass(frozen=True)
class Field:
    """One input of a panel: a key of the method's arguments dataclass and where it sits in the accordion. ``widget``
    empty: from the dataclass field (:func:`widget_for`); ``default``: the box's first value (None: the dataclass
    default); ``normalize``: typed box value -> recipe value; ``only_with`` (key, value): sent only while that field
    has ``value``."""

    key: str
    row: int
    scale: int = 1
    widget: str = ""
    default: Any = None
    normalize: Callable[[Any], Any] | None = None
    only_with: tuple[str, Any] | None = None


def row(index: int, *keys: str, **options: Any) -> tuple[Field, ...]:
    """The fields of ``keys`` side by side in row ``index``, each with the same ``options``."""
    return tuple(Field(key, index, **options) for key in keys)


@dataclass(frozen=True)
class LossPlot:
    """How LlamaBoard's loss plot shows the method's runs (``trainer_log.jsonl`` lines as dicts): ``plot`` what the
    training plot draws of it (terms on a second axis, panels beside); a log is the method's when a line carries
    ``marker`` (empty: any of the plot's terms); ``figure``: ``(trainer_log, smooth) -> Figure`` drawn instead (no
    loss)."""

    plot: TrainingPlot | None = None
    marker: str = ""
    figure: Callable[[list[dict[str, Any]], Any], Any] | None = None


@dataclass(frozen=True)
class PanelDeclaration:
    """Everything method-specific about a LlamaBoard panel: ``name`` as users read it (accordion title "<name>
    configurations", error prefix "Invalid <name> setting: "); ``prefix`` of its recipe keys (the accordion is
    ``<prefix>tab``); ``package`` holding ``panel_texts.yaml``; ``parse``: raw keys -> dataclass (``ValueError``
    naming the key); ``unused_host_keys``: Train-tab arguments the method does not use, left out of the command
    unless set in "Extra arguments"; ``dataset_from_panel``: the rows come from the panel's dataset fields
    (LlamaBoard's Dataset box may stay empty); ``dataset_hint``: said for a dataset ``dataset_dir`` does not list;
    ``checks``: run on the parsed arguments with LlamaBoard's context for the preview or the run."""

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
        """The arguments dataclass field of ``key`` (KeyError naming the key and the dataclass when absent)."""
        specs = {spec.name: spec for spec in dataclasses.fields(self.arguments)}
        if key not in specs:
            raise KeyError(f"{key} is not a field of {self.arguments.__name__}")
        return specs[key]


def widget_for(spec: dataclasses.Field) -> str:
    """The box a dataclass field gets: a dataset name (``metadata["dataset"]``) -> dataset, ``choices`` -> dropdown,
    bool -> checkbox, int -> int, float -> number, anything else -> textbox."""
    if spec.metadata.get("dataset"):
        return "dataset"
    if spec.metadata.get("choices"):
        return "dropdown"
    kind = spec.type if isinstance(spec.type, str) else getattr(spec.type, "__name__", "")
    return {"bool": "checkbox", "int": "int", "float": "number"}.get(kind, "textbox")


def default_of(spec: dataclasses.Field) -> Any:
    """A dataclass field's default (its factory called)."""
    if spec.default is not dataclasses.MISSING:
        return spec.default
    if spec.default_factory is not dataclasses.MISSING:
        return spec.default_factory()
    return None


# What an error about a key without a field adds ({key} and {name} filled in).
NO_FIELD = ' ({key} has no field in the {name} panel: set it in the "Extra arguments" box, e.g. {{"{key}": ...}}.)'
UNKNOWN_KEY = ' (from the "Extra arguments" box; the {name} panel has no such field.)'
