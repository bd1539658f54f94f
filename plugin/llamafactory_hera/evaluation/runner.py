"""``llamafactory-hera eval``'s runs: a model loads once and serves every task. A task's result, ``{"entries":
[{"task", "metric", "value", "higher_is_better"}], "seconds", "library", "version", "task_revision"}``, is cached when
finished in ``RUN_DIR/eval_cache/<model key>/<task>.json``."""

from __future__ import annotations

import gc
import hashlib
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from llamafactory_hera.evaluation import demo_tasks
from llamafactory_hera.evaluation import jailbreak as jailbreak_module
from llamafactory_hera.evaluation.jailbreak import JailbreakSetup, run_jailbreak
from llamafactory_hera.evaluation.libraries import lm_model, lmms_model, run_library
from llamafactory_hera.evaluation.presets import (
    DEMO_MLLM_TASK,
    DEMO_TEXT_TASK,
    JAILBREAK,
    LM,
    LMMS,
    MODULES,
    REFUSAL,
    REFUSAL_TASK,
    PlannedTask,
)
from llamafactory_hera.evaluation.protocols import DERIVED, DERIVED_REVISION
from llamafactory_hera.evaluation.runs import ModelSpec
from llamafactory_hera.harc.config import parse_harc_arguments
from llamafactory_hera.runtime.log import progress_once, say_once
from llamafactory_hera.runtime.run_record import read_record, write_record
from llamafactory_hera.training.eval_forward import keep_4bit_layout
from llamafactory_hera_patches.guard import host_version
from llamafactory_hera_patches.tools import inference

CACHE_DIR = "eval_cache"
PIN = "CUDA_VISIBLE_DEVICES=0 llamafactory-hera eval ..."


def run_refusal(engine: Any, rows_from: ModelSpec, limit: int | None) -> list[dict[str, Any]]:
    """HARC's end-of-run refusal check on ``rows_from``'s held-out rows (training's seeded split)."""
    # lazy: transformers and the host's loaders, only for HARC's refusal task
    from llamafactory_hera.harc.evaluate import generate_answers, refusal_record, stop_ids
    from llamafactory_hera.harc.roles import load_role_rows
    from llamafactory_hera_patches.tools.model_data import load_aligned_rows, parse_recipe

    harc_args = parse_harc_arguments(dict(rows_from.harc))
    recipe = parse_recipe({**rows_from.recipe, "stage": "sft"})
    rows = load_role_rows(
        harc_args,
        lambda name: load_aligned_rows(recipe, rows_from.seed, [name]),
        engine.template,
        engine.tokenizer,
        rows_from.seed,
        say_once,
    )

    def answers(chosen: list[Any]) -> list[str]:
        chosen = chosen[:limit] if limit else chosen
        return generate_answers(
            engine.model,
            engine.tokenizer,
            [row.prompt_ids for row in chosen],
            harc_args.harc_eval_max_new_tokens,
            harc_args.harc_extract_batch_size,
            stop_ids(engine.tokenizer, engine.template),
            progress_once,
            "refusal: generating",
        )

    record = refusal_record(answers(rows.validate_harmful), answers(rows.eval_pseudo))
    return [
        {"task": REFUSAL_TASK, "metric": metric, "value": record[metric], "higher_is_better": better}
        for metric, better in (("refusal_rate_harmful", True), ("refusal_rate_pseudo", False))
    ]


def task_revision(task: PlannedTask, jailbreak: JailbreakSetup | None = None) -> str:
    if task.library == JAILBREAK:
        return (jailbreak or JailbreakSetup()).revision()
    if task.library == REFUSAL:  # HARC's matcher and greedy generation
        return "refusal:" + hashlib.sha256(jailbreak_module.MATCHER_SOURCE.read_bytes()).hexdigest()[:16]
    if task.name in (DEMO_MLLM_TASK, DEMO_TEXT_TASK):
        return "demo:" + hashlib.sha256(Path(demo_tasks.__file__).read_bytes()).hexdigest()[:16]
    library = MODULES.get(task.library, "llamafactory-hera")
    derived = f"+derived{DERIVED_REVISION}" if task.name in DERIVED else ""
    return f"{library}=={host_version(library)}{derived}"


def device_note() -> str | None:
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count <= 1:
        return None
    return (
        f"eval: {count} GPUs visible: the model is loaded with device_map: auto, split across all {count} (a "
        f"pipeline, one GPU at work at a time); a model that fits one GPU runs faster pinned to it: {PIN}"
    )


def load_engine(spec: ModelSpec) -> Any:
    """4-bit layers kept in their layout: GCG backpropagates (training/eval_forward.py)."""
    engine = inference.load_engine(spec.recipe)
    keep_4bit_layout(engine.model)
    return engine


def run_task(
    engine: Any,
    spec: ModelSpec,
    rows_from: ModelSpec,
    task: PlannedTask,
    limit: int | None,
    batch_size: int,
    jailbreak: JailbreakSetup | None = None,
    cache_dir: Path | None = None,
) -> dict[str, Any]:
    started = time.perf_counter()
    extra: dict[str, Any] = {}
    if task.library == LMMS:
        entries = run_library(lmms_model(engine, spec.label), task, limit)
    elif task.library == LM:
        entries = run_library(lm_model(engine, batch_size), task, limit)
    elif task.library == JAILBREAK:
        # lazy: transformers, only for HARC's refusal task
        from llamafactory_hera.harc.evaluate import stop_ids

        extra = run_jailbreak(
            engine,
            rows_from,
            jailbreak or JailbreakSetup(),
            limit,
            batch_size,
            stop_ids(engine.tokenizer, engine.template),
            cache_dir / "gcg_suffixes" if cache_dir is not None else None,
        )
        entries = extra.pop("entries")
    else:
        entries = run_refusal(engine, rows_from, limit)
    if not entries:
        raise ValueError(f"task {task.name}: {task.library} returned no metric")
    return {
        "entries": entries,
        "seconds": round(time.perf_counter() - started, 3),
        "library": task.library,
        "version": host_version(MODULES.get(task.library, "llamafactory-hera")),
        "task_revision": task_revision(task, jailbreak),
        **extra,
    }


@dataclass
class Outcome:
    spec: ModelSpec
    results: dict[str, dict[str, Any]] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)
    cached: list[str] = field(default_factory=list)

    @property
    def precision(self) -> str:
        return next((r["precision"] for r in self.results.values() if r.get("precision")), "not recorded")


def cache_file(run_dir: Path, spec: ModelSpec, task: str) -> Path:
    return run_dir / CACHE_DIR / spec.cache_key() / f"{task.replace('/', '_')}.json"


def cached_result(
    run_dir: Path, spec: ModelSpec, task: PlannedTask, limit: int | None, jailbreak: Any = None
) -> dict[str, Any] | None:
    hit = read_record(cache_file(run_dir, spec, task.name))  # {}: absent or torn
    if hit and hit.get("limit") == limit and hit.get("task_revision") == task_revision(task, jailbreak):
        return hit
    return None


def evaluate_model(
    spec: ModelSpec,
    rows_from: ModelSpec,
    tasks: list[PlannedTask],
    run_dir: Path,
    limit: int | None,
    batch_size: int,
    say: Any,
    jailbreak: Any = None,
) -> Outcome:
    """A failed task is recorded and the next one runs."""
    outcome = Outcome(spec)
    engine = None
    for task in tqdm(tasks, desc=f"eval {spec.label}: {spec.title}", unit="task"):
        path = cache_file(run_dir, spec, task.name)
        hit = cached_result(run_dir, spec, task, limit, jailbreak)
        if hit is not None:
            outcome.results[task.name] = hit
            outcome.cached.append(task.name)
            continue
        try:
            if engine is None:
                note = device_note()
                if note:
                    say(note)
                say(f"eval: loading the {spec.label} model ({_describe(spec)})")
                engine = load_engine(spec)
                say(f"eval: the {spec.label} model is evaluated in {precision(engine.model)}")
            result = run_task(engine, spec, rows_from, task, limit, batch_size, jailbreak, cache_dir=path.parent)
        except Exception as err:  # noqa: BLE001 - one task's failure must not lose the others' results
            line = _one_line(err)
            outcome.failures[task.name] = line
            say(f"eval: {task.name} failed on the {spec.label} model: {line}")
            (run_dir / CACHE_DIR).mkdir(parents=True, exist_ok=True)
            (run_dir / CACHE_DIR / "last_failure.txt").write_text(traceback.format_exc(), encoding="utf-8")
            continue
        result = {
            **result,
            "limit": limit,
            "task": task.name,
            "group": task.group,
            "model": _describe(spec),
            "precision": precision(engine.model),
        }
        write_record(path, result)
        outcome.results[task.name] = result
    del engine
    gc.collect()
    return outcome


def precision(model: Any) -> str:
    """``model``'s dtype, after its quantization if any (``4-bit bitsandbytes nf4, float32 compute``)."""
    dtype = str(getattr(model, "dtype", "")).removeprefix("torch.")
    config = getattr(getattr(model, "config", None), "quantization_config", None)
    if config is None:
        return dtype
    held = config if isinstance(config, dict) else config.to_dict()
    bits = 4 if held.get("load_in_4bit") else 8 if held.get("load_in_8bit") else held.get("bits")
    method = getattr(held.get("quant_method"), "value", held.get("quant_method"))
    words = (f"{bits}-bit" if bits else "quantized", method, held.get("bnb_4bit_quant_type") if bits == 4 else None)
    return " ".join(str(word) for word in words if word) + f", {dtype} compute"


def _one_line(err: BaseException) -> str:
    """A retry wrapper's (lmms-eval's download) last caught error in one line."""
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
