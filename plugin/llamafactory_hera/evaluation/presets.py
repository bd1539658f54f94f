"""``llamafactory-hera eval``'s task presets (docs/eval.md, "Task presets"). Light imports."""

from __future__ import annotations

import difflib
import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from llamafactory_hera.evaluation.protocols import VARIANT_OF
from llamafactory_hera.evaluation.task_data import Dataset, fetch_command, is_cached, offline, task_datasets
from llamafactory_hera.runtime.errors import RecipeError

LMMS = "lmms-eval"
LM = "lm-eval"
REFUSAL = "refusal"
JAILBREAK = "jailbreak"
MODULES = {LMMS: "lmms_eval", LM: "lm_eval"}  # import names
DEMO_MLLM_TASK = "llamafactory_hera_demo_mllm"
DEMO_TEXT_TASK = "llamafactory_hera_demo_text"
REFUSAL_TASK = "harc_refusal"


@dataclass(frozen=True)
class Preset:
    name: str
    group: str
    modality: str
    tasks: tuple[str, ...]
    holds: str  # as the README says


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            "vision-centric",
            "Vision-Centric",
            "mllm",
            ("cv_bench_2d", "cv_bench_3d", "mmvp", "realworldqa"),
            "CV-Bench 2D and 3D, MMVP, RealWorldQA",
        ),
        # every preset runs without an API key: MMBench by static choice extraction (mmbench_en_dev asks GPT); no
        # MathVista (GPT judge, 16k-token answers) or HallusionBench (ChatGPT judge)
        Preset(
            "general",
            "General",
            "mllm",
            ("mme", "mmbench_en_dev_static", "seedbench", "gqa"),
            "MME, MMBench (en dev, static choice extraction), SEED-Bench (image), GQA",
        ),
        Preset(
            "knowledge",
            "Knowledge",
            "mllm",
            ("scienceqa_img", "mmmu_val", "ai2d"),
            "ScienceQA (image), MMMU (val), AI2D",
        ),
        Preset(
            "ocr",
            "OCR & Chart",
            "mllm",
            ("chartqa", "ocrbench", "textvqa_val", "docvqa_val"),
            "ChartQA, OCRBench, TextVQA (val), DocVQA (val)",
        ),
        # scored without a key (HallusionBench asks GPT-4); AMBER's discriminative part has no task, so POPE
        # (RAH-LoRA's, not HeRA's) is the yes/no benchmark
        Preset(
            "hallucination",
            "Hallucination",
            "mllm",
            ("pope", "coco_cap_chair", "amber_g"),
            "POPE (adversarial, popular, random), CHAIR on MSCOCO captions, AMBER (generative)",
        ),
        # RAH-LoRA's Table 1 in column order (why VQAv2 val, TextVQA with OCR tokens: .protocols)
        Preset(
            "rah",
            "RAH-LoRA Table 1",
            "mllm",
            (
                "vqav2_val",
                "textvqa_val_ocr",
                "gqa",
                "pope",
                "mme",
                "mmbench_en_dev_static",
                "scienceqa_img",
                "seedbench",
            ),
            "RAH-LoRA's Table 1: VQAv2 (val), TextVQA (val, OCR tokens in the prompt), GQA, POPE, MME, MMBench (en "
            "dev, static choice extraction), ScienceQA (image), SEED-Bench (image and video)",
        ),
        Preset(
            "capability",
            "Capability",
            "text",
            ("mmlu", "arc_easy", "arc_challenge", "hellaswag", "winogrande"),
            "MMLU, ARC-Easy, ARC-Challenge, HellaSwag, WinoGrande (lm-eval)",
        ),
        Preset(
            "refusal",
            "Refusal",
            "text",
            (REFUSAL_TASK,),
            "HARC's refusal rates on the recipe's held-out harmful prompts (should rise) and pseudo-harmful prompts "
            "(over-refusal, should stay low); HARC runs only",
        ),
        Preset(
            "jailbreak",
            "Jailbreak",
            "text",
            (JAILBREAK,),
            "attack success rates (lower is better) of direct, prefilling and template jailbreaks on a HARC run's "
            "held-out harmful prompts or --prompts FILE, plus refusal for HARC runs (over-refusal: the trade-off's "
            "usability)",
        ),
    )
}
DEMO = "demo"
DEMO_HOLDS = (
    "offline: 8 multiple-choice questions on procedural shape images (MLLMs, lmms-eval) or 8 multiple-choice "
    "text questions (text models, lm-eval), plus refusal for HARC runs"
)
ALL_PRESETS = (*PRESETS, DEMO)


@dataclass(frozen=True)
class PlannedTask:
    name: str
    library: str
    group: str


def library_of(task: str, modality: str) -> str:
    return {REFUSAL_TASK: REFUSAL, JAILBREAK: JAILBREAK}.get(task, LMMS if modality == "mllm" else LM)


def _group_of(task: str) -> str:
    return next(
        (p.group for p in PRESETS.values() if task in p.tasks),
        "Other" if task != DEMO_MLLM_TASK and task != DEMO_TEXT_TASK else "Demo",
    )


def plan_tasks(spec: str, modality: str, stage: str, known: set[str] | None) -> list[PlannedTask]:
    """``--tasks`` -> the tasks in order, without repeats; ``known`` (None: not checked): the library's task and
    group names."""
    items = [item.strip() for item in spec.split(",") if item.strip()]
    if not items:
        raise RecipeError(f"--tasks: empty; give presets ({', '.join(ALL_PRESETS)}) or task names, comma-separated")
    planned: list[PlannedTask] = []
    # a HARC run's demo and jailbreak add harc_refusal: over-refusal, the trade-off's usability
    refusal = [REFUSAL_TASK] if stage == "harc" else []
    for item in items:
        if item == DEMO:
            names = [DEMO_MLLM_TASK] if modality == "mllm" else [DEMO_TEXT_TASK, *refusal]
        elif item in PRESETS:
            preset = PRESETS[item]
            if preset.modality != modality:
                fits = [p.name for p in PRESETS.values() if p.modality == modality]
                raise RecipeError(
                    f"--tasks: preset '{item}' is for {preset.modality} models but this run's model is "
                    f"a {modality} model; use {', '.join([*fits, DEMO])}"
                )
            names = [JAILBREAK, *refusal] if item == JAILBREAK else list(preset.tasks)
        else:
            preset_typo = difflib.get_close_matches(item, ALL_PRESETS, n=1, cutoff=0.8)
            if preset_typo and item not in (known or ()):  # a misspelt preset, without the registry
                raise RecipeError(
                    f"--tasks: unknown preset or task '{item}'; did you mean {preset_typo[0]}? presets: "
                    f"{', '.join(ALL_PRESETS)}"
                )
            if item != REFUSAL_TASK and known is not None and item not in known:
                close = difflib.get_close_matches(item, [*ALL_PRESETS, *sorted(known)], n=4, cutoff=0.6)
                hint = f"did you mean {', '.join(close)}? " if close else ""
                raise RecipeError(
                    f"--tasks: unknown preset or task '{item}'; {hint}presets: {', '.join(ALL_PRESETS)}; "
                    f"tasks: any {library_of(item, modality)} task name"
                )
            names = [item]
        if REFUSAL_TASK in names and stage != "harc":
            raise RecipeError(
                f"--tasks: '{item}' needs a stage: harc run (its held-out harmful and pseudo-harmful "
                f"rows); this run's stage is '{stage}'"
            )
        planned.extend(
            PlannedTask(name, library_of(name, modality), _group_of(name))
            for name in names
            if name not in {t.name for t in planned}
        )
    return planned


# preset tasks whose scoring needs what lmms-eval 0.7.3 does not install (docs/eval.md, "Hallucination")
AMBER_FILES = ("relation.json", "safe_words.txt", "annotations.json", "metrics.txt")
NLTK_DATA = {
    "punkt_tab": "tokenizers/punkt_tab",
    "wordnet": "corpora/wordnet",
    "averaged_perceptron_tagger_eng": "taggers/averaged_perceptron_tagger_eng",
}


def _nltk_missing() -> list[str]:
    if importlib.util.find_spec("nltk") is None:
        return ["NLTK (pip install 'llamafactory-hera[eval]')"]
    # lazy: the eval extra's, found above
    import nltk

    absent = []
    for name, path in NLTK_DATA.items():
        try:
            nltk.data.find(path)
        except LookupError:
            try:
                nltk.data.find(f"{path}.zip")
            except LookupError:
                absent.append(name)
    return [f"NLTK's {', '.join(absent)} (python -m nltk.downloader {' '.join(absent)})"] if absent else []


def _amber_missing() -> list[str]:
    missing = [] if importlib.util.find_spec("spacy") else ["spaCy (pip install 'llamafactory-hera[eval]')"]
    if not any(importlib.util.find_spec(model) for model in ("en_core_web_md", "en_core_web_sm", "en_core_web_lg")):
        missing.append("a spaCy English model (python -m spacy download en_core_web_md)")
    metadata = Path(os.environ.get("AMBER_BASE_DIR", "./data/amber")) / "metadata"
    absent = [name for name in AMBER_FILES if not (metadata / name).is_file()]
    if absent:
        missing.append(
            f"AMBER's {', '.join(absent)} in {metadata} (from the data folder of "
            "https://github.com/junyangwang0410/AMBER; AMBER_BASE_DIR sets where)"
        )
    return missing


# CHAIR's and AMBER's data in one command, run where eval runs (AMBER_BASE_DIR's default, ./data/amber)
SCORER_DATA = (
    "python -m nltk.downloader punkt_tab averaged_perceptron_tagger_eng wordnet && python -m spacy download "
    "en_core_web_md && git clone --depth 1 https://github.com/junyangwang0410/AMBER /tmp/AMBER && mkdir -p "
    "data/amber/metadata && cp " + " ".join(f"/tmp/AMBER/data/{name}" for name in AMBER_FILES) + " data/amber/metadata/"
)
SETUP_CHECKS = {"coco_cap_chair": lambda: _nltk_missing(), "amber_g": lambda: _amber_missing() + _nltk_missing()}


def _datasets_missing(planned: list[PlannedTask], cached: Callable[[PlannedTask], bool]) -> tuple[list[str], str]:
    """Offline: the tasks whose datasets are not cached, and a clause with the command fetching them."""
    said = offline()
    if not said:
        return [], ""
    missing: dict[str, list[tuple[Dataset, Path, bool]]] = {}
    for task in planned:
        module = MODULES.get(task.library)
        if module is None or cached(task):
            continue
        absent = [
            (dataset, cache, named)
            for dataset, cache, named in task_datasets(VARIANT_OF.get(task.name, task.name), module)
            if not is_cached(dataset, cache)
        ]
        if absent:
            missing[task.name] = absent
    if not missing:
        return [], ""
    caches = dict.fromkeys(str(cache) for absent in missing.values() for _, cache, _ in absent)
    listed = ", ".join(
        f"{name} ({'; '.join(', '.join(part for part in dataset if part) for dataset, _, _ in absent)})"
        for name, absent in missing.items()
    )
    clause = f"offline ({said}), the datasets cache ({', '.join(caches)}) lacks the dataset of {listed}"
    return list(missing), f"{clause}. Fetch them once with network access: " + fetch_command(
        [entry for absent in missing.values() for entry in absent]
    )


def check_task_setup(planned: list[PlannedTask], cached: Callable[[PlannedTask], bool] = lambda task: False) -> None:
    """Before any model loads, refuse tasks that cannot run here."""
    scorers = {task.name: SETUP_CHECKS[task.name]() for task in planned if task.name in SETUP_CHECKS}
    scorers = {name: missing for name, missing in scorers.items() if missing}
    datasets, fetch = _datasets_missing(planned, cached)
    said = [f"{name} needs {', '.join(missing)}" for name, missing in scorers.items()]
    said += [f"set them up with pip install 'llamafactory-hera[eval]' and {SCORER_DATA}"] if scorers else []
    said += [fetch] if fetch else []
    if said:
        rest = ",".join(task.name for task in planned if task.name not in {*scorers, *datasets})
        leave = f"or leave them out: --tasks {rest}" if rest else "no task of --tasks can run here until then"
        raise RecipeError(f"--tasks: {'; '.join(said)}; {leave}")
