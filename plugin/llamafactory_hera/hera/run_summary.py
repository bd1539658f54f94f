"""What a HeRA run says about itself: one line at the start, HeRA's keys in every training log, a warning when
micro-batches carry no HeRA term, and a count at the end, so a run that trains less HeRA than it seems to is never
silent.

Per-log sums (:class:`HeraRunStats`): a training step must not wait on the GPU (every ``.item()``, ``bool(tensor)``,
boolean mask or ``.cpu()`` does). So the sums that come from the device (the losses, whether the HeRA loss was finite)
stay on the device, and the counts the collator already knew (image samples, text-only samples, micro-batches without a
term) stay on the host; both are read together when the Trainer logs, which syncs anyway. The checks are made there: a
non-finite HeRA loss warns at the first log after it (and is logged as ``hera_nonfinite_skipped``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from transformers import TrainerCallback

from llamafactory_hera.hera.config import HeraArguments
from llamafactory_hera.hera.loss import TAU_MAX, TAU_MIN, used_temperature

PREFIX = "[llamafactory-hera]"
# On the device (float64): LM loss, HeRA loss (finite ones), finite HeRA terms, non-finite (skipped) HeRA terms,
# lambda * term / accumulation steps.
DEVICE_STATS = ("lm", "hera", "hera_micro", "skipped", "weighted")
# On the host: image samples used, text-only samples, micro-batches, micro-batches the host knew had no term,
# micro-batches that computed a term.
HOST_STATS = ("images", "text_only", "micro", "host_no_term", "attempts")
NONFINITE_WARNING = ("[llamafactory-hera] warning: non-finite HeRA loss; the term is skipped for such micro-batches "
                     "(counted as hera_nonfinite_skipped in the logs). Check hera_temperature / bf16 overflow.")


class StartLine(TrainerCallback):
    """Prints the start line when training begins: after ``Trainer.train`` re-enabled gradient checkpointing
    (``gradient_checkpointing: true``; reentrant by LLaMA-Factory's default, whatever ``use_reentrant_gc`` says), so
    that its checkpointing part says what the steps run under. Added before the alignment monitor, whose step-0
    point comes after it."""

    def __init__(self) -> None:
        self.line: Callable[[], str] | None = None  # set by the trainer's train() on the main process

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:  # noqa: D102
        if self.line is not None:
            print(self.line(), flush=True)
            self.line = None


class HeraRunStats:
    """Start line, per-log sums of the HeRA step (device and host parts) and their reading at a logging step,
    first-missing-term warning and end-of-run count of micro-batches with a HeRA term."""

    def __init__(self, hera_args: HeraArguments, data_counts: Any, device: torch.device) -> None:
        self.hera_args = hera_args
        self.data_counts = data_counts  # preflight.ImageRowCounts or None (streaming)
        self.device_sums = torch.zeros(len(DEVICE_STATS), dtype=torch.float64, device=device)
        self.host_sums = [0.0] * len(HOST_STATS)
        self.last_logged_step: int | None = None  # set at the first training step (resume-aware)
        self.micro_batches = 0
        self.with_term = 0
        self.nonfinite = 0  # micro-batches whose HeRA term was non-finite and skipped (read at logging steps)
        self.warned_missing = False
        self.warned_nonfinite = False

    def start_line(self, geometry: Any, temperature_lr: float, processes: int, precompute: bool,
                   monitor_line: str, checkpointing_line: str) -> str:
        """The run's HeRA settings in one line (heads, teacher, k, lambda, temperature, pooling, sets, data, monitor,
        gradient checkpointing per decoder layer);
        ``geometry``: :class:`~llamafactory_hera.hera.preflight.ContrastiveGeometry`."""
        args = self.hera_args
        if args.hera_learn_temperature:
            temperature = (f"temperature {args.hera_temperature} learned (lr {temperature_lr:g}, "
                           f"range [{TAU_MIN}, {TAU_MAX}])")
        else:
            temperature = f"temperature {args.hera_temperature} fixed"
        gather = (f"gather on ({processes} processes)" if args.hera_gather and processes > 1
                  else "gather off" if processes > 1 else "gather n/a (1 process)")
        queue = f"queue {geometry.queue if geometry.queue else 'off'} ({geometry.queue_reason})"
        precompute_on = "on" if precompute else "off"
        counts = self.data_counts
        if counts is None:
            data = "image rows: unknown (streaming)"
        else:
            data = f"image rows {counts.image_rows}/{counts.rows}"
            if counts.text_only_rows:
                data += f" ({counts.text_only_rows} text-only: LM loss only)"
            if counts.video_only_rows:
                data += f" ({counts.video_only_rows} video-only: LM loss only, videos have no teacher feature)"
        return (f"{PREFIX} HeRA: heads [{', '.join(args.hera_heads)}]; teacher {args.hera_teacher} "
                f"({args.hera_teacher_feature}); k {args.hera_k}; lambda {args.hera_lambda}; {temperature}; "
                f"pooling {args.hera_pooling}; {gather}; contrastive set up to {geometry.largest} samples; {queue}; "
                f"precompute {args.hera_teacher_precompute} -> {precompute_on}; {data}; {monitor_line}; "
                f"{checkpointing_line}")

    def note_missing_term(self, image_samples: int, text_only: int, batch: int, step: int) -> None:
        """A micro-batch without a HeRA term: warn once, with what it held."""
        if self.warned_missing:
            return
        self.warned_missing = True
        print(f"{PREFIX} warning: a micro-batch at step {step + 1} had no HeRA term ({image_samples} usable image "
              f"samples, {text_only} text-only, of {batch}): it trains the LM loss only. Such micro-batches are "
              "counted as hera_batches_without_term in the logs and at the end of the run.", flush=True)

    def print_end(self, main_process: bool) -> None:
        """Micro-batches with a HeRA term over the run (this process)."""
        if not main_process or self.micro_batches == 0:
            return
        missing = self.micro_batches - self.with_term - self.nonfinite
        share = 100.0 * self.with_term / self.micro_batches
        print(f"{PREFIX} HeRA term in {self.with_term} of {self.micro_batches} micro-batches ({share:.0f}%)"
              + (f"; {missing} without (text-only or too few image samples)" if missing else "")
              + (f"; {self.nonfinite} skipped as non-finite (check hera_temperature / bf16 overflow)"
                 if self.nonfinite else "") + ".", flush=True)

    def add(self, device_part: torch.Tensor | None, lm: torch.Tensor, host_part: list[float]) -> None:
        """Add one micro-batch: ``device_part`` ``[5]`` (``DEVICE_STATS``; None: LM loss ``lm`` only) and
        ``host_part`` (``HOST_STATS``). Device work only: no sync."""
        if device_part is None:
            self.device_sums[0] += lm
        else:
            self.device_sums += device_part
        self.host_sums = [a + b for a, b in zip(self.host_sums, host_part, strict=True)]
        self.micro_batches += 1

    def read(self, log_tau: torch.Tensor, reduce: bool) -> tuple[dict[str, float], int]:
        """The sums since the last read (all ranks' when ``reduce``) and the world size; resets them. One sync.

        Also counts this rank's micro-batches with a term for the end of the run and warns at the first non-finite
        term.
        """
        device = self.device_sums.device
        temperature = used_temperature(log_tau.detach()).double().reshape(1).to(device)
        local = torch.cat([self.device_sums, torch.tensor(self.host_sums, dtype=torch.float64).to(device),
                           temperature])
        stats, world = local.clone(), 1
        if reduce and torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(stats)
            world = torch.distributed.get_world_size()
        names = (*DEVICE_STATS, *HOST_STATS, "temperature")
        both = torch.stack([local, stats]).tolist()  # the one device-to-host copy of a logging step
        mine, values = dict(zip(names, both[0], strict=True)), dict(zip(names, both[1], strict=True))
        self.with_term += int(mine["attempts"] - mine["skipped"])
        self.nonfinite += int(mine["skipped"])
        if values["skipped"] and not self.warned_nonfinite:  # silence would be the worst failure
            self.warned_nonfinite = True
            print(NONFINITE_WARNING, flush=True)
        self.device_sums.zero_()
        self.host_sums = [0.0] * len(HOST_STATS)
        return values, world

    def log_values(self, logs: dict[str, float], log_tau: torch.Tensor, queue_size: int | None,
                   global_step: int) -> None:
        """Add HeRA's keys to a training log (same decision on every rank, so the reduction is safe)."""
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
