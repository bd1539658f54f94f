"""HARC's learning-rate warm-up as the reference's: optimizer step ``k`` (1-based) of ``W`` warm-up steps runs at
``k / W`` of the rate.

The reference (``main/train.py``, ``lr_at``) sets ``lr * (step + 1) / warmup`` before each optimizer step (``step`` in
micro-steps), so its first update already moves the adapter (at ``lr / 50`` with 100 warm-up micro-steps at
accumulation 2). The HF schedule ``constant_with_warmup`` runs optimizer step ``k`` at ``(k - 1) / W``: its first
update is at rate 0 (with LoRA: the B factors stay 0). Used for ``lr_scheduler_type: constant_with_warmup`` only;
the other schedules are LLaMA-Factory's.
"""

from __future__ import annotations

from typing import Any

import torch


def reference_warmup(optimizer: torch.optim.Optimizer, warmup_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Factor ``min(1, (s + 1) / warmup_steps)`` before optimizer step ``s + 1`` (1 from the start when 0)."""

    def factor(step: int) -> float:
        return min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def uses_reference_warmup(args: Any) -> bool:
    """Whether the run's schedule is the reference's kind (constant after a linear warm-up)."""
    from transformers import SchedulerType

    return SchedulerType(args.lr_scheduler_type) == SchedulerType.CONSTANT_WITH_WARMUP
