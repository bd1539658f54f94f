"""The only code that speaks lmms-eval's and lm-eval's APIs."""

from __future__ import annotations

import atexit
import contextlib
import functools
import logging
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from typing_extensions import override

from llamafactory_hera.evaluation.demo_tasks import write_demo_tasks
from llamafactory_hera.evaluation.presets import DEMO_MLLM_TASK, DEMO_TEXT_TASK, LM, LMMS, PlannedTask
from llamafactory_hera.evaluation.protocols import DERIVED, derived_entries, write_protocol_tasks
from llamafactory_hera.runtime.errors import RecipeError
from llamafactory_hera_patches.tools import inference


def _demo_folder(library: str) -> Path:
    """The demo tasks (and for lmms-eval the protocol tasks), removed at process exit."""
    folder = Path(tempfile.mkdtemp(prefix="llamafactory_hera_eval_tasks_"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    write_demo_tasks(folder, library)
    if library == LMMS:
        import lmms_eval.tasks  # lazy: the eval extra

        write_protocol_tasks(folder, Path(lmms_eval.tasks.__file__).parent)
    return folder


@functools.cache
def task_manager(library: str, registry: bool) -> Any:
    """Once per process: lmms-eval reads ~2,000 task files for its registry."""
    # lazy: the eval extra (lmms-eval's logger)
    from loguru import logger

    logger.remove()  # lmms-eval's loguru logs a DEBUG line per registry file
    logger.add(sys.stderr, level="WARNING")
    logging.getLogger("lm-eval").setLevel(logging.WARNING)
    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    if library == LMMS:
        # lazy: the eval extra
        from lmms_eval.tasks import TaskManager

        verbosity: tuple[str, ...] = ("WARNING",)
    else:
        # lazy: the eval extra
        from lm_eval.tasks import TaskManager

        verbosity = ()
    return TaskManager(*verbosity, include_path=str(_demo_folder(library)), include_defaults=registry)


def known_tasks(library: str) -> set[str]:
    return set(task_manager(library, True).all_tasks)  # positional: one cache key with run_library's


def _entries(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Flat entries (``"metric,filter"`` keys; ``_stderr`` and non-numbers dropped)."""
    better = results.get("higher_is_better") or {}
    entries = []
    for task, metrics in (results.get("results") or {}).items():
        for key, value in metrics.items():
            metric = key.split(",")[0]
            if "_stderr" in key or key == "alias" or isinstance(value, bool) or not isinstance(value, int | float):
                continue
            entries.append(
                {
                    "task": task,
                    "metric": metric if key.endswith(",none") else key,
                    "value": float(value),
                    "higher_is_better": (better.get(task) or {}).get(metric, True),
                }
            )
    return entries


@contextlib.contextmanager
def _without_run_metadata(evaluator: Any) -> Iterator[None]:
    """Silence lm-eval's git commit and environment report (~2 s per task; no switch for either)."""
    names = [name for name in ("get_git_commit_hash", "add_env_info") if hasattr(evaluator, name)]
    kept = {name: getattr(evaluator, name) for name in names}
    for name in names:
        setattr(evaluator, name, lambda *_, **__: None)
    try:
        yield
    finally:
        for name, function in kept.items():
            setattr(evaluator, name, function)


def run_library(model: Any, task: PlannedTask, limit: int | None) -> list[dict[str, Any]]:
    if task.library == LMMS:
        # lazy: the eval extra
        from lmms_eval import evaluator

        options: dict[str, Any] = {"batch_size": 1, "verbosity": "WARNING", "process_docs_parallel": 1}
    else:
        # lazy: the eval extra
        from lm_eval import evaluator

        options = {}
    manager = task_manager(task.library, task.name not in (DEMO_MLLM_TASK, DEMO_TEXT_TASK))
    with _without_run_metadata(evaluator if task.library == LM else None):
        # a task its paper scores from the samples (.protocols.DERIVED) keeps them
        results = evaluator.simple_evaluate(
            model=model,
            tasks=[task.name],
            task_manager=manager,
            limit=limit,
            log_samples=task.name in DERIVED,
            bootstrap_iters=0,
            **options,
        )
    return _entries(results or {}) + derived_entries(task.name, (results or {}).get("samples") or {})


def _flatten(visuals: Any) -> list[Any]:
    if visuals is None:
        return []
    if isinstance(visuals, list | tuple):
        return [item for value in visuals for item in _flatten(value)]
    return [visuals]


def lmms_model(engine: Any, label: str) -> Any:
    # lazy: the eval extra, with lmms-eval's model class
    import PIL.Image
    from lmms_eval.api.model import lmms
    from tqdm.auto import tqdm

    class LlamaFactoryLMM(lmms):
        """lmms-eval's view of a LLaMA-Factory-loaded MLLM: greedy ``generate_until`` with images."""

        is_simple = True

        def __init__(self) -> None:
            super().__init__()
            self.batch_size_per_gpu = 1

        @override
        def generate_until(self, requests: list[Any]) -> list[str]:
            answers = []
            for request in tqdm(requests, desc=f"{label}: answering", leave=False):
                context, gen_kwargs, doc_to_visual, doc_id, task, split = request.args
                visuals = _flatten(doc_to_visual(self.task_dict[task][split][doc_id])) if doc_to_visual else []
                others = [type(v).__name__ for v in visuals if not isinstance(v, PIL.Image.Image)]
                if others:
                    raise RecipeError(
                        f"task {task}: inputs of type {', '.join(sorted(set(others)))}; "
                        "llamafactory-hera eval answers image and text tasks only"
                    )
                kwargs = dict(gen_kwargs or {})
                until = kwargs.pop("until", None) or []
                until = [until] if isinstance(until, str) else list(until)
                temperature = float(kwargs.get("temperature", 0) or 0)
                input_kwargs = {"max_new_tokens": int(kwargs.get("max_new_tokens", 128)), "do_sample": temperature > 0}
                if temperature > 0:
                    input_kwargs["temperature"] = temperature
                text = inference.answer(engine, [{"role": "user", "content": context}], visuals or None, input_kwargs)
                for stop in until:
                    text = text.split(stop)[0] if stop else text
                answers.append(text)
            return answers

        @override
        def loglikelihood(self, requests: list[Any]) -> list[tuple[float, bool]]:
            task = requests[0].args[-2] if requests and len(requests[0].args) > 2 else "?"
            raise RecipeError(
                f"task {task} scores by log-likelihood; llamafactory-hera eval runs MLLM tasks that "
                "generate answers (generate_until), as every preset's"
            )

        @override
        def generate_until_multi_round(self, requests: list[Any]) -> list[str]:
            raise RecipeError("multi-round tasks are not served by llamafactory-hera eval; choose single-turn tasks")

    return LlamaFactoryLMM()


def lm_model(engine: Any, batch_size: int) -> Any:
    # lazy: the eval extra
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=engine.model, tokenizer=engine.tokenizer, batch_size=batch_size)
