"""LLaMA-Factory's parsed arguments as the stage patch hands them to a method's run. Imports nothing."""

from __future__ import annotations

from typing import Any, NamedTuple


class HostArguments(NamedTuple):
    """LLaMA-Factory's parsed arguments, in ``get_train_args``' order."""

    model: Any
    data: Any
    training: Any
    finetuning: Any
    generating: Any
