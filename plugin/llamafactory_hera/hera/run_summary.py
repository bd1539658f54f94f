"""What a HeRA run says about itself at its ends: one line when training begins and a count at the end, so a run
that trains less HeRA than it seems to is never silent (the step's per-log sums and their keys in every training
log are the trainer's: ``trainer.StepSums``). A callback the workflow wires around the trainer.
"""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback

from llamafactory_hera.hera.config import HeraArguments
from llamafactory_hera.hera.loss import TAU_MAX, TAU_MIN

PREFIX = "[llamafactory-hera]"


class RunSummary(TrainerCallback):
    """Prints the start line when training begins (main process), after ``Trainer.train`` re-enabled gradient
    checkpointing, so that its checkpointing part says what the steps run under, and before the alignment monitor's
    step-0 point; at the end, the count of micro-batches with a HeRA term. ``data_counts``:
    ``preflight.ImageRowCounts`` or None (streaming); ``contrastive``: ``preflight.ContrastiveGeometry``;
    ``monitor``: the alignment monitor's callback or None."""

    def __init__(self, trainer: Any, hera_args: HeraArguments, data_counts: Any, contrastive: Any,
                 monitor: Any = None) -> None:
        self.trainer, self.hera_args, self.data_counts = trainer, hera_args, data_counts
        self.contrastive, self.monitor = contrastive, monitor
        self.said = False  # once: auto_find_batch_size begins training again after an out-of-memory error

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:  # noqa: D102
        if state.is_world_process_zero and not self.said:
            self.said = True
            print(self.start_line(), flush=True)

    def start_line(self) -> str:
        """The run's HeRA settings in one line (heads, teacher, k, lambda, temperature, pooling, sets, data, monitor,
        gradient checkpointing per decoder layer)."""
        args, trainer, geometry = self.hera_args, self.trainer, self.contrastive
        temperature_lr, processes = trainer.hera_temperature_lr, trainer.args.world_size
        precompute = trainer.hera_teacher.precompute_decision(trainer.train_dataset, trainer.args)
        monitor_line = self.monitor.line() if self.monitor is not None else (
            "alignment monitor off (" + ("hera_monitor_steps: 0" if args.hera_monitor_steps == 0
                                         else "no probe pairs") + ")")
        checkpointing_line = trainer.hera_checkpointing.line()
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

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """The steps after the last log read (their checks, this rank's counts), then the micro-batches with a HeRA
        term over the run (this process)."""
        sums = self.trainer.hera_sums
        sums.read(self.trainer.hera_log_tau, reduce=False)
        if not state.is_world_process_zero or sums.micro_batches == 0:
            return
        missing = sums.micro_batches - sums.with_term - sums.nonfinite
        share = 100.0 * sums.with_term / sums.micro_batches
        print(f"{PREFIX} HeRA term in {sums.with_term} of {sums.micro_batches} micro-batches ({share:.0f}%)"
              + (f"; {missing} without (text-only or too few image samples)" if missing else "")
              + (f"; {sums.nonfinite} skipped as non-finite (check hera_temperature / bf16 overflow)"
                 if sums.nonfinite else "") + ".", flush=True)

