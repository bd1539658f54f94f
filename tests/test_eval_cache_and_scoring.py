"""The eval cache's task revision and the demo task's answer reading, without loading a model.

A cached result counts only for the task revision it was computed under (the demo task set's source, or the
library's version): a result from an older demo task (48x48 images, 4 new tokens) must run again, not be reported
as the new task's. The demo MLLM task reads the option letter as a person would: "the answer is B" is B, the
article in "A blue square" is no answer.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from llamafactory_hera.evaluation import runner
from llamafactory_hera.evaluation.demo_tasks import answer_letter
from llamafactory_hera.evaluation.presets import DEMO_MLLM_TASK, LMMS, PlannedTask
from llamafactory_hera.evaluation.runs import ModelSpec


@pytest.mark.parametrize(("text", "letter"), [
    ("B", "B"), (" (C) a red circle", "C"), ("D. a triangle", "D"), ("A", "A"),
    ("A blue square is shown, so the answer is B.", "B"), ("The answer is: C", "C"), ("Answer: D", "D"),
    ("A red circle", None), ("I cannot tell", None), ("", None), ("It is B", "B"),
])
def test_the_demo_reads_the_answers_letter(text: str, letter: str | None) -> None:
    assert answer_letter(text) == letter


def _spec(tmp_path: Path) -> ModelSpec:
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}", encoding="utf-8")
    return ModelSpec(label="run", run_dir=tmp_path, stage="hera", recipe={"model_name_or_path": str(model)},
                     modality="mllm", trained=True)


def test_a_cached_result_of_another_task_revision_runs_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    task = PlannedTask(DEMO_MLLM_TASK, LMMS, "Demo")
    spec = _spec(tmp_path)
    ran: list[str] = []

    def fake_run(engine, spec, rows_from, task, limit, batch_size, jailbreak=None, cache_dir=None):  # stand-in
        ran.append(task.name)
        return {"entries": [{"task": task.name, "metric": "accuracy", "value": 0.5, "higher_is_better": True}],
                "seconds": 0.0, "library": task.library, "version": "x", "task_revision": runner.task_revision(task)}

    monkeypatch.setattr(runner, "run_task", fake_run)
    engine = SimpleNamespace(model=SimpleNamespace(dtype="torch.float32", config=SimpleNamespace()))  # what eval reads
    monkeypatch.setattr("llamafactory_hera.evaluation.runner.load_engine", lambda spec: engine)
    path = runner.cache_file(tmp_path, spec, task.name)
    path.parent.mkdir(parents=True)
    old = {"entries": [{"task": task.name, "metric": "accuracy", "value": 1.0, "higher_is_better": True}],
           "limit": None, "task_revision": "demo:older"}
    path.write_text(json.dumps(old), encoding="utf-8")
    first = runner.evaluate_model(spec, spec, [task], tmp_path, None, 1, lambda line: None)
    assert ran == [task.name] and first.cached == [] and first.results[task.name]["entries"][0]["value"] == 0.5
    second = runner.evaluate_model(spec, spec, [task], tmp_path, None, 1, lambda line: None)
    assert ran == [task.name] and second.cached == [task.name]  # the new entry is the current revision's


def test_the_demo_revision_follows_the_task_sets_source() -> None:
    revision = runner.task_revision(PlannedTask(DEMO_MLLM_TASK, LMMS, "Demo"))
    assert revision.startswith("demo:") and len(revision) == len("demo:") + 16
    assert runner.task_revision(PlannedTask("mmvp", LMMS, "Vision-Centric")).startswith("lmms_eval==")
