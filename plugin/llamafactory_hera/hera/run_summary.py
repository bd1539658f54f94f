"""What a HeRA run says about itself: one line at the start, a warning when micro-batches carry no HeRA term,
and a count at the end, so a run that trains less HeRA than it seems to is never silent."""

from __future__ import annotations

from typing import Any

from llamafactory_hera.hera.args import HeraArguments
from llamafactory_hera.hera.temperature import TAU_MAX, TAU_MIN

PREFIX = "[llamafactory-hera]"


class HeraRunSummary:
    """Start line, first-missing-term warning and end-of-run count of micro-batches with a HeRA term."""

    def __init__(self, hera_args: HeraArguments, data_counts: Any = None) -> None:
        self.hera_args = hera_args
        self.data_counts = data_counts  # preflight.ImageRowCounts or None (streaming)
        self.micro_batches = 0
        self.with_term = 0
        self.nonfinite = 0  # micro-batches whose HeRA term was non-finite and skipped (read at logging steps)
        self.warned_missing = False

    def start_line(self, trainer: Any) -> str:
        """The run's HeRA settings in one line (heads, teacher, k, lambda, temperature, pooling, sets, data)."""
        args = self.hera_args
        geometry = trainer.hera_contrastive
        if args.hera_learn_temperature:
            temperature = (f"temperature {args.hera_temperature} learned (lr {trainer.hera_temperature_lr:g}, "
                           f"range [{TAU_MIN}, {TAU_MAX}])")
        else:
            temperature = f"temperature {args.hera_temperature} fixed"
        processes = trainer.args.world_size
        gather = (f"gather on ({processes} processes)" if args.hera_gather and processes > 1
                  else "gather off" if processes > 1 else "gather n/a (1 process)")
        queue = f"queue {geometry.queue if geometry.queue else 'off'} ({geometry.queue_reason})"
        precompute = "on" if trainer._hera_precompute_decision() else "off"
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
                f"precompute {args.hera_teacher_precompute} -> {precompute}; {data}; {trainer.hera_monitor_line()}")

    def print_start(self, trainer: Any) -> None:
        print(self.start_line(trainer), flush=True)

    def note_missing_term(self, image_samples: int, text_only: int, batch: int, step: int) -> None:
        """A micro-batch without a HeRA term: warn once, with what it held."""
        if self.warned_missing:
            return
        self.warned_missing = True
        print(f"{PREFIX} warning: a micro-batch at step {step + 1} had no HeRA term ({image_samples} usable image "
              f"samples, {text_only} text-only, of {batch}): it trains the LM loss only. Such micro-batches are "
              "counted as hera_batches_without_term in the logs and at the end of the run.", flush=True)

    def print_end(self, trainer: Any) -> None:
        """Micro-batches with a HeRA term over the run (this process)."""
        if not trainer.is_world_process_zero() or self.micro_batches == 0:
            return
        missing = self.micro_batches - self.with_term - self.nonfinite
        share = 100.0 * self.with_term / self.micro_batches
        print(f"{PREFIX} HeRA term in {self.with_term} of {self.micro_batches} micro-batches ({share:.0f}%)"
              + (f"; {missing} without (text-only or too few image samples)" if missing else "")
              + (f"; {self.nonfinite} skipped as non-finite (check hera_temperature / bf16 overflow)"
                 if self.nonfinite else "") + ".", flush=True)
