"""What a HeRA checkpoint holds besides the model: temperature, its optimizer, the feature queue.

Mixed into :class:`llamafactory_hera.hera.trainer.HeraTrainerMixin` (uses its ``hera_args``, ``hera_log_tau``,
``hera_queue`` and ``_hera_tau_handler``).
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import torch

from llamafactory_hera import __version__
from llamafactory_hera.short_errors import RecipeError

HERA_STATE_NAME = "hera_state.json"
TAU_OPTIMIZER_NAME = "hera_temperature_optimizer.pt"


def load_on_cpu(path: str) -> Any:
    """``torch.load`` of a HeRA checkpoint file onto the CPU; the caller moves what it restores to its device.

    The files are written by a process on a GPU, so their tensors are tagged with that GPU (``cuda:0`` for rank
    0's). Without ``map_location`` every rank would load them onto that GPU first, and a machine without it
    (another GPU layout, a CPU-only resume) fails with "Attempting to deserialize object on a CUDA device".
    """
    return torch.load(path, map_location="cpu", weights_only=True)


class HeraStateMixin:
    """Saves ``hera_state.json`` (and the temperature optimizer / queue) with every checkpoint, restores on resume."""

    hera_args: Any
    hera_log_tau: Any
    hera_queue: Any
    _hera_tau_handler: Any
    args: Any

    def hera_state(self) -> dict[str, Any]:
        """What a checkpoint needs to resume HeRA exactly (JSON-serialisable)."""
        log_tau = float(self.hera_log_tau.detach().cpu())
        return {"version": __version__, "log_temperature": log_tau, "temperature": math.exp(log_tau),
                "heads": list(self.hera_args.hera_heads), "hera_args": self.hera_args.to_dict()}

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        super().save_model(output_dir, _internal_call)
        if self.args.should_save:
            target = output_dir or self.args.output_dir
            os.makedirs(target, exist_ok=True)
            with open(os.path.join(target, HERA_STATE_NAME), "w", encoding="utf-8") as handle:
                json.dump(self.hera_state(), handle, indent=2)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        if self._hera_tau_handler.own_optimizer is not None and self.args.should_save:
            torch.save(self._hera_tau_handler.own_optimizer.state_dict(), os.path.join(output_dir, TAU_OPTIMIZER_NAME))
        if self.hera_queue.capacity:  # every rank its own file (queues differ per rank without hera_gather)
            name = f"hera_queue_rank{self.args.process_index}.pt"
            torch.save(self.hera_queue.state_dict(), os.path.join(output_dir, name))

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None:
            return
        tau_optimizer = os.path.join(checkpoint, TAU_OPTIMIZER_NAME)
        if self._hera_tau_handler.own_optimizer is not None and os.path.isfile(tau_optimizer):
            # load_state_dict moves each state tensor to its parameter's device (``step`` stays on the CPU)
            self._hera_tau_handler.own_optimizer.load_state_dict(load_on_cpu(tau_optimizer))
        queue_file = os.path.join(checkpoint, f"hera_queue_rank{self.args.process_index}.pt")
        if os.path.isfile(queue_file):
            self.hera_queue.load_state_dict(load_on_cpu(queue_file), self.args.device)
        path = os.path.join(checkpoint, HERA_STATE_NAME)
        if not os.path.isfile(path):
            raise RecipeError(f"resume_from_checkpoint: {checkpoint} has no {HERA_STATE_NAME}; it was not "
                              "written by a HeRA run. Resume from a HeRA checkpoint or start a fresh run.")
        with open(path, encoding="utf-8") as handle:
            state = json.load(handle)
        if state["heads"] != list(self.hera_args.hera_heads):
            raise RecipeError(f"hera_heads: the checkpoint {checkpoint} trained heads {state['heads']} but the recipe "
                              f"says {self.hera_args.hera_heads}; resume with the same heads or start a fresh run.")
        with torch.no_grad():
            self.hera_log_tau.fill_(state["log_temperature"])
