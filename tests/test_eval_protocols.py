"""Each column printed beside a paper's row, tied to how that paper computed it: its
lmms-eval task and metric (a metric the task's own YAML lists, or one computed here from its samples), the paper's
protocol and the difference where there is one; the scores computed here against independent references (lmms-eval's
own aggregations, LLaVA's POPE reading by hand); the TextVQA variant's prompt with OCR tokens; every shipped recipe's
backbone matched to its paper row. No model, no dataset."""

from __future__ import annotations

import random
import re
import statistics
from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import REPO
from llamafactory_hera.evaluation import protocols
from llamafactory_hera.evaluation.protocols import DERIVED, TEXTVQA_OCR, llava_pope_answer
from llamafactory_hera.evaluation.table2 import RAH_TABLE1, TABLE2, PaperTable, paper_backbone
from markdown_docs import read, section

LMMS_TASKS = Path(__import__("importlib.util").util.find_spec("lmms_eval").submodule_search_locations[0]) / "tasks"

# (table, column) -> each benchmark: (task, metric, words of the paper's protocol, words of the difference or None)
EXPECTED: dict[tuple[str, str], list[tuple[str, str, str, str | None]]] = {
    ("RAH-LoRA Table 1", "VQAv2"): [("vqav2_val", "exact_match", "test-dev", "EvalAI server")],
    ("RAH-LoRA Table 1", "TextVQA"): [(TEXTVQA_OCR, "exact_match", "OCR tokens", None)],
    ("RAH-LoRA Table 1", "GQA"): [("gqa", "exact_match", "testdev balanced", None)],
    ("RAH-LoRA Table 1", "POPE"): [("pope", "pope_f1_split_mean", "mean of the three splits' F1", None)],
    ("RAH-LoRA Table 1", "MME"): [("mme", "mme_perception_score", "MME-P", None)],
    ("RAH-LoRA Table 1", "MM-Bench"): [("mmbench_en_dev_static", "gpt_eval_score", "server", "ChatGPT-assisted")],
    ("RAH-LoRA Table 1", "SciQA"): [("scienceqa_img", "exact_match", "ScienceQA-IMG", None)],
    ("RAH-LoRA Table 1", "SEED"): [("seedbench", "seed_all", "image and video", "middle frame")],
    ("Table 2", "General"): [("mme", "mme_perception_score", "MME-P", "/ 20"),
                             ("mmbench_en_dev_static", "gpt_eval_score", "MMBench", None),
                             ("seedbench", "seed_image", "SEED-I", None), ("gqa", "exact_match", "GQA", None)],
    ("Table 2", "Knowledge"): [("scienceqa_img", "exact_match", "SQA-I", None), ("mmmu_val", "mmmu_acc", "MMMU", None),
                               ("ai2d", "exact_match,flexible-extract", "AI2D", None)],
    ("Table 2", "OCR"): [("chartqa", "relaxed_overall", "ChartQA", None), ("ocrbench", "ocrbench_accuracy",
                                                                            "OCRBench", None),
                         ("textvqa_val", "exact_match", "TextVQA", None), ("docvqa_val", "anls", "DocVQA", None)],
    ("Table 2", "Vision"): [("cv_bench_2d", "cv_bench_source_mean", "mean over its sources ADE20K and COCO", None),
                            ("cv_bench_3d", "cv_bench_source_mean", "Omni3D", None),
                            ("mmvp", "mmvp_accuracy", "MMVP", None), ("realworldqa", "exact_match", "RealWorldQA",
                                                                      None)],
}
TABLES = {TABLE2.title: TABLE2, RAH_TABLE1.title: RAH_TABLE1}


def _task_metrics(task: str) -> set[str]:
    """The metrics ``task``'s lmms-eval YAML lists (the variant written here: its base task's), read as lmms-eval
    reads it (includes followed, functions not imported)."""
    from lmms_eval.utils import load_yaml_config

    base = protocols.VARIANT_OF.get(task, task)
    found = sorted(LMMS_TASKS.glob(f"*/{base}.yaml"))
    assert found, task
    return {entry["metric"] for entry in load_yaml_config(str(found[0]), mode="simple")["metric_list"]}


@pytest.mark.parametrize(("title", "column"), list(EXPECTED))
def test_each_papers_column_is_tied_to_its_protocol(title: str, column: str) -> None:
    table: PaperTable = TABLES[title]
    benchmarks = table.protocols[column]
    assert [(p.task, p.metric) for p in benchmarks] == [(task, metric) for task, metric, *_ in EXPECTED[title, column]]
    assert table.columns[column] == tuple(p.task for p in benchmarks)
    for protocol, (task, metric, paper, differs) in zip(benchmarks, EXPECTED[title, column], strict=True):
        assert table.scores[task][0] == metric and paper in protocol.paper, (task, protocol.paper)
        derived = [name for name, _ in DERIVED.get(task, ())]
        assert metric.split(",")[0] in _task_metrics(task) | set(derived), (task, metric)
        assert (differs is None) == (not protocol.differs) and (differs or "") in protocol.differs
    marked = any(differs for *_, differs in EXPECTED[title, column]) or column == "Knowledge"  # MathVista missing
    assert (column in table.differs) == marked


def test_pope_is_averaged_per_split_as_llava_reads_answers() -> None:
    """Against lmms-eval's own F1 per split (its answers already read as LLaVA's eval_pope.py reads them, by hand),
    averaged; the pooled F1 differs."""
    from lmms_eval.tasks.pope.utils import pope_aggregate_f1_score

    for said, read_as in (("Yes", "yes"), ("yes, there is a dog.", "yes"), ("No.", "no"), ("no", "no"),
                          ("There is not a cat. No doubt", "no"), ("Nope", "yes"), ("nothing", "yes"),
                          ("Yes. No", "yes"), ("No, there is none", "no"), ("NO", "yes"), ("Not really", "yes"),
                          ("There is no dog.", "no"), ("Yes.", "yes")):
        assert llava_pope_answer(said) == read_as, said  # eval_pope.py is case-sensitive: "NO", "Not" are not no
    rng = random.Random(0)
    samples, by_hand = [], {}
    for category, bias in (("adversarial", 0.3), ("popular", 0.5), ("random", 0.8)):
        results = []
        for index in range(60 if category != "random" else 90):  # splits of unequal size: the mean is not pooled
            truth = rng.choice(["yes", "no"])
            said = rng.choice(["Yes", "No", "yes, there is one.", "There is not.", "no", "NO", "Not really"]
                              if rng.random() < bias else [truth.capitalize()])
            samples.append({"doc": {"category": category, "question_id": index}, "filtered_resps": [f" {said}\n"],
                            "pope_f1_score": {"prediction": said.lower().strip(), "ground_truth": truth}})
            results.append({"prediction": "no" if said in ("No", "no", "There is not.") else "yes",
                            "ground_truth": truth})
        by_hand[category] = pope_aggregate_f1_score(results)
    assert protocols.pope_f1_split_mean(samples) == pytest.approx(statistics.fmean(by_hand.values()))
    pooled = pope_aggregate_f1_score([{"prediction": llava_pope_answer(s["filtered_resps"][0].strip()),
                                       "ground_truth": s["pope_f1_score"]["ground_truth"]} for s in samples])
    assert abs(protocols.pope_f1_split_mean(samples) - pooled) > 1e-4
    lowered = [{**s, "filtered_resps": [s["pope_f1_score"]["prediction"]]} for s in samples]
    assert protocols.pope_f1_split_mean(lowered) != pytest.approx(protocols.pope_f1_split_mean(samples))
    assert protocols.pope_f1_split_mean([]) is None
    assert protocols.pope_f1_split_mean([{"doc": {}, "pope_f1_score": {"prediction": "yes"}}]) is None
    assert protocols.pope_f1_split_mean([{"doc": {"category": "random"}, "pope_f1_score": {
        "prediction": "yes", "ground_truth": "yes"}}]) is None  # no raw answer: not read from the lower-cased one


def test_cv_bench_is_averaged_over_its_sources_as_cambrian() -> None:
    """Half the 2D source mean plus half the 3D one is lmms-eval's (unused) copy of Cambrian-1's CV-Bench formula."""
    from lmms_eval.tasks.cv_bench.utils import cv_bench_aggregate_results, cv_bench_default_aggregate_results

    rng = random.Random(1)

    def samples(source: str, count: int, right: float) -> list[dict[str, Any]]:
        return [{"cv_bench_acc": {"source": source, "is_correct": rng.random() < right}} for _ in range(count)]

    two_d, three_d = samples("ADE20K", 70, 0.4) + samples("COCO", 30, 0.9), samples("Omni3D", 50, 0.6)
    mean_2d, mean_3d = protocols.cv_bench_source_mean(two_d), protocols.cv_bench_source_mean(three_d)
    combined = [s["cv_bench_acc"] for s in two_d + three_d]
    assert (mean_2d + mean_3d) / 2 == pytest.approx(cv_bench_default_aggregate_results(combined))
    assert mean_3d == pytest.approx(cv_bench_aggregate_results([s["cv_bench_acc"] for s in three_d]))  # one source
    assert abs(mean_2d - cv_bench_aggregate_results([s["cv_bench_acc"] for s in two_d])) > 0.05  # pooled differs


def test_the_runner_keeps_samples_only_for_derived_scores(monkeypatch: pytest.MonkeyPatch) -> None:
    """``run_library`` asks lmms-eval for the samples of a task scored here and adds the score to lmms-eval's."""
    from lmms_eval import evaluator

    from llamafactory_hera.evaluation import libraries, runner
    from llamafactory_hera.evaluation.presets import LMMS, PlannedTask

    asked = {}

    def simple_evaluate(**kwargs: Any) -> dict[str, Any]:
        asked[kwargs["tasks"][0]] = kwargs["log_samples"]
        sample = {"doc": {"category": "random"}, "filtered_resps": ["Yes"],
                  "pope_f1_score": {"prediction": "yes", "ground_truth": "yes"}}
        return {"results": {kwargs["tasks"][0]: {"pope_f1_score,none": 0.5}}, "samples": {"pope": [sample]}}

    monkeypatch.setattr(evaluator, "simple_evaluate", simple_evaluate)
    monkeypatch.setattr(libraries, "task_manager", lambda *_: None)
    entries = libraries.run_library(None, PlannedTask("pope", LMMS, "Hallucination"), None)
    assert [(e["metric"], e["value"]) for e in entries] == [("pope_f1_score", 0.5), ("pope_f1_split_mean", 1.0)]
    assert [e["metric"] for e in libraries.run_library(None, PlannedTask("gqa", LMMS, "General"), None)] == [
        "pope_f1_score"]
    assert asked == {"pope": True, "gqa": False}
    assert runner.task_revision(PlannedTask("pope", LMMS, "x")).endswith(f"+derived{protocols.DERIVED_REVISION}")
    assert "+derived" not in runner.task_revision(PlannedTask("gqa", LMMS, "x"))


def test_the_textvqa_variant_asks_with_ocr_tokens_as_llava(tmp_path: Path) -> None:
    """LLaVA-1.5's TextVQA prompt: the question, the OCR tokens, the short-answer instruction; the variant reads
    textvqa_val's data, split and metrics."""
    from lmms_eval.utils import load_yaml_config

    protocols.write_protocol_tasks(tmp_path, LMMS_TASKS)
    config = load_yaml_config(str(tmp_path / f"{TEXTVQA_OCR}.yaml"), mode="full")
    base = load_yaml_config(str(LMMS_TASKS / "textvqa" / "textvqa_val.yaml"), mode="simple")
    assert config["task"] == TEXTVQA_OCR
    assert (config["dataset_path"], config["test_split"]) == (base["dataset_path"], base["test_split"])
    doc = {"question": "what brand is the camera?", "ocr_tokens": ["dakota", "digital"]}
    prompt = config["doc_to_text"](doc, config["lmms_eval_specific_kwargs"]["default"])
    assert prompt == ("What brand is the camera?\nReference OCR token: dakota, digital\nAnswer the question using a "
                      "single word or phrase.")


def _recipe_names(path: Path) -> list[str | None]:
    """What :func:`.table2.table2` matches a run of the recipe by: the composed LLM (a llava15 chain's `compose
    --llm`, in its header), then its model_name_or_path."""
    text = path.read_text(encoding="utf-8")
    llm = re.search(r"compose --llm (\S+)", text)
    return [llm.group(1) if llm else None, yaml.safe_load(text)["model_name_or_path"]]


TABLE2_LLMS = {"llama3_8b": "LLaMA3-8B", "qwen2_5_14b": "Qwen2.5-14B", "qwen2_5_3b": "Qwen2.5-3B",
               "qwen2_5_7b": "Qwen2.5-7B", "qwen3_14b": "Qwen3-14B", "qwen3_4b": "Qwen3-4B", "qwen3_8b": "Qwen3-8B",
               "vicuna_13b": "Vicuna-13B", "vicuna_7b": "Vicuna-7B"}
# recipe -> (Table 2 backbone, RAH-LoRA Table 1 backbone); the HeRA fine-tunes of an existing MLLM are no Table 2 run
# (the paper's secondary setting), though LLaVA-1.5's are the base of RAH-LoRA's rows; Qwen2.5-VL has no RAH row
RECIPES = {**{f"llava15/{llm}_stage{s}.yaml": (backbone, None) for llm, backbone in TABLE2_LLMS.items()
              for s in (1, 2)},
           "vicuna_7b_rah.yaml": (None, "LLaVA-1.5-7B"), "vicuna_13b_rah.yaml": (None, "LLaVA-1.5-13B"),
           "qwen2_5_7b_rah.yaml": (None, None),
           **{f"vicuna_{size}_hera{kind}.yaml": (None, f"LLaVA-1.5-{size.upper()}") for size in ("7b", "13b")
              for kind in ("", "_full")}, "vicuna_7b_hera_stage1.yaml": (None, "LLaVA-1.5-7B")}


def test_every_shipped_recipes_backbone_is_matched_to_its_paper_row() -> None:
    recipes = {path: yaml.safe_load(path.read_text(encoding="utf-8")) or {} for path in
               (REPO / "recipes").rglob("*.yaml")}
    shipped = {str(path.relative_to(REPO / "recipes")) for path, recipe in recipes.items()  # HARC's: text runs
               if "model_name_or_path" in recipe and recipe.get("stage") != "harc"}
    for name in shipped:
        names = _recipe_names(REPO / "recipes" / name)
        found = tuple((paper_backbone(names, table) or (None,))[0] for table in (TABLE2, RAH_TABLE1))
        assert found == RECIPES.get(name, (None, None)), name
    assert {RECIPES[name][0] for name in RECIPES} - {None} == set(TABLE2_LLMS.values())  # all 9 Table 2 rows
    assert {RECIPES[name][1] for name in RECIPES} - {None} == {"LLaVA-1.5-7B", "LLaVA-1.5-13B"}
    assert set(RECIPES) <= shipped


def test_the_docs_table_names_each_column_and_difference() -> None:
    text = section(read("docs/eval.md"), "What each paper reports")
    for table in (TABLE2, RAH_TABLE1):
        for column, benchmarks in table.protocols.items():
            for protocol in benchmarks:
                assert f"`{protocol.task}`" in text and f"`{protocol.metric}`" in text, (column, protocol.task)
    for words in ("POPE", "CHAIR", "AMBER", "HallusionBench", "MathVista", "test-dev", "middle frame", "OCR tokens",
                  "ADE20K", "per split", "MME-P / 20", "never name POPE"):
        assert words in text, words
