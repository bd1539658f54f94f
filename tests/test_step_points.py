"""The points of a training micro-step (the trainer base's ``compute_loss``, ``sections.loss_returned`` and
``sections.OptimizerPoints``), on a tiny model through transformers' Trainer: each is progress, in the step's order,
and says where the rank is; unwatched, nothing is hooked."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import TrainingArguments

from llamafactory_hera.runtime import job_store
from llamafactory_hera.training import sections
from llamafactory_hera.training.trainer_base import MethodTrainer
from llamafactory_hera.training.watch_bounds import Place
from llamafactory_hera.training.watchdog import Watchdog


class _Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, 1)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"loss": ((self.linear(x).squeeze(-1) - labels) ** 2).mean()}


class _Trainer(MethodTrainer):
    """The trainer base over transformers' Trainer, as a method's trainer with no hook of its own."""


class _Points:
    """A watchdog as sections.py sees one: each point with the progress count it left."""

    def __init__(self) -> None:
        self.count = 0
        self.points: list[tuple[int, str]] = []

    def enter(self, section: str, kind: str, step: int | None = None) -> None:
        self.count = 0

    def progress(self) -> None:
        self.count += 1

    def reached(self, point: str) -> None:
        self.count += 1
        self.points.append((self.count, point))

    def where(self) -> tuple[str, str, int]:
        return ("step 1", "step", 1)


def _trainer(tmp_path: Path, accumulation: int) -> _Trainer:
    rows = [{"x": torch.full((4,), float(index)), "labels": torch.tensor(float(index))} for index in range(8)]
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=2, gradient_accumulation_steps=accumulation,
        use_cpu=True, report_to=[], save_strategy="no", disable_tqdm=True)
    return _Trainer(model=_Tiny(), args=args, train_dataset=rows)


# the loss's forward begun, then the model's (the base's train counts the model's forwards), returned, the backward
STEP = [sections.FORWARD, sections.FORWARD, sections.BEFORE_BACKWARD, sections.BACKWARD, sections.AFTER_BACKWARD]


@pytest.mark.parametrize("accumulation", [1, 2])
def test_a_steps_points_advance_in_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, accumulation: int) -> None:
    """Forward begun < forward returned < backward begun < backward ended (each micro-batch) < optimizer step begun
    < ended: every point one more unit of progress."""
    dog = _Points()
    trainer = _trainer(tmp_path, accumulation)
    monkeypatch.setattr(sections, "_running", [dog])
    trainer.train()
    assert [point for _, point in dog.points] == [*STEP * accumulation, sections.OPTIMIZER, sections.AFTER_OPTIMIZER]
    counts = [count for count, _ in dog.points]
    assert counts == sorted(set(counts)), counts


def test_unwatched_nothing_is_hooked(tmp_path: Path) -> None:
    """No watchdog: the loss carries no hook, and a point is a call that does nothing."""
    trainer = _trainer(tmp_path, 1)
    batch: dict[str, Any] = {"x": torch.ones(2, 4), "labels": torch.ones(2)}
    loss = trainer.compute_loss(trainer.model, batch)
    assert loss.requires_grad and not loss._backward_hooks
    loss.backward()
    sections.reached(sections.OPTIMIZER)  # no watchdog to tell


def test_a_point_advances_the_beats_position_and_the_beat_says_where() -> None:
    """Rank 1's beat (no store call made): each point one more unit of the position's progress, the last point in the
    beat; a new section starts from none."""
    place = Place(1, 2, 1, "0", 1, "node-a", "127.0.0.1:0")
    dog = Watchdog(place, None, job_store.Keys("test/"), 1.0, ".")
    dog.enter("step 3", "step", 3)
    dog.progress()
    dog.reached(sections.BACKWARD)
    beat = json.loads(dog.beat())
    assert beat["position"] == [3, 4, 2] and beat["point"] == sections.BACKWARD
    dog.enter("the save of checkpoint-3", "save")
    beat = json.loads(dog.beat())
    assert beat["position"] == [3, 5, 0] and "point" not in beat
