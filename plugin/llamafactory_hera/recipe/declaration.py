"""A method's declaration, made once per method in :mod:`llamafactory_hera.methods`; the patches read only these fields.
It imports no torch: its parts are named as ``"module:attribute"`` strings, each imported when first used.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from llamafactory_hera.recipe.run import MethodRun, declared


def _called(path: str, *args: Any) -> Any:
    return declared(path)(*args)


def declared_value(path: str) -> Callable[[], Any]:
    """``"module:attribute"``'s value, imported when called."""
    return functools.partial(declared, path)


def declared_function(path: str) -> Callable[..., Any]:
    """``"module:function"``, imported when called."""
    return functools.partial(_called, path)


@dataclass(frozen=True)
class Method:
    """One method, as LLaMA-Factory's recipes, web UI and logs see it.

    - its run's phases, ``"module:function"`` each, in the order
      :class:`~llamafactory_hera.recipe.run.MethodRun` runs them: ``check_raw(host_args, args)``,
      ``check_parsed(model, data, training, finetuning, generating, args)``, ``prepare(args, parsed) -> prepared``,
      ``train(args, host, parsed, callbacks, prepared) -> trained``, ``finish(args, host, parsed, prepared,
      trained)`` (``prepare``, ``finish``: optional);
    - ``panel() -> MethodPanel``: its LlamaBoard panel (from its ``webui_panel`` module and ``panel_texts.yaml``);
    - ``add_cli_verbs(subparsers) -> dict[str, handler]``: its ``llamafactory-hera`` verbs; a handler raises
      ``ValueError`` / ``OSError`` subclasses for the user's mistakes;
    - ``plan(args: dict) -> str``: the run's memory, fit and time (the panel's plan button).
    """

    stage: str  # the recipe's ``stage:`` value
    label: str  # LlamaBoard's training-stage dropdown entry
    prefix: str  # the method's recipe keys start with this
    host_stage: str  # the LLaMA-Factory stage that parses the recipe; the run extends its workflow
    arguments: type  # the dataclass of its recipe keys
    parse: Callable[[dict[str, Any]], Any]  # the arguments from the prefixed keys (values may be strings)
    check_raw: str
    check_parsed: str
    train: str
    prepare: str | None = None
    finish: str | None = None
    save_signal_key: str | None = None  # its key of the save signal (None: it saves no checkpoint)
    watchdog_key: str | None = None  # its key of the watchdog's timeout (None: one process, not watched)
    log_keys: tuple[str, ...] = ()  # metrics merged into trainer_log.jsonl ("x/": every "x/..." key)
    panel: Callable[[], Any] | None = None
    add_cli_verbs: Callable[[Any], dict[str, Callable[[Any], None]]] | None = None
    plan: Callable[[dict[str, Any]], str] | None = None
    records: tuple[str, ...] = ()  # files in output_dir that say a run happened (marked if it fails)
    one_process: bool = False  # one process over every visible GPU: llamafactory-cli train starts one rank

    def owns(self, stage: Any) -> bool:
        """Whether a ``stage`` value selects this method."""
        return str(stage or "").strip().lower() == self.stage

    def run_of(self, keys: dict[str, Any]) -> MethodRun:
        """A run of the method with the recipe's prefixed ``keys`` (an error names the key)."""
        return MethodRun(self, self.parse(keys))
