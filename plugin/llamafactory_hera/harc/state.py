"""HARC's run state: base and current directions, the coupled layers, and their history.

Every rank extracts on the same rows in step (ZeRO-3 gathers each layer's weights collectively, so all ranks must run
the same forwards); rank 0's result is then broadcast, so all ranks couple against bit-identical directions and layers.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llamafactory_hera.harc.config import HarcArguments
from llamafactory_hera.harc.directions import (
    Directions,
    ExtractionRows,
    Progress,
    blended,
    extract,
    validation_cosines,
)
from llamafactory_hera.harc.layers import layer_scores, select_layers
from llamafactory_hera.runtime.errors import RecipeError
from llamafactory_hera.training import sections

STATE_FILE = "harc_state.pt"


def _broadcast(value: Any) -> Any:
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return value
    box = [value]
    with sections.collective("HARC's broadcast of rank 0's directions"):
        torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


@dataclass
class HarcState:
    """Directions (CPU float32), coupled layers and ``history`` (an entry per extraction, ramp or refresh)."""

    args: HarcArguments
    rows: ExtractionRows
    validation: tuple[list[Any], list[Any]]  # held-out (harmful, harmless) prompt rows
    pad_id: int
    progress: Progress
    base: Directions | None = None
    current: Directions | None = None
    layers: list[int] = field(default_factory=list)
    count: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    refresh_seconds: float = 0.0
    refreshes: int = 0

    def _extract(self, model: nn.Module) -> Directions:
        args = self.args
        found = extract(
            model, self.rows, args.harc_response_tokens, args.harc_extract_batch_size, self.pad_id, self.progress
        )
        return Directions(**_broadcast({k: v.cpu() for k, v in found.tensors().items()}))

    def scores(self) -> torch.Tensor:
        d = self.current
        return layer_scores(d.v_ref, d.v_harm, d.v_ref_resp, d.v_harm_resp)

    def _select(self) -> None:
        self.layers = select_layers(self.scores(), self.count, self.args.harc_band)

    def record(self, model: nn.Module, step: int, event: str, seconds: float) -> None:
        cosines = validation_cosines(
            model,
            *self.validation,
            self.current,
            self.layers,
            self.args.harc_extract_batch_size,
            self.pad_id,
            self.progress,
        )
        self.history.append(
            {
                "step": step,
                "event": event,
                "layers": list(self.layers),
                "scores": [round(float(s), 6) for s in self.scores()],
                "seconds": round(seconds, 3),
                "validation": _broadcast(cosines),
            }
        )

    def as_record(self) -> dict[str, Any]:
        """What a checkpoint and ``harc_directions.pt`` hold: base and current directions, layers, history."""
        return {
            "base": self.base.tensors(),
            "current": self.current.tensors(),
            "layers": list(self.layers),
            "count": self.count,
            "history": self.history,
            "refreshes": self.refreshes,
            "refresh_seconds": self.refresh_seconds,
        }

    def save(self, folder: str) -> None:
        torch.save(self.as_record(), Path(folder) / STATE_FILE)

    def load(self, folder: str) -> None:
        path = Path(folder) / STATE_FILE
        if not path.is_file():
            raise RecipeError(
                f"resume_from_checkpoint: {folder} has no {STATE_FILE}; it was not written by "
                "stage: harc, so its base directions are unknown. Resume from a HARC checkpoint "
                "or start a new run."
            )
        record = torch.load(path, map_location="cpu", weights_only=False)
        self.base = Directions(**record["base"])
        self.current = Directions(**record["current"])
        self.layers = list(record["layers"])
        self.count = int(record["count"])
        self.history = list(record["history"])
        self.refreshes = int(record["refreshes"])
        self.refresh_seconds = float(record["refresh_seconds"])

    def start(self, model: nn.Module) -> None:
        """Base directions before training (a fresh adapter does not change the model)."""
        started = time.perf_counter()
        self.base = self.current = self._extract(model)
        ramped = self.args.harc_layers_ramp_step == 0  # the reference ramps before its first step then
        self.count = self.args.harc_layers_final if ramped else self.args.harc_layers
        self._select()
        self.record(model, 0, "base", time.perf_counter() - started)

    def on_step_end(self, model: nn.Module, step: int, max_steps: int, say: Callable[[str], None]) -> None:
        """Ramp and refresh due after optimizer step ``step``."""
        args = self.args
        ramp = step == args.harc_layers_ramp_step and self.count != args.harc_layers_final
        refresh = bool(args.harc_refresh_steps) and step % args.harc_refresh_steps == 0 and step < max_steps
        if not (ramp or refresh):
            return
        started = time.perf_counter()
        before = list(self.layers)
        if ramp:
            self.count = args.harc_layers_final
        if refresh:
            self.current = blended(self.base, self._extract(model), args.harc_refresh_beta)
        self._select()
        seconds = time.perf_counter() - started
        self.record(model, step, "refresh" if refresh else "ramp", seconds)
        if refresh:
            self.refresh_seconds += seconds
            self.refreshes += 1
        what = " and ".join(e for e, on in (("ramp", ramp), ("refresh", refresh)) if on)
        say(f"HARC step {step}: {what}; layers {before} -> {self.layers} ({seconds:.1f} s)")
