"""``llamafactory-hera``, the plugin's command line: each method's verbs (its declaration's ``add_cli_verbs``),
``eval`` and ``plan`` for every stage, ``compose`` and ``data`` for the LLaVA-1.5 experiment.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from llamafactory_hera._bootstrap import register_methods
from llamafactory_hera.evaluation.cli import add_verbs as add_eval_verb
from llamafactory_hera.llava.cli import add_verbs as add_llava_verbs
from llamafactory_hera.methods import declared_methods
from llamafactory_hera.plan.cli import add_verbs as add_plan_verb


def _parser() -> tuple[argparse.ArgumentParser, dict[str, Callable[[argparse.Namespace], None]]]:
    parser = argparse.ArgumentParser(
        prog="llamafactory-hera",
        description="HeRA, RAH-LoRA and HARC for LLaMA-Factory: the methods' commands (HeRA's select, HARC's "
        "harc-data), eval of a run against its baseline, compose of a LLaVA-1.5-style model from an LLM and an image "
        "encoder, data (check a recipe's datasets before a long run) and plan (a run's memory, time and cost before "
        "renting).",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    handlers: dict[str, Callable[[argparse.Namespace], None]] = {}
    for method in declared_methods():
        if method.add_cli_verbs:
            handlers.update(method.add_cli_verbs(commands))
    handlers.update(add_eval_verb(commands))
    handlers.update(add_llava_verbs(commands))
    handlers.update(add_plan_verb(commands))
    return parser, handlers


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``llamafactory-hera`` console script."""
    register_methods()  # its patches read recipes by the methods' stages and keys, even with the hook off
    parser, handlers = _parser()
    args = parser.parse_args(argv)
    try:
        handlers[args.command](args)
    except (ValueError, FileNotFoundError, FileExistsError, PermissionError) as err:
        print(f"llamafactory-hera: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
