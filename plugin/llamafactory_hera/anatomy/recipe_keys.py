"""Coercing a method's recipe values (typed from YAML, strings from the command line) with errors that name the
key, the value and what is allowed; declaring such a key (:func:`recipe_key`). Shared by every method's arguments
module."""

from __future__ import annotations

import difflib
import math
from dataclasses import field
from typing import Any


def recipe_key(default: Any, help_text: str, **checks: Any) -> Any:
    """A method-arguments dataclass field for one recipe key: its ``default``, its ``help_text`` (LlamaBoard's
    descriptions, ``llamafactory-hera`` help, the docs' keys tables) and the ``checks`` its value gets: ``min``,
    ``max``, ``min_exclusive``, ``max_exclusive``, ``choices`` (read by :func:`coerce_field`), ``dataset`` (HARC's
    role keys), all kept in the field's metadata beside ``help``."""
    return field(default=default, metadata={"help": help_text, **checks})


def fail(key: str, value: Any, allowed: str) -> ValueError:
    """``ValueError`` naming ``key``, the ``value`` given and what is ``allowed``."""
    return ValueError(f"{key}: got {value!r}; {allowed}")


def coerce_bool(key: str, value: Any) -> bool:
    """``true`` / ``false`` (also 1/0, yes/no, on/off, as strings or booleans)."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in {"true", "1", "yes", "on"}:
        return True
    if text in {"false", "0", "no", "off"}:
        return False
    raise fail(key, value, "expected true or false.")


def coerce_number(key: str, value: Any, kind: type, meta: dict[str, Any]) -> int | float:
    """An int or float within ``meta``'s ``min`` / ``max`` / ``min_exclusive`` / ``max_exclusive``; 10.0 is 10."""
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
    if "min" in meta and number < meta["min"]:
        raise fail(key, value, f"allowed range is >= {meta['min']}.")
    if "max" in meta and number > meta["max"]:
        raise fail(key, value, f"allowed range is <= {meta['max']}.")
    if "min_exclusive" in meta and number <= meta["min_exclusive"]:
        raise fail(key, value, f"allowed range is > {meta['min_exclusive']}.")
    if "max_exclusive" in meta and number >= meta["max_exclusive"]:
        raise fail(key, value, f"allowed range is < {meta['max_exclusive']}.")
    return number


def unknown_key(key: str, valid: list[str], method: str) -> ValueError:
    """Error for a key that does not exist, naming the closest valid key."""
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return ValueError(f"Unknown {method} key '{key}'.{hint} Valid keys: {', '.join(valid)}.")


def truthy(value: Any) -> bool:
    """A recipe flag's value as a bool (``true``, ``1``, ``yes``, ``on``; booleans as they are)."""
    return str(value).strip().lower() in {"true", "1", "yes", "on"} if not isinstance(value, bool) else value


def coerce_field(key: str, value: Any, spec: Any) -> Any:
    """A value for a method-arguments dataclass field ``spec``: one of ``metadata["choices"]`` (lower-cased), a
    bool, or a number within the metadata's bounds, by the field's type (errors name key, value and what is
    allowed)."""
    meta = dict(spec.metadata)
    if "choices" in meta:
        text = str(value).strip().lower()
        if text not in meta["choices"]:
            raise fail(key, value, f"allowed values are {', '.join(meta['choices'])}.")
        return text
    if spec.type in ("bool", bool):
        return coerce_bool(key, value)
    return coerce_number(key, value, int if spec.type in ("int", int) else float, meta)
