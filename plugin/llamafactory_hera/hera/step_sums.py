"""The HeRA step's per-log sums (:class:`StepSums`), read when the Trainer logs.

A step must not wait on the GPU (``.item()``, ``bool(tensor)``, masks, ``.cpu()`` do): micro-batches keep device
values, summed every :data:`FOLD_AT` micro-batches and read at the next logging step, which syncs anyway.
"""

from __future__ import annotations

import torch

from llamafactory_hera.hera.loss import used_temperature
from llamafactory_hera.runtime.log import line
from llamafactory_hera.training import sections

__all__ = ["DEVICE_STATS", "FOLD_AT", "HOST_STATS", "NONFINITE_WARNING", "StepSums"]

# Summed on the device (float64): LM loss, finite HeRA losses, finite terms, skipped (non-finite) terms,
# lambda * term / accumulation steps.
DEVICE_STATS = ("lm", "hera", "hera_micro", "skipped", "weighted")
# On the host: image samples, text-only samples, micro-batches, those known to have no term, those computing one.
HOST_STATS = ("images", "text_only", "micro", "host_no_term", "attempts")
FOLD_AT = 64  # micro-batches kept before summing on the device (no sync)
NONFINITE_WARNING = line(
    "warning: non-finite HeRA loss; the term is skipped for such micro-batches "
    "(counted as hera_nonfinite_skipped in the logs). Check hera_temperature / bf16 overflow."
)


def _scaled_sum(values: list[torch.Tensor], multipliers: list[float], divisors: list[float]) -> torch.Tensor:
    """0-d float64 ``sum_i values[i] * multipliers[i] / divisors[i]``: one stacked sum per distinct (multiplier,
    divisor), skipping factors of 1, so the op count does not grow with the values."""
    total = None
    pairs = list(zip(multipliers, divisors, strict=True))
    for multiplier, divisor in dict.fromkeys(pairs):
        part = torch.stack([v for v, pair in zip(values, pairs, strict=True) if pair == (multiplier, divisor)]).double()
        if multiplier != 1:
            part = part * multiplier
        if divisor != 1:
            part = part / divisor
        total = part.sum() if total is None else total + part.sum()
    return total


class StepSums:
    """Per-log sums, the first-missing-term warning, and this rank's counts for the end line
    (``workflow.RunSummary``)."""

    def __init__(self, device: torch.device) -> None:
        self.device_sums = torch.zeros(len(DEVICE_STATS), dtype=torch.float64, device=device)
        self.host_sums = [0.0] * len(HOST_STATS)
        self._lm: list[torch.Tensor] = []  # each LM loss, detached, and its divisor
        self._lm_divisors: list[float] = []
        self._terms: list[torch.Tensor] = []  # each term (0 if not finite), its flag and weight in `loss`
        self._finite: list[torch.Tensor] = []
        self._weights: list[tuple[float, float]] = []  # (lambda, accumulation steps)
        self.last_logged_step: int | None = None  # set at the first training step (resume-aware)
        self.micro_batches = 0
        self.with_term = 0
        self.nonfinite = 0  # micro-batches with a skipped non-finite term (read at logging steps)
        self.warned_missing = False
        self.warned_nonfinite = False

    def note_missing_term(self, image_samples: int, text_only: int, batch: int, step: int) -> None:
        """Warn once about a micro-batch without a HeRA term."""
        if self.warned_missing:
            return
        self.warned_missing = True
        print(
            line(
                f"warning: a micro-batch at step {step + 1} had no HeRA term ({image_samples} usable "
                f"image samples, {text_only} text-only, of {batch}): it trains the LM loss only. Such "
                "micro-batches are counted as hera_batches_without_term in the logs and at the end of the run."
            ),
            flush=True,
        )

    def add(
        self,
        lm_loss: torch.Tensor,
        lm_divisor: float,
        term: torch.Tensor | None,
        finite: torch.Tensor | None,
        weight: tuple[float, float],
        host_part: list[float],
    ) -> None:
        """Add one micro-batch: 0-d ``lm_loss`` (logged over ``lm_divisor``), 0-d ``term`` and ``finite`` (None: no
        term), ``weight`` = (lambda, steps), ``host_part`` (:data:`HOST_STATS`). No sync, two ops."""
        self._lm.append(lm_loss.detach())
        self._lm_divisors.append(lm_divisor)
        if term is not None and finite is not None:
            self._terms.append(term.detach())
            self._finite.append(finite)
            self._weights.append(weight)
        self.host_sums = [a + b for a, b in zip(self.host_sums, host_part, strict=True)]
        self.micro_batches += 1
        if len(self._lm) >= FOLD_AT:
            self._fold()

    def _fold(self) -> None:
        """Sum the kept values into :attr:`device_sums` (no sync)."""
        if not self._lm:
            return
        with torch.no_grad():
            zero = self.device_sums.new_zeros(())
            lm = _scaled_sum(self._lm, [1.0] * len(self._lm), self._lm_divisors)
            if self._terms:
                terms = torch.stack(self._terms).double()
                finite = torch.stack(self._finite).double()
                hera = terms.sum()
                micro = finite.sum()
                weighted = _scaled_sum(self._terms, [w[0] for w in self._weights], [w[1] for w in self._weights])
                skipped = len(self._terms) - micro
            else:
                hera = micro = weighted = skipped = zero
            self.device_sums += torch.stack([lm.to(zero.device), hera, micro, skipped, weighted])
        self._lm = []
        self._lm_divisors = []
        self._terms = []
        self._finite = []
        self._weights = []

    def read(self, log_tau: torch.Tensor, reduce: bool) -> tuple[dict[str, float], int]:
        """The sums since the last read (all ranks' when ``reduce``) and the world size; resets them. One sync.
        Also updates this rank's end-of-run counts and warns at the first non-finite term."""
        self._fold()
        device = self.device_sums.device
        temperature = used_temperature(log_tau.detach()).double().reshape(1).to(device)
        local = torch.cat([self.device_sums, torch.tensor(self.host_sums, dtype=torch.float64).to(device), temperature])
        stats = local.clone()
        world = 1
        if reduce and torch.distributed.is_available() and torch.distributed.is_initialized():
            with sections.collective("HeRA's all-reduce of the logged sums"):
                torch.distributed.all_reduce(stats)
            world = torch.distributed.get_world_size()
        names = (*DEVICE_STATS, *HOST_STATS, "temperature")
        both = torch.stack([local, stats]).tolist()  # the logging step's one device-to-host copy
        mine = dict(zip(names, both[0], strict=True))
        values = dict(zip(names, both[1], strict=True))
        self.with_term += int(mine["attempts"] - mine["skipped"])
        self.nonfinite += int(mine["skipped"])
        if values["skipped"] and not self.warned_nonfinite:  # silence would be the worst failure
            self.warned_nonfinite = True
            print(NONFINITE_WARNING, flush=True)
        self.device_sums.zero_()
        self.host_sums = [0.0] * len(HOST_STATS)
        return values, world

    def log_values(
        self, logs: dict[str, float], log_tau: torch.Tensor, queue_size: int | None, global_step: int
    ) -> None:
        """Add HeRA's keys to a training log (called on every rank: the reduction is safe)."""
        values, world = self.read(log_tau, reduce=True)
        optimizer_steps = max(global_step - (self.last_logged_step or 0), 1)
        if values["micro"] > 0:
            # Same normalisation as the Trainer's logged `loss`: loss == lm_loss + hera_weighted_loss.
            logs["lm_loss"] = values["lm"] / world / optimizer_steps
            logs["hera_weighted_loss"] = values["weighted"] / world / optimizer_steps
            logs["hera_image_samples"] = values["images"] / values["micro"]
            logs["hera_text_only_samples"] = values["text_only"] / values["micro"]
            no_term = values["host_no_term"] + values["skipped"]
            if no_term:
                logs["hera_batches_without_term"] = no_term
            if values["skipped"]:
                logs["hera_nonfinite_skipped"] = values["skipped"]
        if values["hera_micro"] > 0:
            logs["hera_loss"] = values["hera"] / values["hera_micro"]
        logs["hera_temperature"] = values["temperature"] / world  # mean over ranks (equal when in sync)
        if queue_size is not None:
            logs["hera_queue_size"] = queue_size
        self.last_logged_step = global_step
