"""The one recipe-key parser: a method's raw ``<prefix>_*`` keys (typed from YAML, strings from the command line)
into its arguments dataclass, errors naming the key, the value and what is allowed. Imports nothing heavy.
"""

from __future__ import annotations

import difflib
import math
import operator
from dataclasses import field, fields
from typing import TYPE_CHECKING, Any, TypeVar

from llamafactory_hera.runtime.errors import RecipeError

if TYPE_CHECKING:  # the type checker's name for "a dataclass"
    from _typeshed import DataclassInstance

T = TypeVar("T", bound="DataclassInstance")
NULLS = {"none", "null", ""}
# a key's bound (field metadata) -> (how an error states it, whether a value keeps it)
BOUNDS = {
    "min": (">=", operator.ge),
    "max": ("<=", operator.le),
    "min_exclusive": (">", operator.gt),
    "max_exclusive": ("<", operator.lt),
}


def recipe_key(default: Any, help_text: str, **checks: Any) -> Any:
    """A dataclass field for one recipe key; ``help_text`` feeds LlamaBoard, CLI help and the docs' key tables;
    ``checks`` (:data:`BOUNDS`' keys, ``choices``; ``dataset``: HARC's role keys) go into its metadata."""
    return field(default=default, metadata={"help": help_text, **checks})


def save_on_signal_key() -> Any:
    return recipe_key(
        "sigterm",
        "On this signal (SLURM's preemption or time limit: SIGTERM, or --signal=USR1@90) "
        "every rank saves a whole checkpoint at one step's end and the run exits 0, to resume by "
        "running the same command again; none: the signal's default (the run dies).",
        choices=("sigterm", "sigusr1", "sigusr2", "none"),
    )


def watchdog_key() -> Any:
    return recipe_key(
        None,
        "Seconds a rank may go unheard (its process or host frozen or gone) or without progress (stuck) "
        "before the job ends with a line naming it in every node's log (docs/multinode.md). null: per "
        "section, 4x the last one's time and at least 300 s; 900 s for the first step and save, 1800 s "
        "while loading and in the passes before step 1. 0: no watchdog.",
        min=0,
    )


def fail(key: str, value: Any, allowed: str) -> RecipeError:
    return RecipeError(f"{key}: got {value!r}; {allowed}")


def coerce_bool(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in {"true", "1", "yes", "on"}:
        return True
    if text in {"false", "0", "no", "off"}:
        return False
    raise fail(key, value, "expected true or false.")


def coerce_number(key: str, value: Any, kind: type, meta: dict[str, Any]) -> int | float:
    """An int or float within ``meta``'s bounds; 10.0 is 10."""
    expected = "expected a whole number." if kind is int else "expected a number."
    if isinstance(value, bool):
        raise fail(key, value, expected)
    try:
        if kind is float:
            number = float(value)
        elif isinstance(value, float) and value.is_integer():
            number = int(value)  # 10.0 from YAML or a web form
        else:
            number = value if isinstance(value, int) else int(str(value))
    except (TypeError, ValueError):
        raise fail(key, value, expected) from None
    if kind is float and not math.isfinite(number):
        raise fail(key, value, "expected a finite number.")
    for bound, allowed in BOUNDS.items():
        if bound in meta and not allowed[1](number, meta[bound]):
            raise fail(key, value, f"allowed range is {allowed[0]} {meta[bound]}.")
    return number


def unknown_key(key: str, valid: list[str], method: str) -> RecipeError:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return RecipeError(f"Unknown {method} key '{key}'.{hint} Valid keys: {', '.join(valid)}.")


def coerce_dataset(key: str, value: Any) -> str:
    """One dataset name of ``dataset_info.json`` (a one-item list too); null (``[null]``, ``null`` on the command
    line): none."""
    if isinstance(value, list | tuple) and len(value) == 1:
        value = value[0]
    if value is None or (isinstance(value, str) and value.strip().lower() in NULLS):
        return ""
    text = str(value).strip()
    if isinstance(value, list | tuple) or "," in text:
        raise fail(key, value, "name one dataset of dataset_info.json (a role takes one dataset).")
    return text


def coerce_field(key: str, value: Any, spec: Any) -> Any:
    """``value`` for field ``spec``, by its type and metadata."""
    meta = dict(spec.metadata)
    if meta.get("dataset"):
        return coerce_dataset(key, value)
    if value is None or (isinstance(value, str) and value.strip().lower() in NULLS):
        if spec.default is None or "None" in str(spec.type):
            return None
        if spec.type in ("str", str) and "choices" not in meta:
            raise fail(key, value, "a value is required.")
    if "choices" in meta:
        text = str(value).strip().lower()
        if text not in meta["choices"]:
            raise fail(key, value, f"allowed values are {', '.join(meta['choices'])}.")
        return text
    if spec.type in ("bool", bool):
        return coerce_bool(key, value)
    if spec.type in ("str", str):
        return str(value).strip()
    return coerce_number(key, value, int if spec.type in ("int", int, "int | None") else float, meta)


def parse_keys(cls: type[T], raw: dict[str, Any], method: str) -> T:
    """``cls`` from raw keys, each coerced by :func:`coerce_field`; an unknown key is refused. A key of a grammar of
    its own (HeRA's heads, RAH-LoRA's layers) is its method's to parse, kept out of ``raw``."""
    valid = {spec.name: spec for spec in fields(cls)}
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in valid:
            raise unknown_key(key, list(valid), method)
        values[key] = coerce_field(key, value, valid[key])
    return cls(**values)
