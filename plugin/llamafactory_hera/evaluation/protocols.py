"""Each paper column's lmms-eval 0.7.3 benchmarks against the paper's protocol (docs/eval.md, "What each paper
reports"). Light imports."""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

MARK = "*"  # after a column computed otherwise than the paper
TEXTVQA_OCR = "textvqa_val_ocr"  # lmms-eval's textvqa_val with "Reference OCR token: ..." in the prompt
DERIVED_REVISION = "1"  # raise when a derived score changes: its tasks' caches rerun


@dataclass(frozen=True)
class Protocol:
    task: str
    metric: str
    scale: float
    aggregation: str
    paper: str
    differs: str = ""


_LLAVA = "LLaVA-1.5's model zoo row (the RAH-LoRA paper's baseline)"
_CAMBRIAN = "Cambrian-1's benchmark (the HeRA paper groups as Cambrian-1)"
_MME_SCALE = "MME-P / 20 is this project's scale: the HeRA paper does not say how it puts MME (out of 2000) on 0-100"
_MMB = (
    "lmms-eval's static choice extraction (an answer its rules cannot read counts wrong); {who} scored MMBench "
    "with ChatGPT-assisted choice extraction"
)

TABLE2_PROTOCOLS: dict[str, tuple[Protocol, ...]] = {
    "General": (
        Protocol(
            "mme",
            "mme_perception_score",
            1 / 20,
            "perception score (sum of acc and acc+ over 10 subtasks)",
            f"{_CAMBRIAN}: MME-P",
            _MME_SCALE,
        ),
        Protocol(
            "mmbench_en_dev_static",
            "gpt_eval_score",
            1.0,
            "circular accuracy on en dev, static extraction",
            f"{_CAMBRIAN}: MMBench en dev",
        ),
        Protocol(
            "seedbench",
            "seed_image",
            100.0,
            "accuracy over SEED-Bench's image questions",
            f"{_CAMBRIAN}: SEED-I (images only)",
        ),
        Protocol("gqa", "exact_match", 100.0, "exact match on testdev balanced", f"{_CAMBRIAN}: GQA"),
    ),
    "Knowledge": (
        Protocol(
            "scienceqa_img",
            "exact_match",
            100.0,
            "accuracy on ScienceQA's test questions with an image",
            f"{_CAMBRIAN}: SQA-I",
        ),
        Protocol("mmmu_val", "mmmu_acc", 100.0, "accuracy on MMMU val", f"{_CAMBRIAN}: MMMU val"),
        Protocol(
            "ai2d", "exact_match,flexible-extract", 100.0, "accuracy, flexible letter extraction", f"{_CAMBRIAN}: AI2D"
        ),
    ),
    "OCR": (
        Protocol(
            "chartqa",
            "relaxed_overall",
            100.0,
            "relaxed accuracy over the human and augmented splits",
            f"{_CAMBRIAN}: ChartQA",
        ),
        Protocol(
            "ocrbench", "ocrbench_accuracy", 100.0, "score out of 1000, divided by 1000", f"{_CAMBRIAN}: OCRBench"
        ),
        Protocol(
            "textvqa_val",
            "exact_match",
            100.0,
            "VQA accuracy on val, prompt without OCR tokens",
            f"{_CAMBRIAN}: TextVQA val",
        ),
        Protocol("docvqa_val", "anls", 100.0, "ANLS on val", f"{_CAMBRIAN}: DocVQA val"),
    ),
    "Vision": (
        Protocol(
            "cv_bench_2d",
            "cv_bench_source_mean",
            100.0,
            "mean of the accuracies on ADE20K and on COCO "
            "(computed here; the pooled cv_bench_acc stays in the per-task table)",
            f"{_CAMBRIAN}: CV-Bench 2D, the mean over its sources ADE20K and COCO",
        ),
        Protocol(
            "cv_bench_3d",
            "cv_bench_source_mean",
            100.0,
            "accuracy on Omni3D, its one source (= cv_bench_acc)",
            f"{_CAMBRIAN}: CV-Bench 3D (Omni3D)",
        ),
        Protocol("mmvp", "mmvp_accuracy", 100.0, "per-question accuracy", f"{_CAMBRIAN}: MMVP"),
        Protocol("realworldqa", "exact_match", 100.0, "accuracy", f"{_CAMBRIAN}: RealWorldQA"),
    ),
}
# columns that are not a mean of all the paper's benchmarks
TABLE2_COLUMN_NOTES = {
    "Knowledge": "the paper's Knowledge (Cambrian-1's) also averages MathVista, which the knowledge "
    "preset leaves out (a GPT judge): a mean over three benchmarks, not four"
}

RAH_PROTOCOLS: dict[str, tuple[Protocol, ...]] = {
    "VQAv2": (
        Protocol(
            "vqav2_val",
            "exact_match",
            100.0,
            "VQA accuracy on val",
            f"{_LLAVA}: VQA accuracy on test-dev",
            "test-dev is scored only by the EvalAI server; vqav2_val is the validation split lmms-eval scores locally",
        ),
    ),
    "TextVQA": (
        Protocol(
            TEXTVQA_OCR,
            "exact_match",
            100.0,
            "VQA accuracy on val, the prompt with the image's OCR tokens ('Reference OCR token: ...')",
            f"{_LLAVA}: val, prompts with OCR tokens (llava_textvqa_val_v051_ocr)",
        ),
    ),
    "GQA": (Protocol("gqa", "exact_match", 100.0, "exact match on testdev balanced", f"{_LLAVA}: testdev balanced"),),
    "POPE": (
        Protocol(
            "pope",
            "pope_f1_split_mean",
            100.0,
            "F1 on each of the adversarial, popular and random "
            "splits, answers read as LLaVA's eval_pope.py reads them, averaged (computed here; the pooled "
            "pope_f1_score stays in the per-task table)",
            f"{_LLAVA}: the mean of the three splits' F1",
        ),
    ),
    "MME": (Protocol("mme", "mme_perception_score", 1.0, "perception score, out of 2000", f"{_LLAVA}: MME-P"),),
    "MM-Bench": (
        Protocol(
            "mmbench_en_dev_static",
            "gpt_eval_score",
            1.0,
            "circular accuracy on en dev, static extraction",
            f"{_LLAVA}: MMBench, scored by MMBench's server",
            _MMB.format(who="LLaVA-1.5 (MMBench's server)"),
        ),
    ),
    "SciQA": (
        Protocol(
            "scienceqa_img",
            "exact_match",
            100.0,
            "accuracy on the test questions with an image",
            f"{_LLAVA}: ScienceQA-IMG test",
        ),
    ),
    "SEED": (
        Protocol(
            "seedbench",
            "seed_all",
            100.0,
            "accuracy over SEED-Bench's image and video questions",
            f"{_LLAVA}: SEED-Bench, image and video questions (SEED-IMG alone is another column of the zoo)",
            "a video question gets the frames lmms-eval's copy of SEED-Bench holds, as images; LLaVA-1.5 "
            "answered it on the video's middle frame",
        ),
    ),
}


def scores(protocols: dict[str, tuple[Protocol, ...]]) -> dict[str, tuple[str, float]]:
    return {p.task: (p.metric, p.scale) for column in protocols.values() for p in column}


def differences(protocols: dict[str, tuple[Protocol, ...]], column_notes: dict[str, str]) -> dict[str, str]:
    found = {}
    for column, benchmarks in protocols.items():
        said = [f"{p.task}: {p.differs}" for p in benchmarks if p.differs]
        said += [column_notes[column]] if column in column_notes else []
        if said:
            found[column] = "; ".join(said)
    return found


def described(protocols: dict[str, tuple[Protocol, ...]]) -> dict[str, list[dict[str, Any]]]:
    return {
        column: [asdict(p) | {"differs": p.differs or None} for p in benchmarks]
        for column, benchmarks in protocols.items()
    }


def llava_pope_answer(text: str) -> str:
    """An answer read as LLaVA's llava/eval/eval_pope.py does, case-sensitive: "no" when its first sentence, commas
    dropped, has the word "No", "not" or "no", else "yes" (so "NO" reads as yes, as there)."""
    words = text.split(".")[0].replace(",", "").split(" ")
    return "no" if "No" in words or "not" in words or "no" in words else "yes"


def raw_response(sample: dict[str, Any]) -> str | None:
    """A sample's answer as ``process_results`` got it, stripped as LLaVA's model_vqa_loader.py writes it."""
    responses = sample.get("filtered_resps") or []
    first = responses[0] if responses else None
    if isinstance(first, list):
        first = first[0] if first else None
    return first.strip() if isinstance(first, str) else None


def _f1(pairs: list[tuple[str, str]]) -> float:
    """F1 of "yes"; 0 without a true or predicted yes (as LLaVA, lmms-eval)."""
    tp = sum(pred == "yes" and truth == "yes" for pred, truth in pairs)
    fp = sum(pred == "yes" and truth == "no" for pred, truth in pairs)
    fn = sum(pred == "no" and truth == "yes" for pred, truth in pairs)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    return 2 * precision * recall / (precision + recall) if precision + recall else 0.0


def pope_f1_split_mean(samples: Iterable[dict[str, Any]]) -> float | None:
    """POPE as LLaVA-1.5 reports it: mean over splits (``category``) of the F1; None without samples."""
    splits: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for sample in samples:
        category = sample.get("doc", {}).get("category")
        scored = sample.get("pope_f1_score") or {}
        answer = raw_response(sample)
        if category is None or answer is None or "ground_truth" not in scored:
            return None
        splits[category].append((llava_pope_answer(answer), str(scored["ground_truth"])))
    return statistics.fmean(_f1(pairs) for pairs in splits.values()) if splits else None


def cv_bench_source_mean(samples: Iterable[dict[str, Any]]) -> float | None:
    """CV-Bench as Cambrian-1 reports it: mean of per-source accuracies; None without samples."""
    sources: dict[str, list[bool]] = defaultdict(list)
    for sample in samples:
        scored = sample.get("cv_bench_acc") or {}
        if "source" not in scored:
            return None
        sources[scored["source"]].append(bool(scored["is_correct"]))
    return statistics.fmean(sum(hits) / len(hits) for hits in sources.values()) if sources else None


# task -> (metric, function) scored from its samples; such a task keeps lmms-eval's samples
DERIVED: dict[str, tuple[tuple[str, Callable[[Iterable[dict[str, Any]]], float | None]], ...]] = {
    "pope": (("pope_f1_split_mean", pope_f1_split_mean),),
    "cv_bench_2d": (("cv_bench_source_mean", cv_bench_source_mean),),
    "cv_bench_3d": (("cv_bench_source_mean", cv_bench_source_mean),),
}


def derived_entries(task: str, samples: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    entries = []
    for metric, compute in DERIVED.get(task, ()):
        value = compute(samples.get(task) or [])
        if value is not None:
            entries.append({"task": task, "metric": metric, "value": float(value), "higher_is_better": True})
    return entries


def write_protocol_tasks(folder: Path, lmms_tasks: Path) -> None:
    """lmms-eval's ``textvqa_val`` with its off-by-default OCR option on, into ``folder``."""
    base = lmms_tasks / "textvqa" / "textvqa_val.yaml"
    (folder / f"{TEXTVQA_OCR}.yaml").write_text(
        f'include: {base}\ntask: {TEXTVQA_OCR}\nlmms_eval_specific_kwargs:\n  default:\n    pre_prompt: ""\n'
        '    post_prompt: "\\nAnswer the question using a single word or phrase."\n    ocr: true\n',
        encoding="utf-8",
    )


VARIANT_OF = {TEXTVQA_OCR: "textvqa_val"}  # task written here -> the task whose data it reads


def header(column: str, marked: dict[str, str]) -> str:
    return f"{column}{MARK}" if column in marked else column
