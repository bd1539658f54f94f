"""A recipe as LLaMA-Factory's ``read_args`` hands it over: a dict (YAML or JSON merged with ``key=value`` overrides) or
a list of command-line strings; its keys read alike from either. Imports nothing.
"""

from __future__ import annotations

from typing import Any

RawRecipe = dict[str, Any] | list[str]


def option(args: list[str], index: int) -> tuple[str, str, int]:
    """(name, value, next index) of the option at ``index``: ``--key value``, ``--key=value`` or a bare ``--flag``
    (``"true"``); name ``""`` for a non-option."""
    token = args[index]
    if not token.startswith("--"):
        return "", token, index + 1
    name, has_inline, inline = token[2:].partition("=")
    if has_inline:
        return name, inline, index + 1
    if index + 1 < len(args) and not args[index + 1].startswith("--"):
        return name, args[index + 1], index + 2
    return name, "true", index + 1


def given_keys(host_args: RawRecipe) -> dict[str, Any]:
    """Every key the recipe gives, with its value (``--a-b`` is ``a_b``, as LLaMA-Factory accepts it)."""
    if isinstance(host_args, dict):
        return dict(host_args)
    given: dict[str, Any] = {}
    index = 0
    while index < len(host_args):
        name, value, index = option(host_args, index)
        if name:
            given[name.replace("-", "_")] = value
    return given


def raw_value(host_args: RawRecipe, key: str) -> Any:
    """A key's value, None if absent (in a list the last one counts, as in transformers' parser)."""
    return host_args.get(key) if isinstance(host_args, dict) else given_keys(host_args).get(key)


def truthy(value: Any) -> bool:
    """A flag as a bool (``true``, ``t``, ``yes``, ``y``, ``1`` as transformers' ``string_to_bool``, and ``on``)."""
    return str(value).strip().lower() in {"true", "t", "yes", "y", "1", "on"} if not isinstance(value, bool) else value
