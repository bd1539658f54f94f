"""A method's declaration (:class:`Method`), made once per method in :mod:`llamafactory_hera.methods` (the registry
above the methods' packages); the patches read it by these field names only. It imports cheaply (no torch): its run
class is light (:mod:`.run`), its other parts are functions importing what they build when called.

Method keys: :mod:`llamafactory_hera.recipe.keys` (each ``config.py`` imports that, not this module, so a method's
arguments do not bring the checks its run runs).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from llamafactory_hera.recipe.run import MethodRun


@dataclass(frozen=True)
class Method:
    """One method, as LLaMA-Factory's recipes, web UI and logs see it.

    - ``run``: its :class:`~llamafactory_hera.recipe.run.MethodRun` (arguments and phases);
    - ``panel() -> MethodPanel``: its LlamaBoard panel (:class:`llamafactory_hera.board.builder.MethodPanel`, from its
      ``webui_panel`` module and ``panel_texts.yaml``);
    - ``add_cli_verbs(subparsers) -> dict[str, handler]``: its ``llamafactory-hera`` verbs; a handler takes the parsed
      namespace and raises ``ValueError`` / ``OSError`` subclasses for the user's mistakes;
    - ``plan(args: dict) -> str``: the run's memory, fit and time for LlamaBoard's arguments (the panel's plan button).
    """

    stage: str  # the recipe's ``stage:`` value
    label: str  # LlamaBoard's training-stage dropdown entry
    prefix: str  # the method's recipe keys start with this
    host_stage: str  # the LLaMA-Factory stage that parses the recipe and whose workflow the run extends
    run: type[MethodRun]
    log_keys: tuple[str, ...] = ()  # metrics merged into trainer_log.jsonl ("x/": every "x/..." key)
    panel: Callable[[], Any] | None = None
    add_cli_verbs: Callable[[Any], dict[str, Callable[[Any], None]]] | None = None
    plan: Callable[[dict[str, Any]], str] | None = None
    records: tuple[str, ...] = ()  # files in output_dir that say a run happened (marked if it fails)
    one_process: bool = False  # one process over every visible GPU: llamafactory-cli train starts one rank

    def owns(self, stage: Any) -> bool:
        """Whether a recipe's or the web UI's ``stage`` value selects this method."""
        return str(stage or "").strip().lower() == self.stage
