"""A method's declaration (:class:`Method`), made once per method in :mod:`llamafactory_hera.methods`; the patches read
only these fields. It imports no torch: the run class is light, the other parts import what they build when called.
A method's ``config.py`` imports :mod:`.keys`, not this module, so its arguments do not bring its run's checks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from llamafactory_hera.recipe.run import MethodRun


@dataclass(frozen=True)
class Method:
    """One method, as LLaMA-Factory's recipes, web UI and logs see it.

    - ``panel() -> MethodPanel``: its LlamaBoard panel (from its ``webui_panel`` module and ``panel_texts.yaml``);
    - ``add_cli_verbs(subparsers) -> dict[str, handler]``: its ``llamafactory-hera`` verbs; a handler raises
      ``ValueError`` / ``OSError`` subclasses for the user's mistakes;
    - ``plan(args: dict) -> str``: the run's memory, fit and time (the panel's plan button).
    """

    stage: str  # the recipe's ``stage:`` value
    label: str  # LlamaBoard's training-stage dropdown entry
    prefix: str  # the method's recipe keys start with this
    host_stage: str  # the LLaMA-Factory stage that parses the recipe; the run extends its workflow
    run: type[MethodRun]
    log_keys: tuple[str, ...] = ()  # metrics merged into trainer_log.jsonl ("x/": every "x/..." key)
    panel: Callable[[], Any] | None = None
    add_cli_verbs: Callable[[Any], dict[str, Callable[[Any], None]]] | None = None
    plan: Callable[[dict[str, Any]], str] | None = None
    records: tuple[str, ...] = ()  # files in output_dir that say a run happened (marked if it fails)
    one_process: bool = False  # one process over every visible GPU: llamafactory-cli train starts one rank

    def owns(self, stage: Any) -> bool:
        """Whether a ``stage`` value selects this method."""
        return str(stage or "").strip().lower() == self.stage
