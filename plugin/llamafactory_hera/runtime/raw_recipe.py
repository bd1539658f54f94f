"""A recipe as LLaMA-Factory's ``read_args`` hands it to the trainer: a dict (a YAML or JSON recipe merged with its
``key=value`` overrides) or a list of command-line strings (``--key value``, ``--key=value``, a bare ``--flag``), and
its keys' values read alike from either form. Imports nothing.
"""

from __future__ import annotations

from typing import Any

RawRecipe = dict[str, Any] | list[str]


def option(args: list[str], index: int) -> tuple[str, str, int]:
    """(name, value, index after it) of the option at ``index``: ``--key value``, ``--key=value`` or a bare ``--flag``
    (value ``"true"``); name ``""`` for a token that is no option."""
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
    """Every key a recipe dict or a ``--key value`` list gives, with its value (a list's in its order; ``--a-b`` is
    ``a_b``, as LLaMA-Factory's parser also accepts it)."""
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
    """A key's value in a recipe dict or a ``--key value`` / ``--key=value`` / bare ``--flag`` list (None if absent;
    in a list ``--a-b`` is ``a_b`` and the last occurrence counts, as transformers' parser reads them)."""
    return host_args.get(key) if isinstance(host_args, dict) else given_keys(host_args).get(key)


def truthy(value: Any) -> bool:
    """A recipe flag's value as a bool (``true``, ``t``, ``yes``, ``y``, ``1``, as transformers' ``string_to_bool``
    reads them, and ``on``; booleans as they are)."""
    return str(value).strip().lower() in {"true", "t", "yes", "y", "1", "on"} if not isinstance(value, bool) else value
