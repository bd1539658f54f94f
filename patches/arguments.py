"""Separates ``hera_*`` keys and ``stage: hera`` from the arguments LLaMA-Factory parses.

LLaMA-Factory 0.9.5 (``hparams.parser.read_args``) hands the trainer either a dict (YAML or JSON
recipe merged with ``key=value`` overrides) or a list of command-line strings
(``--key value`` / ``--key=value``). Both forms are handled.
"""

from __future__ import annotations

from typing import Any

from llamafactory_hera.hera.args import HERA_PREFIX

HERA_STAGE = "hera"
HOST_STAGE = "sft"


def split_dict(args: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any], bool]:
    """Return (host args with ``stage: hera`` mapped to sft, hera_* keys, whether the stage is hera)."""
    host = {k: v for k, v in args.items() if not str(k).startswith(HERA_PREFIX)}
    hera = {k: v for k, v in args.items() if str(k).startswith(HERA_PREFIX)}
    is_hera = str(host.get("stage", "")).strip().lower() == HERA_STAGE
    if is_hera:
        host["stage"] = HOST_STAGE
    return host, hera, is_hera


def split_list(args: list[str]) -> tuple[list[str], dict[str, Any], bool]:
    """The same for a ``--key value`` list; values stay strings (coerced later)."""
    host: list[str] = []
    hera: dict[str, Any] = {}
    is_hera = False
    index = 0
    while index < len(args):
        token = args[index]
        name, has_inline, inline = token[2:].partition("=") if token.startswith("--") else ("", False, "")
        if name.startswith(HERA_PREFIX) or name == "stage":
            if has_inline:
                value, index = inline, index + 1
            elif index + 1 < len(args) and not args[index + 1].startswith("--"):
                value, index = args[index + 1], index + 2
            else:
                value, index = "true", index + 1
            if name == "stage":
                is_hera = value.strip().lower() == HERA_STAGE
                host += ["--stage", HOST_STAGE if is_hera else value]
            else:
                hera[name] = value
            continue
        host.append(token)
        index += 1
    return host, hera, is_hera


def split_args(args: dict[str, Any] | list[str]) -> tuple[dict[str, Any] | list[str], dict[str, Any], bool]:
    """Dispatch on the argument form; see :func:`split_dict` and :func:`split_list`."""
    if isinstance(args, dict):
        return split_dict(args)
    return split_list(list(args))
