"""The default schedule's budget (``hera_monitor_steps: null``): the probe pairs' teacher pass and every point after
step 0 stay within 5 % of the time trained, on a clock the test moves (steps, points and the teacher pass of the
sizes measured by bench/overhead.py --monitor on the CPU machine)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch

from llamafactory_hera.hera import trainer_monitor
from llamafactory_hera.hera.trainer_monitor import HeraMonitorMixin


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeMonitor:
    """Scores in ``seconds`` of the test's clock."""

    def __init__(self, clock: Clock, seconds: float, prepare: float) -> None:
        self.clock, self.seconds, self.prepare = clock, seconds, prepare
        self.teacher_knn = None
        self.device = torch.device("cpu")

    def prepare_teacher(self, teacher: Any, processor: Any) -> float:
        self.clock.now += self.prepare
        self.teacher_knn = torch.zeros(1)
        return self.prepare

    def score(self, model: Any) -> torch.Tensor:
        self.clock.now += self.seconds
        return torch.tensor([0.5])

    def logs(self, values: list[float]) -> dict[str, float]:
        return {"hera_mknn": values[0]}


class Run(HeraMonitorMixin):
    """The mixin with what the Trainer gives it; ``log`` records the steps that got a point."""

    def __init__(self, monitor: FakeMonitor, logging_steps: int, max_steps: int) -> None:
        self.hera_monitor = monitor
        self.hera_args = SimpleNamespace(hera_monitor_steps=None)
        self.args = SimpleNamespace(eval_strategy="no", logging_strategy="steps", logging_steps=logging_steps)
        self.state = SimpleNamespace(global_step=0, eval_steps=0, logging_steps=logging_steps, max_steps=max_steps)
        self.data_collator = SimpleNamespace(hera_image_processor=object())
        self.hera_teacher = object()
        self.model = None
        self.scored: list[int] = []
        self._hera_monitor_pending = None
        self._hera_monitor_last = self._hera_monitor_spent = self._hera_monitor_prepared = 0.0
        self._hera_monitor_points = 0

    def log(self, logs: dict[str, float]) -> None:
        self.scored.append(self.state.global_step)


def _train(monkeypatch: pytest.MonkeyPatch, steps: int, step_s: float, point_s: float, prepare_s: float,
           logging_steps: int = 1) -> tuple[Run, float, float]:
    """(run, training seconds, monitor seconds) of a run whose steps and points take the given times."""
    clock = Clock()
    monkeypatch.setattr(trainer_monitor.time, "perf_counter", clock)
    run = Run(FakeMonitor(clock, point_s, prepare_s), logging_steps, steps)
    run._hera_monitor_prepare_teacher()
    begin = clock.now
    run._hera_monitor_begin()
    for step in range(1, steps + 1):
        clock.now += step_s
        run.state.global_step = step
        run._hera_monitor_step(SimpleNamespace(should_log=False))
    points = len(run.scored) * point_s
    return run, clock.now - begin - points, prepare_s + points


@pytest.mark.parametrize(("steps", "step_s", "point_s", "prepare_s", "points"), [
    (24, 2.3, 1.3, 0.34, 1),  # bench/overhead.py --monitor, cpu-mid: step 0 only
    (1000, 2.3, 1.3, 0.34, None),
    (500, 0.5, 0.2, 3.0, None),  # a long teacher pass
    (200, 1.0, 0.01, 0.0, 201),  # cheap points: every logging step
])
def test_teacher_pass_and_points_stay_within_the_budget(monkeypatch: pytest.MonkeyPatch, steps: int, step_s: float,
                                                        point_s: float, prepare_s: float, points: int | None) -> None:
    """Every point after step 0 keeps the teacher pass and all points within 5 % of the time trained; the budget is
    used (the next point would not fit) rather than left idle."""
    run, trained, spent = _train(monkeypatch, steps, step_s, point_s, prepare_s)
    assert run.scored[0] == 0 and len(run.scored) == (points or len(run.scored)) > 0, run.scored
    if len(run.scored) > 1:
        assert spent <= 0.05 * trained + 1e-9, (run.scored, spent, trained)
    if len(run.scored) <= steps:  # some due step was skipped: one more point (reckoned at 1.5 x) did not fit
        assert spent + 1.5 * point_s > 0.05 * trained - step_s * 0.05, (run.scored, spent, trained)


def test_the_teacher_pass_counts_against_the_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    """Steps of 1 s, points of 0.19 s, the next point reckoned at 1.5 x 0.19 s. Without a teacher pass the second
    point fits at step 10 (0.19 + 0.285 <= 5 % of 9.5 s trained); a 3 s pass moves it to step 70 (3 + 0.475 <= 5 % of
    69.5 s) and the third to step 74 (3 + 0.38 + 0.285 <= 5 % of 73.3 s); the run ends within 5 %."""
    cheap, _, _ = _train(monkeypatch, 100, 1.0, 0.19, 0.0)
    costly, trained, spent = _train(monkeypatch, 100, 1.0, 0.19, 3.0)
    assert cheap.scored[:2] == [0, 10]
    assert costly.scored[:3] == [0, 70, 74]
    assert spent <= 0.05 * trained + 1e-9


def test_an_explicit_schedule_is_not_thinned(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock()
    monkeypatch.setattr(trainer_monitor.time, "perf_counter", clock)
    run = Run(FakeMonitor(clock, 5.0, 1.0), 1, 10)
    run.hera_args.hera_monitor_steps = 2
    run._hera_monitor_prepare_teacher()
    run._hera_monitor_begin()
    for step in range(1, 11):
        clock.now += 0.1
        run.state.global_step = step
        run._hera_monitor_step(SimpleNamespace(should_log=False))
    assert run.scored == [0, 2, 4, 6, 8, 10]


def test_a_second_train_call_charges_no_teacher_pass_it_did_not_make(monkeypatch: pytest.MonkeyPatch) -> None:
    """The probe pairs' features are kept by the trainer: a second ``train()`` skips the pass, and its budget must not
    carry the first call's seconds (it would thin the second call's points for nothing)."""
    clock = Clock()
    monkeypatch.setattr(trainer_monitor.time, "perf_counter", clock)
    run = Run(FakeMonitor(clock, 0.2, 3.0), 1, 10)
    run._hera_monitor_prepare_teacher()
    assert run._hera_monitor_prepared == 3.0
    before = clock.now
    run._hera_monitor_prepare_teacher()
    assert run._hera_monitor_prepared == 0.0 and clock.now == before
