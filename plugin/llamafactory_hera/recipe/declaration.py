"""A method's declaration: how LLaMA-Factory's recipes, web UI and logs see a method (:class:`Method`).

Every method is declared once, in :mod:`llamafactory_hera.methods`, the registry above the methods' packages; the
patches read a declaration by these field names only. A declaration imports cheaply (no torch): its run class is light
(:mod:`.run`), and its other parts are functions that import what they build when called.

How a method's keys are declared and read is :mod:`llamafactory_hera.recipe.keys` (every method's ``config.py``
imports that, not this module: a method's arguments do not bring the checks its run runs).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from llamafactory_hera.recipe.run import MethodRun


@dataclass(frozen=True)
class Method:
    """One method, as LLaMA-Factory's recipes, web UI and logs see it.

    - ``run``: its run class (:class:`~llamafactory_hera.recipe.run.MethodRun`): its arguments and its phases;
    - ``panel() -> MethodPanel``: its LlamaBoard panel (:class:`llamafactory_hera.board.builder.MethodPanel`, built from
      the declaration in its ``webui_panel`` module and the texts of its ``panel_texts.yaml``);
    - ``add_cli_verbs(subparsers) -> dict[str, handler]``: its ``llamafactory-hera`` verbs; a handler takes the parsed
      namespace and raises ``ValueError`` / ``OSError`` subclasses for the user's mistakes;
    - ``plan(args: dict) -> str``: the run's memory, fit and time for LlamaBoard's run arguments (its panel's plan
      button shows it).
    """

    stage: str  # the recipe's ``stage:`` value
    label: str  # LlamaBoard's training-stage dropdown entry
    prefix: str  # the method's recipe keys start with this
    host_stage: str  # the LLaMA-Factory stage that parses the recipe and whose workflow the run extends
    run: type[MethodRun]
    log_keys: tuple[str, ...] = ()  # metrics the method logs, merged into trainer_log.jsonl ("x/": every "x/..." key)
    panel: Callable[[], Any] | None = None
    add_cli_verbs: Callable[[Any], dict[str, Callable[[Any], None]]] | None = None
    plan: Callable[[dict[str, Any]], str] | None = None
    records: tuple[str, ...] = ()  # files the run writes into output_dir that say a run happened (marked if it fails)
    one_process: bool = False  # runs as one process over every visible GPU: llamafactory-cli train starts one rank

    def owns(self, stage: Any) -> bool:
        """Whether a recipe's or the web UI's ``stage`` value selects this method."""
        return str(stage or "").strip().lower() == self.stage
