"""HeRA's per-log sums: what the steps add up, kept where it is known, read only at a logging step.

A training step must not wait on the GPU (every ``.item()``, ``bool(tensor)``, boolean mask or ``.cpu()``
does). So the sums that come from the device (the losses, whether the HeRA loss was finite) stay on the device,
and the counts the collator already knew (image samples, text-only samples, micro-batches without a term) stay
on the host; both are read together when the Trainer logs, which syncs anyway. The checks are made there: a
non-finite HeRA loss warns at the first log after it (and is logged as ``hera_nonfinite_skipped``).

Mixed into :class:`llamafactory_hera.hera.trainer.HeraTrainerMixin` (uses ``hera_log_tau``, ``hera_queue``,
``hera_summary``, ``state`` and ``args``).
"""

from __future__ import annotations

from typing import Any

import torch

from llamafactory_hera.hera.temperature import used_temperature

# On the device (float64): LM loss, HeRA loss (finite ones), finite HeRA terms, non-finite (skipped) HeRA terms,
# lambda * term / accumulation steps.
DEVICE_STATS = ("lm", "hera", "hera_micro", "skipped", "weighted")
# On the host: image samples used, text-only samples, micro-batches, micro-batches the host knew had no term,
# micro-batches that computed a term.
HOST_STATS = ("images", "text_only", "micro", "host_no_term", "attempts")
NONFINITE_WARNING = ("[llamafactory-hera] warning: non-finite HeRA loss; the term is skipped for such micro-batches "
                     "(counted as hera_nonfinite_skipped in the logs). Check hera_temperature / bf16 overflow.")


class HeraStatsMixin:
    """Per-log sums of the HeRA step (device and host parts) and their reading at a logging step."""

    hera_log_tau: Any
    hera_queue: Any
    hera_summary: Any
    state: Any
    args: Any

    def _hera_init_stats(self, device: torch.device) -> None:
        self._hera_stats = torch.zeros(len(DEVICE_STATS), dtype=torch.float64, device=device)
        self._hera_host_stats = [0.0] * len(HOST_STATS)
        self._hera_last_logged_step: int | None = None  # set at the first training step (resume-aware)
        self._hera_warned_nonfinite = False

    def _hera_add_stats(self, device_part: torch.Tensor | None, lm: torch.Tensor, host_part: list[float]) -> None:
        """Add one micro-batch: ``device_part`` ``[5]`` (``DEVICE_STATS``; None: LM loss ``lm`` only) and
        ``host_part`` (``HOST_STATS``). Device work only: no sync."""
        if device_part is None:
            self._hera_stats[0] += lm
        else:
            self._hera_stats += device_part
        self._hera_host_stats = [a + b for a, b in zip(self._hera_host_stats, host_part, strict=True)]

    def _hera_read_stats(self, reduce: bool) -> tuple[dict[str, float], int]:
        """The sums since the last read (all ranks' when ``reduce``) and the world size; resets them. One sync.

        Also tells the run summary this rank's micro-batches with a term and warns at the first non-finite term.
        """
        device = self._hera_stats.device
        temperature = used_temperature(self.hera_log_tau.detach()).double().reshape(1).to(device)
        local = torch.cat([self._hera_stats, torch.tensor(self._hera_host_stats, dtype=torch.float64).to(device),
                           temperature])
        stats, world = local.clone(), 1
        if reduce and torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(stats)
            world = torch.distributed.get_world_size()
        names = (*DEVICE_STATS, *HOST_STATS, "temperature")
        both = torch.stack([local, stats]).tolist()  # the one device-to-host copy of a logging step
        mine, values = dict(zip(names, both[0], strict=True)), dict(zip(names, both[1], strict=True))
        self.hera_summary.with_term += int(mine["attempts"] - mine["skipped"])
        self.hera_summary.nonfinite += int(mine["skipped"])
        if values["skipped"] and not self._hera_warned_nonfinite:  # silence would be the worst failure
            self._hera_warned_nonfinite = True
            print(NONFINITE_WARNING, flush=True)
        self._hera_stats.zero_()
        self._hera_host_stats = [0.0] * len(HOST_STATS)
        return values, world

    def _hera_log_values(self, logs: dict[str, float]) -> None:
        """Add HeRA's keys to a training log (same decision on every rank, so the reduction is safe)."""
        values, world = self._hera_read_stats(reduce=True)
        optimizer_steps = max(self.state.global_step - (self._hera_last_logged_step or 0), 1)
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
        if self.hera_queue.capacity:
            logs["hera_queue_size"] = len(self.hera_queue)
        self._hera_last_logged_step = self.state.global_step
