"""What HeRA saves beside the model (each checkpoint and the final model): the temperature, its optimizer, the feature
queue.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import torch

from llamafactory_hera import __version__
from llamafactory_hera.heads.geometry import head_names
from llamafactory_hera.runtime.errors import RecipeError

HERA_STATE_NAME = "hera_state.json"
TAU_OPTIMIZER_NAME = "hera_temperature_optimizer.pt"


def load_on_cpu(path: str) -> Any:
    """``torch.load`` onto the CPU (tensors are tagged with the GPU that wrote them)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def save_state(folder: str, hera_args: Any, log_tau: torch.Tensor) -> None:
    """Write ``hera_state.json`` into ``folder``: what resuming HeRA exactly needs."""
    value = float(log_tau.detach().cpu())
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, HERA_STATE_NAME), "w", encoding="utf-8") as handle:
        json.dump(
            {
                "version": __version__,
                "log_temperature": value,
                "temperature": math.exp(value),
                "heads": head_names(hera_args.hera_heads),
                "hera_args": hera_args.recipe_keys(),
            },
            handle,
            indent=2,
        )


def _queue_file(folder: str, process_index: int) -> str:
    return os.path.join(folder, f"hera_queue_rank{process_index}.pt")


def save_optimizer_state(
    folder: str, tau_optimizer: torch.optim.Optimizer | None, queue: Any, process_index: int, should_save: bool
) -> None:
    """Save the temperature's own optimizer (DeepSpeed, FSDP) and this rank's feature queue."""
    # another rank can get here before the main process made the folder
    os.makedirs(folder, exist_ok=True)
    if tau_optimizer is not None and should_save:
        torch.save(tau_optimizer.state_dict(), os.path.join(folder, TAU_OPTIMIZER_NAME))
    if queue.capacity:  # a file per rank (queues differ without hera_gather)
        torch.save(queue.state_dict(), _queue_file(folder, process_index))


def load_state(
    checkpoint: str,
    hera_args: Any,
    log_tau: torch.Tensor,
    tau_optimizer: torch.optim.Optimizer | None,
    queue: Any,
    process_index: int,
    device: torch.device,
) -> None:
    """Restore the saved state; refuse a checkpoint without ``hera_state.json`` or of other heads."""
    tau_file = os.path.join(checkpoint, TAU_OPTIMIZER_NAME)
    if tau_optimizer is not None and os.path.isfile(tau_file):
        # load_state_dict moves state tensors to the parameter's device (``step`` stays on the CPU)
        tau_optimizer.load_state_dict(load_on_cpu(tau_file))
    queue_file = _queue_file(checkpoint, process_index)
    if os.path.isfile(queue_file):
        queue.load_state_dict(load_on_cpu(queue_file), device)
    path = os.path.join(checkpoint, HERA_STATE_NAME)
    if not os.path.isfile(path):
        raise RecipeError(
            f"resume_from_checkpoint: {checkpoint} has no {HERA_STATE_NAME}; it was not "
            "written by a HeRA run. Resume from a HeRA checkpoint or start a fresh run."
        )
    with open(path, encoding="utf-8") as handle:
        state = json.load(handle)
    heads = head_names(hera_args.hera_heads)
    if state["heads"] != heads:
        raise RecipeError(
            f"hera_heads: the checkpoint {checkpoint} trained heads {state['heads']} but the recipe "
            f"says {heads}; resume with the same heads or start a fresh run."
        )
    with torch.no_grad():
        log_tau.fill_(state["log_temperature"])
