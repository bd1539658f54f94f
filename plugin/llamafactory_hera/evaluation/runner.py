"""``llamafactory-hera eval``'s loop: each model loaded once, only when one of its tasks is not cached, and each
finished task written at once to ``RUN_DIR/eval_cache/<model key>/<task>.json`` (:meth:`ModelSpec.cache_key`), so a
later failure keeps it and a rerun reads it.
"""

from __future__ import annotations

import gc
import json
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llamafactory_hera.evaluation.presets import PlannedTask
from llamafactory_hera.evaluation.runs import ModelSpec

CACHE_DIR = "eval_cache"


@dataclass
class Outcome:
    """What one model did on the planned tasks: results by task name, failures (task -> one line), cache hits."""

    spec: ModelSpec
    results: dict[str, dict[str, Any]] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)
    cached: list[str] = field(default_factory=list)


def cache_file(run_dir: Path, spec: ModelSpec, task: str) -> Path:
    return run_dir / CACHE_DIR / spec.cache_key() / f"{task.replace('/', '_')}.json"


def _read_cache(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    except (OSError, json.JSONDecodeError):
        return None  # a torn or old cache entry: run the task again


def evaluate_model(spec: ModelSpec, rows_from: ModelSpec, tasks: list[PlannedTask], run_dir: Path, limit: int | None,
                   batch_size: int, say: Any, jailbreak: Any = None) -> Outcome:
    """Run (or read from the cache) every task on ``spec``'s model; a failing task is recorded and the next runs.
    ``jailbreak``: the jailbreak task's :class:`~.jailbreak.JailbreakSetup` (None: its defaults)."""
    from tqdm.auto import tqdm

    from llamafactory_hera.evaluation.backends import run_task, task_revision

    outcome = Outcome(spec)
    engine = None
    for task in tqdm(tasks, desc=f"eval {spec.label}: {spec.title}", unit="task"):
        path = cache_file(run_dir, spec, task.name)
        hit = _read_cache(path)
        if hit is not None and hit.get("limit") == limit and hit.get("task_revision") == task_revision(task, jailbreak):
            outcome.results[task.name] = hit
            outcome.cached.append(task.name)
            continue
        try:
            if engine is None:
                from llamafactory_hera.evaluation.engine import device_note, load_engine

                note = device_note()
                if note:
                    say(note)
                say(f"eval: loading the {spec.label} model ({_describe(spec)})")
                engine = load_engine(spec)
            result = run_task(engine, spec, rows_from, task, limit, batch_size, spec.label, jailbreak,
                              cache_dir=path.parent)
        except Exception as err:  # noqa: BLE001 - one task's failure must not lose the others' results
            line = _one_line(err)
            outcome.failures[task.name] = line
            say(f"eval: {task.name} failed on the {spec.label} model: {line}")
            (run_dir / CACHE_DIR).mkdir(parents=True, exist_ok=True)
            (run_dir / CACHE_DIR / "last_failure.txt").write_text(traceback.format_exc(), encoding="utf-8")
            continue
        result = {**result, "limit": limit, "task": task.name, "group": task.group, "model": _describe(spec)}
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(".tmp")
        temporary.write_text(json.dumps(result, indent=2), encoding="utf-8")
        temporary.replace(path)
        outcome.results[task.name] = result
    del engine
    gc.collect()
    return outcome


def _one_line(err: BaseException) -> str:
    """The failure as one line; a retry wrapper (lmms-eval's dataset download) says what it last caught."""
    attempt = getattr(err, "last_attempt", None)
    inner = attempt.exception() if attempt is not None and hasattr(attempt, "exception") else None
    if isinstance(inner, BaseException):
        err = inner
    text = str(err).splitlines()[0] if str(err) else ""
    if isinstance(err, ConnectionError) or "ConnectionError" in type(err).__name__ or "offline" in text.lower():
        text += " (the task's data could not be fetched: run once with network access so that it is cached in HF_HOME)"
    return f"{type(err).__name__}: {text}".strip()


def _describe(spec: ModelSpec) -> str:
    adapters = spec.recipe.get("adapter_name_or_path")
    return f"{spec.recipe['model_name_or_path']}" + (f" + adapter {adapters}" if adapters else "")
