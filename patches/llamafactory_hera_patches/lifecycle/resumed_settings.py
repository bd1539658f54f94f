"""The training settings a checkpoint was saved with (its marker holds them: :mod:`.whole_checkpoints`) against those
of the run that resumes from it, named in one line: the Trainer restores the optimizer's and the scheduler's state as
saved, so an edited learning rate is not used, and an edited batch size moves the data on from the checkpoint's step
in batches of the new size, with no word of either. Imports nothing heavy.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Any

SETTINGS = "settings"  # the marker's key
# restored from the checkpoint with the optimizer's parameter groups: the recipe's value is not used
KEPT = ("learning_rate", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon")
# this recipe's from the resumed step on
APPLIED = (
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "ranks",
    "max_steps",
    "num_train_epochs",
    "lr_scheduler_type",
    "warmup_steps",
    "warmup_ratio",
    "max_grad_norm",
    "optim",
    "seed",
)


def _plain(value: Any) -> Any:
    value = value.value if isinstance(value, Enum) else value
    return value if isinstance(value, str | int | float | bool | type(None)) else str(value)


def settings(args: Any) -> dict[str, Any]:
    """The settings of :data:`KEPT` and :data:`APPLIED` of a Trainer's ``args`` (``ranks``: its world size)."""
    found = {key: _plain(getattr(args, key)) for key in (*KEPT, *APPLIED) if hasattr(args, key)}
    found["ranks"] = _plain(getattr(args, "world_size", 1))
    return found


def differences(folder: Path, saved: dict[str, Any], now: dict[str, Any], step: int) -> str | None:
    """The line naming what differs between ``saved`` (the checkpoint ``folder``'s) and ``now``, else None (also for a
    checkpoint that holds no settings)."""
    changed = [key for key in (*KEPT, *APPLIED) if key in saved and key in now and saved[key] != now[key]]
    if not changed:
        return None
    kept = [key for key in changed if key in KEPT]
    applied = [key for key in changed if key in APPLIED]
    parts = [f"Kept from the checkpoint's optimizer state: {', '.join(kept)}."] if kept else []
    parts += [f"This recipe's from step {step} on: {', '.join(applied)}."] if applied else []
    return (
        f"resume: {folder} was saved with other settings than this recipe's: "
        + "; ".join(f"{key} {saved[key]} there, {now[key]} here" for key in changed)
        + f". {' '.join(parts)} To go on as the run began, set them back."
    )
