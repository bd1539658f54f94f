"""Separates a method's keys and ``stage: <method>`` from the arguments the host parses.

LLaMA-Factory 0.9.5's ``read_args`` gives a dict (recipe merged with ``key=value`` overrides) or a list of
``--key value`` / ``--key=value`` strings; both are handled. Stages and key prefixes come from the registered methods.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from llamafactory_hera.runtime.errors import RecipeError
from llamafactory_hera.runtime.raw_recipe import option, raw_value, truthy
from llamafactory_hera.runtime.registry import method_for_stage, method_of_key

from .host_arguments import host_keys

Method = Any  # a registered method (:mod:`llamafactory_hera.runtime.registry`)


def split_dict(args: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any], Method | None]:
    """(host args with a method's stage mapped to its host stage, every method's keys, the selected method or None).
    A host or method flag given a string saying no (``bf16: "false"``) is refused: ``HfArgumentParser.parse_dict``
    passes it on as is, so the Trainer reads it true where :func:`truthy` and the plugin's checks read false."""
    method = method_for_stage(args.get("stage"))
    flags = {spec.name for spec in method_fields(method) if spec.type in ("bool", bool)} if method else set()
    for key, value in args.items():
        if (
            isinstance(value, str)
            and value.strip()
            and not truthy(value)
            and (key in flags or getattr(host_keys().get(key), "flag", 0))
        ):
            raise RecipeError(
                f"{key}: {value!r} is a string, not a boolean (a recipe's flags are unquoted: "
                f"LLaMA-Factory reads any non-empty string as true); write {key}: false without quotes "
                f"(or {key}: true)."
            )
    host = {k: v for k, v in args.items() if method_of_key(k) is None}
    own = {k: v for k, v in args.items() if method_of_key(k) is not None}
    if method is not None:
        host["stage"] = method.host_stage
    return host, own, method


def method_fields(method: Method) -> tuple[dataclasses.Field, ...]:
    """``method``'s recipe keys: the fields of its run's arguments dataclass."""
    return dataclasses.fields(method.arguments)


def split_list(args: list[str]) -> tuple[list[str], dict[str, Any], Method | None]:
    """:func:`split_dict` for a ``--key value`` list; values stay strings (coerced later)."""
    host: list[str] = []
    own: dict[str, Any] = {}
    method = None
    index = 0
    while index < len(args):
        name, value, after = option(args, index)
        if name == "stage":
            method = method_for_stage(value)
            host += ["--stage", method.host_stage if method is not None else value]
        elif name and method_of_key(name) is not None:
            own[name] = value
        else:
            host += args[index:after]
        index = after
    return host, own, method


def split_args(args: dict[str, Any] | list[str]) -> tuple[dict[str, Any] | list[str], dict[str, Any], Method | None]:
    """:func:`split_dict` or :func:`split_list`, by form."""
    if isinstance(args, dict):
        return split_dict(args)
    return split_list(list(args))


def keys_of(method: Method, keys: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """(keys with ``method``'s prefix, the others sorted: ignored in this run)."""
    mine = {k: v for k, v in keys.items() if str(k).startswith(method.prefix)}
    return mine, sorted(k for k in keys if k not in mine)


def compile_setting(args: dict[str, Any] | list[str]) -> str | None:
    """``key: value`` of the key turning ``torch.compile`` on, or None."""
    if truthy(raw_value(args, "torch_compile")):
        return "torch_compile: true"
    return next(
        (
            f"{key}: {raw_value(args, key)}"
            for key in ("torch_compile_backend", "torch_compile_mode")
            if raw_value(args, key) not in (None, "")
        ),
        None,
    )
