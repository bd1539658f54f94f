"""The learnable InfoNCE temperature: its range, its gradient across ranks and its own optimizer under DeepSpeed.

The temperature lives outside the model as ``log tau`` (float32, one element). Where it is used it is
clamped to ``[TAU_MIN, TAU_MAX]`` (CLIP caps ``1/tau`` at 100, i.e. ``tau >= 0.01``), and after every
optimizer step the parameter itself is put back into that range, so a step that overshoots cannot leave
it where the clamp has no gradient.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback

TAU_MIN = 0.01  # CLIP's cap: 1 / tau <= 100
TAU_MAX = 100.0  # symmetric in log space; wide enough for raw dot products (hera_similarity: dot)
LOG_TAU_MIN, LOG_TAU_MAX = math.log(TAU_MIN), math.log(TAU_MAX)


def used_temperature(log_tau: torch.Tensor) -> torch.Tensor:
    """``exp(log_tau)`` clamped to ``[TAU_MIN, TAU_MAX]`` (0-d, differentiable inside the range)."""
    return log_tau.exp().clamp(TAU_MIN, TAU_MAX)


class TemperatureGradHandler(TrainerCallback):
    """Owns the gradient (and, under DeepSpeed, the update) of the temperature, which lives outside the model.

    - Before each optimizer step it averages the gradient over data-parallel ranks (DDP does not
      see the parameter). Every rank takes part, with a zero gradient when its micro-batches had
      no HeRA term, so the collective always matches.
    - Under DeepSpeed, whose ZeRO optimizer accepts only the model's own parameters, the temperature
      has its own AdamW (``own_optimizer``), stepped here with the main schedule's learning-rate
      factor (current lr of the main optimizer / ``learning_rate``).
    - After each step it clamps ``log tau`` into range and clears the gradient: the Trainer zeroes
      gradients with ``model.zero_grad()``, which does not reach this parameter.
    """

    def __init__(self, log_tau: nn.Parameter, base_lr: float) -> None:
        self.log_tau = log_tau
        self.base_lr = base_lr
        self.own_optimizer: torch.optim.Optimizer | None = None

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            if self.log_tau.grad is None:
                self.log_tau.grad = torch.zeros_like(self.log_tau)
            torch.distributed.all_reduce(self.log_tau.grad)
            self.log_tau.grad /= torch.distributed.get_world_size()
        if self.own_optimizer is not None and self.log_tau.grad is not None:
            main = kwargs.get("optimizer")
            factor = main.param_groups[0]["lr"] / args.learning_rate if main is not None and args.learning_rate else 1
            for group in self.own_optimizer.param_groups:
                group["lr"] = self.base_lr * factor
            self.own_optimizer.step()

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        with torch.no_grad():
            self.log_tau.clamp_(LOG_TAU_MIN, LOG_TAU_MAX)
        self.log_tau.grad = None
