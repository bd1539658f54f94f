"""Adds every registered method to LlamaBoard's training-stage dropdown (``extras.constants.TRAINING_STAGES``).

Checked on LLaMA-Factory 0.9.5: the web UI imports this dict by reference, so updating it in place before the UI is
built adds the stage everywhere. Panels and loss plot: :mod:`.board`.
"""

from __future__ import annotations

from types import ModuleType

from llamafactory_hera.runtime.registry import registered_methods

from ..guard import require


def apply(constants: ModuleType) -> None:
    """Patch ``llamafactory.extras.constants`` in place."""
    require(constants, ("TRAINING_STAGES",), "webui")
    if not isinstance(constants.TRAINING_STAGES, dict):
        require(constants, ("TRAINING_STAGES_AS_DICT",), "webui")  # raises: unknown shape
    for method in registered_methods():
        constants.TRAINING_STAGES.setdefault(method.label, method.stage)
