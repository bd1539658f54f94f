"""The alignment monitor inside a HeRA run: when it scores, how its points reach the logs, what it costs.

Mixed into :class:`llamafactory_hera.hera.trainer.HeraTrainerMixin` (uses ``hera_args``, ``hera_geometry``,
``hera_teacher``, ``model``, ``data_collator``, ``args``, ``state`` and the Trainer's ``log``).

- A point at step 0 (before the first update: the "before" of ``select --report``), then at the steps
  ``hera_monitor_steps`` names. With ``null``: the logging steps (the eval steps when evaluation is on), each skipped
  while the probe pairs' teacher pass, the probes so far and one more would exceed
  :data:`~llamafactory_hera.hera.monitor.BUDGET` of the training time (rank 0's clock, broadcast so every rank
  decides alike). The point at step 0 of a fresh run is always scored (a resumed run starts after it).
- Points are computed at the end of the optimizer step, after the update, on every rank with the same pairs (under
  ZeRO-3 every rank must take part in the forward); rank 0's values are broadcast, so all ranks log the same.
- A point at a logging step goes into that step's training log (one line with ``loss``); at another step it is a
  log of its own. Either way it passes through the Trainer's ``log()``: ``trainer_state.json``, every ``report_to``
  backend, ``trainer_log.jsonl`` and LlamaBoard.
- Nothing happens on the device outside the steps that score, so a step that neither logs nor scores waits on the
  device no more than without the monitor.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from transformers import TrainerCallback

from llamafactory_hera.hera.monitor import BUDGET, AlignmentMonitor, ProbeSet, control_heads, wait_for_device

NEXT_PROBE_MARGIN = 1.5  # the default schedule reckons the next probe at this many times the slowest so far


def _by_steps(strategy: Any) -> bool:
    """Whether a Trainer ``*_strategy`` (an enum or its string) is ``steps``."""
    return str(getattr(strategy, "value", strategy)).lower() == "steps"


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


class _MonitorCallback(TrainerCallback):
    """Forwards the Trainer's events to the monitor (added after LLaMA-Factory's and the Trainer's own callbacks, so
    ``control.should_log`` is decided when ``on_step_end`` reaches it)."""

    def __init__(self, trainer: Any) -> None:
        self.trainer = trainer

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:  # noqa: D102
        self.trainer._hera_monitor_begin()

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:  # noqa: D102
        self.trainer._hera_monitor_flush()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:  # noqa: D102
        self.trainer._hera_monitor_step(control)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:  # noqa: D102
        self.trainer._hera_monitor_flush()


class HeraMonitorMixin:
    """``hera_monitor_steps``: the aligned heads' MKNN with the teacher during training."""

    hera_args: Any
    hera_geometry: Any
    hera_teacher: Any
    model: Any
    data_collator: Any
    args: Any
    state: Any

    def _hera_init_monitor(self, probe: ProbeSet | None, recipe_args: Any) -> None:
        """Set the monitor up (control heads, the student side's inputs); nothing runs on the model yet."""
        self.hera_monitor: AlignmentMonitor | None = None
        self._hera_monitor_pending: tuple[int, dict[str, float]] | None = None
        self._hera_monitor_started = 0.0
        self._hera_monitor_spent = 0.0  # seconds of probes since train() started
        self._hera_monitor_last = 0.0  # seconds of the slowest probe so far
        self._hera_monitor_prepared = 0.0  # seconds of the probe pairs' teacher pass (once, before step 1)
        self._hera_monitor_points = 0
        if probe is None:
            return
        aligned = self.hera_args.head_refs
        control = control_heads(aligned, self.hera_geometry.num_heads, self.args.seed)
        self.hera_monitor = AlignmentMonitor(self.hera_args, probe, aligned, control, self.hera_geometry.head_dim,
                                             self.args.device)
        self.hera_monitor.prepare_text(self.model, getattr(self.data_collator, "tokenizer", None), self.data_collator,
                                       recipe_args, self.args.seed, self.args)
        self.add_callback(_MonitorCallback(self))

    def hera_monitor_line(self) -> str:
        """What the monitor does in this run, for the start line."""
        monitor = self.hera_monitor
        if monitor is None:
            reason = "hera_monitor_steps: 0" if self.hera_args.hera_monitor_steps == 0 else "no probe pairs"
            return f"alignment monitor off ({reason})"
        steps = self.hera_args.hera_monitor_steps
        if steps is None:
            args = self.args
            every = (f"eval_steps ({args.eval_steps})" if _by_steps(args.eval_strategy)
                     else f"logging_steps ({args.logging_steps})" if _by_steps(args.logging_strategy)
                     else "every 1/20 of the run")
            when = f"at step 0 and with {every} within {BUDGET:.0%} of the training time"
        else:
            when = f"at step 0 and every {steps} steps"
        control = ", ".join(str(ref) for ref in monitor.control) or "none"
        return (f"alignment monitor {when} on {monitor.probe.source}, {monitor.mode} mode, k {monitor.k}, "
                f"control heads [{control}]")

    # ------------------------------------------------------------------------------------------------- schedule
    def _hera_monitor_interval(self) -> tuple[int, bool]:
        """(steps between points, whether the budget thins them)."""
        steps = self.hera_args.hera_monitor_steps
        if steps is not None:
            return int(steps), False
        args, state = self.args, self.state
        if _by_steps(args.eval_strategy) and state.eval_steps:
            return int(state.eval_steps), True
        if _by_steps(args.logging_strategy) and state.logging_steps:
            return int(state.logging_steps), True
        return max(1, int(state.max_steps) // 20), True

    def _hera_monitor_within_budget(self) -> bool:
        """Whether one more probe keeps the monitor within the budget of the training time (rank 0 decides): the
        probe pairs' teacher pass, the probes so far and one more against the time trained since train began (probes
        excluded). The next probe is reckoned at 1.5 x the slowest so far: on the shared CPU machine of the bench one
        point took 1.6 x the one before it, which took a run to 5.2 %."""
        elapsed = time.perf_counter() - self._hera_monitor_started
        spent = self._hera_monitor_spent
        cost = self._hera_monitor_prepared + spent + NEXT_PROBE_MARGIN * self._hera_monitor_last
        decision = [cost <= BUDGET * max(elapsed - spent, 0.0)]
        if _distributed():
            torch.distributed.broadcast_object_list(decision, src=0)
        return bool(decision[0])

    # ------------------------------------------------------------------------------------------------- points
    def _hera_monitor_prepare_teacher(self) -> None:
        """Teacher features of the probe pairs, once, before the teacher may leave the device."""
        monitor = self.hera_monitor
        if monitor is None or monitor.teacher_knn is not None:
            self._hera_monitor_prepared = 0.0  # computed by an earlier train() of this trainer: not this one's cost
            return
        from llamafactory_hera.hera.teacher import load_image_processor

        processor = getattr(self.data_collator, "hera_image_processor", None) or load_image_processor(
            self.hera_args.hera_teacher)
        self._hera_monitor_prepared = monitor.prepare_teacher(self.hera_teacher, processor)

    def _hera_monitor_point(self) -> dict[str, float]:
        """Score the heads now (every rank; rank 0's values) and return the metrics."""
        assert self.hera_monitor is not None
        wait_for_device(self.hera_monitor.device)  # the step's queued kernels are the step's time, not the point's
        start = time.perf_counter()
        scores = self.hera_monitor.score(self.model)
        if _distributed():
            torch.distributed.broadcast(scores, src=0)
        values = scores.tolist()  # the monitor's one device-to-host copy
        seconds = time.perf_counter() - start
        self._hera_monitor_last = max(self._hera_monitor_last, seconds)
        self._hera_monitor_spent += seconds
        self._hera_monitor_points += 1
        return self.hera_monitor.logs(values)

    def _hera_monitor_begin(self) -> None:
        """Train begins (model wrapped, optimizer ready): start the clock; a fresh run scores its step 0."""
        self._hera_monitor_started = time.perf_counter()
        self._hera_monitor_spent = 0.0
        if self.hera_monitor is not None and self.state.global_step == 0:
            self.log(self._hera_monitor_point())

    def _hera_monitor_step(self, control: Any) -> None:
        """End of an optimizer step: score when due; the point joins this step's training log when it logs."""
        if self.hera_monitor is None:
            return
        interval, budgeted = self._hera_monitor_interval()
        step = self.state.global_step
        if interval <= 0 or step % interval:
            return
        if budgeted and not self._hera_monitor_within_budget():
            return
        logs = self._hera_monitor_point()
        if control.should_log:
            self._hera_monitor_pending = (step, logs)
        else:
            self.log(logs)

    def _hera_monitor_merge(self, logs: dict[str, float]) -> None:
        """Put the point of this step into the Trainer's training log of this step."""
        pending = self._hera_monitor_pending
        if pending is not None and pending[0] == self.state.global_step:
            logs.update(pending[1])
            self._hera_monitor_pending = None

    def _hera_monitor_flush(self) -> None:
        """A point that no training log took (the Trainer did not log after all) is logged on its own."""
        pending, self._hera_monitor_pending = self._hera_monitor_pending, None
        if pending is not None:
            self.log(dict(pending[1]))
