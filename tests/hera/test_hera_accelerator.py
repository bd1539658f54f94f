"""HeRA's training step on the simulated accelerator: the real ``run_exp`` path.

Each run trains 2 optimizer steps (forward, backward, AdamW with the temperature's group) on the device, with the
teacher features from the precomputed cache, from the teacher in the step, and with the feature queue on; the
temperature is learned in all of them. A CPU tensor meeting a device tensor raises ``DeviceMismatch`` there.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
from transformers import TrainerCallback

from conftest import base_recipe

pytestmark = pytest.mark.accelerator


class Logs(TrainerCallback):
    """Every training log (the Trainer's ``on_log``) and whether training reached its end."""

    def __init__(self) -> None:
        self.logs: list[dict[str, float]] = []
        self.ended = False

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kwargs: Any) -> None:
        if logs and "loss" in logs:
            self.logs.append(dict(logs))

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.ended = True


def small_recipe(assets: Any, family: str, out: Path, **overrides: Any) -> dict[str, Any]:
    """2 steps of 8 rows (16 rows in all: the precompute pass covers the training set)."""
    return base_recipe(assets, family, out, max_steps=2, max_samples=16, per_device_train_batch_size=8,
                       save_strategy="no", **overrides)


def run_on_device(accelerator: Any, recipe: dict[str, Any]) -> Logs:
    from llamafactory.train.tuner import run_exp

    logs = Logs()
    with accelerator:
        run_exp(recipe, callbacks=[logs])
    return logs


@pytest.mark.parametrize("family,teacher", [
    ("qwen2_5_vl", "precomputed"), ("qwen2_5_vl", "in_step"), ("qwen2_5_vl", "queue"), ("llava", "precomputed"),
])
def test_hera_trains_on_the_device(assets, accelerator, tmp_path: Path, family: str, teacher: str) -> None:
    """Two HeRA steps on the device: finished, ``hera_loss`` logged finite at each step, the learned temperature
    moved from its start (0.07), the term present in every micro-batch.

    precomputed: every training image's feature is in the cache before step 1 (the teacher leaves the device);
    in_step: ``hera_teacher_cache: false``, the teacher runs in each step on the collator's pixels;
    queue: ``hera_queue_size: 8``, so step 2's candidates are the batch plus the queue of step 1's samples.
    """
    overrides: dict[str, Any] = {
        "precomputed": {"hera_teacher_precompute": "true"},
        "in_step": {"hera_teacher_cache": False},
        "queue": {"hera_queue_size": 8},
    }[teacher]
    logs = run_on_device(accelerator, small_recipe(assets, family, tmp_path / "run", **overrides))
    assert logs.ended
    assert [len(logs.logs)] == [2], logs.logs
    for entry in logs.logs:
        assert math.isfinite(entry["hera_loss"]) and entry["hera_loss"] > 0, entry
        assert math.isfinite(entry["loss"]) and math.isfinite(entry["lm_loss"]), entry
        assert "hera_batches_without_term" not in entry and "hera_nonfinite_skipped" not in entry, entry
    temperatures = [entry["hera_temperature"] for entry in logs.logs]
    assert abs(temperatures[0] - 0.07) > 1e-6 and abs(temperatures[1] - temperatures[0]) > 1e-6, temperatures
    if teacher == "queue":
        assert [entry["hera_queue_size"] for entry in logs.logs] == [8, 8], logs.logs
