"""``llamafactory-hera eval RUN --baseline TWIN --tasks general,knowledge,ocr,vision-centric`` scored as the paper's
Table 2: the group means and Delta Vision, the paper's published rows for a backbone of Table 2
(none for another), and the stage chain each run record holds, read from the records a compose and two runs left.
``--tasks rah`` scored as RAH-LoRA's Table 1: its columns in the paper's order, and the paper's
LLaVA-1.5-7B rows beside them for a run of that model only.

In-process, no model: the evaluation loop is replaced by fixed per-task scores."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from test_eval_reports import evaluate_scored

from llamafactory_hera.evaluation.presets import PRESETS
from llamafactory_hera.evaluation.report import _marked_metrics
from llamafactory_hera.evaluation.runs import read_pair
from llamafactory_hera.evaluation.table2 import (
    GROUPS,
    PAPER_FILE,
    RAH_PAPER_FILE,
    RAH_TABLE1,
    SCORES,
    group_means,
    paper_backbone,
)
from llamafactory_hera.runtime import run_record
from markdown_docs import read, section

TASKS = "general,knowledge,ocr,vision-centric"
# each task's scores as lmms-eval reports them (fractions, MME out of 2000, MMBench in percent), plus metrics the
# layout must not average (MME cognition, MMVP pairs, SEED video, ChartQA's human split)
RUN = {"mme": {"mme_perception_score": 1500.0, "mme_cognition_score": 300.0},
       "mmbench_en_dev_static": {"gpt_eval_score": 70.0},
       "seedbench": {"seed_image": 0.65, "seed_video": 0.4, "seed_all": 0.6},
       "gqa": {"exact_match": 0.6}, "scienceqa_img": {"exact_match": 0.7}, "mmmu_val": {"mmmu_acc": 0.4},
       "ai2d": {"exact_match,flexible-extract": 0.7}, "chartqa": {"relaxed_overall": 0.5, "relaxed_human_split": 0.9},
       "ocrbench": {"ocrbench_accuracy": 0.4}, "textvqa_val": {"exact_match": 0.6}, "docvqa_val": {"anls": 0.7},
       "cv_bench_2d": {"cv_bench_acc": 0.62, "cv_bench_source_mean": 0.6},  # Cambrian-1's source mean is read
       "cv_bench_3d": {"cv_bench_acc": 0.7, "cv_bench_source_mean": 0.7},
       "mmvp": {"mmvp_accuracy": 0.5, "mmvp_pair_accuracy": 0.2}, "realworldqa": {"exact_match": 0.6},
       "vqav2_val": {"exact_match": 0.75}, "textvqa_val_ocr": {"exact_match": 0.62},
       "pope": {"pope_accuracy": 0.8, "pope_f1_score": 0.85, "pope_f1_split_mean": 0.86}}  # LLaVA's per-split mean
TWIN = {**RUN, "cv_bench_2d": {"cv_bench_acc": 0.52, "cv_bench_source_mean": 0.5},
        "cv_bench_3d": {"cv_bench_acc": 0.6, "cv_bench_source_mean": 0.6}, "realworldqa": {"exact_match": 0.55}}
# the same means by hand: every score on 0-100, MME-P / 2000
GENERAL = (1500 / 2000 * 100 + 70.0 + 65.0 + 60.0) / 4  # 67.5
KNOWLEDGE = (70.0 + 40.0 + 70.0) / 3  # 60.0
OCR = (50.0 + 40.0 + 60.0 + 70.0) / 4  # 55.0
VISION = (60.0 + 70.0 + 50.0 + 60.0) / 4  # 60.0
TWIN_VISION = (50.0 + 60.0 + 50.0 + 55.0) / 4  # 53.75


def _trained(folder: Path, stage: str, model: Path) -> Path:
    """A finished full run of ``stage`` from ``model``, its record written as training writes it."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"vision_config": {}}), encoding="utf-8")
    path = run_record.write_started(folder, stage, {"model_name_or_path": str(model), "template": "qwen3_llava"})
    run_record.write_ended(path, None)
    return folder


def _chains(tmp_path: Path, llm: str) -> tuple[Path, Path]:
    """compose (``llm`` + SigLIP2) -> HeRA stage 1 -> HeRA stage 2, and its SFT twin of both stages."""
    composed = tmp_path / "composed"
    composed.mkdir()
    (composed / run_record.COMPOSE_RECORD).write_text(json.dumps({"llm": llm, "vision":
                                                                  "google/siglip2-so400m-patch14-384"}))
    hera = _trained(tmp_path / "s2" / "hera", "hera", _trained(tmp_path / "s1" / "hera", "hera", composed))
    sft = _trained(tmp_path / "s2" / "sft", "sft", _trained(tmp_path / "s1" / "sft", "sft", composed))
    return hera, sft


def _evaluate(monkeypatch: pytest.MonkeyPatch, run_dir: Path, baseline: Path, tasks: str,
              capsys: pytest.CaptureFixture[str]) -> tuple[dict[str, Any], str]:
    """``eval RUN_DIR --baseline BASELINE --tasks TASKS`` past the checks with :data:`RUN` / :data:`TWIN`'s scores;
    the .json report and the console."""
    from llamafactory_hera.evaluation.report import report_stem

    evaluate_scored(monkeypatch, run_dir, baseline, False, tasks,
                    lambda label, task: (RUN if label == "run" else TWIN)[task])
    stem = report_stem(read_pair(run_dir, baseline, False)[1], run_dir)
    return json.loads((run_dir / f"{stem}.json").read_text(encoding="utf-8")), capsys.readouterr().out


def test_the_run_record_holds_the_stage_chain(tmp_path: Path) -> None:
    hera, _ = _chains(tmp_path, "Qwen/Qwen3-8B")
    chain = run_record.read_record(hera / run_record.RUN_RECORD)["chain"]
    assert chain == [{"compose": str((tmp_path / "composed").resolve()), "llm": "Qwen/Qwen3-8B",
                      "vision": "google/siglip2-so400m-patch14-384"},
                     {"stage": "hera", "output_dir": str((tmp_path / "s1" / "hera").resolve())},
                     {"stage": "hera", "output_dir": str(hera.resolve())}]
    from_hub = _trained(tmp_path / "lora", "sft", Path("Qwen/Qwen3-VL-8B-Instruct"))  # no record: starts here
    assert run_record.read_record(from_hub / run_record.RUN_RECORD)["chain"] == [
        {"stage": "sft", "output_dir": str(from_hub.resolve())}]
    (tmp_path / "s1" / "hera" / "checkpoint-5").mkdir()  # stage 2 from a checkpoint of stage 1: stage 1's chain
    again = _trained(tmp_path / "s2" / "from-checkpoint", "hera", tmp_path / "s1" / "hera" / "checkpoint-5")
    assert run_record.read_record(again / run_record.RUN_RECORD)["chain"][:2] == chain[:2]


def test_group_means_delta_vision_and_the_papers_row(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    hera, sft = _chains(tmp_path, "Qwen/Qwen3-8B")
    record, console = _evaluate(monkeypatch, hera, sft, TASKS, capsys)
    layout = record["table2"]
    assert {column: layout["run"][column]["mean"] for column in GROUPS} == pytest.approx(
        {"General": GENERAL, "Knowledge": KNOWLEDGE, "OCR": OCR, "Vision": VISION})
    assert layout["baseline"]["Vision"]["mean"] == pytest.approx(TWIN_VISION)
    assert layout["delta_vision"] == pytest.approx(VISION - TWIN_VISION)  # +6.25
    assert layout["title"] == ("Qwen3-8B + siglip2-so400m-patch14-384, HeRA stage 1 -> HeRA stage 2 vs SFT -> SFT")
    paper = layout["paper"]
    assert paper["backbone"] == "Qwen3-8B" and "aimagelab.github.io/HeRA" in paper["source"]
    assert paper["baseline"] == {"General": 74.7, "Knowledge": 49.7, "OCR": 43.5, "Vision": 55.9}
    assert paper["hera"] == {"General": 76.9, "Knowledge": 51.1, "OCR": 47.6, "Vision": 59.5}
    assert paper["delta_vision"] == 3.6
    markdown = (hera / "eval_report_vs_sft.md").read_text(encoding="utf-8")
    for text in (markdown, console):
        assert f"Table 2 layout: {layout['title']}" in text
        assert "| model | General* | Knowledge* | OCR | Vision | Δ Vision |" in text  # computed otherwise: marked
        assert "| run: hera | 67.5 | 60.0 | 55.0 | 60.0 | +6.2 |" in text  # 6.25, one decimal as the paper
        assert "| baseline: sft | 67.5 | 60.0 | 55.0 | 53.8 | – |" in text
        assert "| paper's Table 2: Qwen3-8B LLaVA-1.5 baseline | 74.7 | 49.7 | 43.5 | 55.9 |  |" in text
        assert "| paper's Table 2: Qwen3-8B + HeRA | 76.9 | 51.1 | 47.6 | 59.5 | +3.6 |" in text
        assert "MathVista" in text  # the Knowledge preset is not the paper's Knowledge mean
    assert markdown.index("Table 2 layout") < markdown.index("## Vision-Centric")  # beside the per-task table


def test_no_papers_row_for_another_backbone_and_no_mean_for_a_missing_benchmark(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    hera, sft = _chains(tmp_path, "example/TinyLM-7B")
    record, console = _evaluate(monkeypatch, hera, sft, "vision-centric,gqa", capsys)
    layout = record["table2"]
    assert layout["paper"] is None and "paper's Table 2" not in console
    assert layout["title"].startswith("TinyLM-7B + siglip2-so400m-patch14-384, HeRA stage 1 -> HeRA stage 2")
    assert layout["run"]["Vision"]["mean"] == pytest.approx(VISION)
    general = layout["run"]["General"]
    assert general["mean"] is None and general["missing"] == ["mme", "mmbench_en_dev_static", "seedbench"]
    assert "- run General: no mean, missing mme, mmbench_en_dev_static, seedbench" in console


def test_a_demo_eval_has_no_table2_layout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    hera, sft = _chains(tmp_path, "Qwen/Qwen3-8B")
    monkeypatch.setitem(RUN, "llamafactory_hera_demo_mllm", {"accuracy": 0.5})
    monkeypatch.setitem(TWIN, "llamafactory_hera_demo_mllm", {"accuracy": 0.25})
    record, console = _evaluate(monkeypatch, hera, sft, "demo", capsys)
    assert record["table2"] is None and "Table 2 layout" not in console


@pytest.mark.parametrize(("name", "backbone"), [
    ("Qwen/Qwen3-8B", "Qwen3-8B"), ("/models/Qwen3-8B-Base", "Qwen3-8B"), ("Qwen/Qwen2.5-3B-Instruct", "Qwen2.5-3B"),
    ("lmsys/vicuna-7b-v1.5", "Vicuna-7B"), ("lmsys/vicuna-13b-v1.5", "Vicuna-13B"),
    ("meta-llama/Meta-Llama-3-8B-Instruct", "LLaMA3-8B"), ("Qwen/Qwen3-14B", "Qwen3-14B"),
    ("Qwen/Qwen3-VL-8B-Instruct", None), ("meta-llama/Llama-3.1-8B-Instruct", None),
    ("llava-hf/llava-1.5-7b-hf", None), ("Qwen/Qwen3-80B", None), ("Qwen/Qwen2.5-VL-7B-Instruct", None)])
def test_backbones_of_table2_are_known_by_name(name: str, backbone: str | None) -> None:
    found = paper_backbone([None, name])
    assert (found[0] if found else None) == backbone


def test_scores_cover_the_four_presets_and_the_papers_rows_are_whole() -> None:
    import yaml

    assert set(SCORES) == {task for preset in GROUPS.values() for task in PRESETS[preset].tasks}
    assert group_means([], "run")["Vision"] == {"mean": None, "benchmarks": dict.fromkeys(
        PRESETS["vision-centric"].tasks), "missing": list(PRESETS["vision-centric"].tasks)}
    paper = yaml.safe_load(PAPER_FILE.read_text(encoding="utf-8"))
    assert paper["columns"] == list(GROUPS) and len(paper["backbones"]) == 9
    for entry in paper["backbones"].values():  # each published Delta Vision is its rows' Vision difference
        assert entry["delta_vision"] == pytest.approx(entry["hera"][3] - entry["baseline"][3], abs=0.05)


def test_the_docs_describe_the_table2_layout() -> None:
    text = section(read("docs/eval.md"), "Scored as Table 2")
    for words in ("general,knowledge,ocr,vision-centric", "Δ Vision", "2000", "MathVista", "aimagelab.github.io/HeRA",
                  "paper_table2.yaml", "not published here", "chain", "llamafactory_hera_compose.json",
                  "HeRA stage 1 -> HeRA stage 2 vs SFT -> SFT"):
        assert words in text, words
    for task, (metric, _) in SCORES.items():
        assert f"`{task}`" in text and f"`{metric}`" in text, task


@pytest.mark.parametrize(("model", "backbone"), [("llava-hf/llava-1.5-7b-hf", "LLaVA-1.5-7B"),
                                               ("llava-hf/llava-1.5-13b-hf", "LLaVA-1.5-13B"),
                                               ("Qwen/Qwen2.5-VL-7B-Instruct", None)])
def test_rah_preset_is_laid_out_as_rah_loras_table1(model: str, backbone: str | None, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    rah = _trained(tmp_path / "rah", "rah", Path(model))
    twin = _trained(tmp_path / "sft", "sft", Path(model))
    record, console = _evaluate(monkeypatch, rah, twin, "rah", capsys)
    layout = record["rah_table1"]
    # TextVQA with OCR tokens, POPE's F1 averaged over its splits, SEED over images and video, as LLaVA-1.5; MME its
    # perception score as the paper prints it
    assert {column: layout["run"][column]["mean"] for column in RAH_TABLE1.columns} == pytest.approx(
        {"VQAv2": 75.0, "TextVQA": 62.0, "GQA": 60.0, "POPE": 86.0, "MME": 1500.0, "MM-Bench": 70.0, "SciQA": 70.0,
         "SEED": 60.0})
    markdown = (rah / "eval_report_vs_sft.md").read_text(encoding="utf-8")
    header = "| model | VQAv2* | TextVQA | GQA | POPE | MME | MM-Bench* | SciQA | SEED* |"  # the paper's order, marked
    row = "| run: rah | 75.0 | 62.0 | 60.0 | 86.0 | 1500.0 | 70.0 | 70.0 | 60.0 |"
    rows = {"LLaVA-1.5-7B": [" baseline | 78.5 | 58.2 | 62.0 | 85.9 | 1511.0 | 64.3 | 66.8 | 58.6 |",
                             " + RAH-LoRA | 79.8 | 59.6 | 63.1 | 86.3 | 1547.0 | 65.4 | 68.3 | 59.8 |"],
            "LLaVA-1.5-13B": [" baseline | 80.0 | 61.3 | 63.3 | 85.9 | 1531.0 | 67.7 | 71.6 | 61.6 |",
                              " + RAH-LoRA | 81.1 | 62.5 | 64.2 | 87.2 | 1569.0 | 68.8 | 72.9 | 62.7 |"]}
    for text in (markdown, console):
        assert f"RAH-LoRA Table 1 layout: {layout['title']}" in text and header in text and row in text
        for words in ("VQAv2*: vqav2_val: test-dev", "MM-Bench*: mmbench_en_dev_static: lmms-eval's static choice",
                      "SEED*: seedbench: a video question", "middle frame"):
            assert words in text, words
        if backbone:
            assert all(f"| paper's RAH-LoRA Table 1: {backbone}{line}" in text for line in rows[backbone])
            assert "RAH-LoRA paper, Table 1" in text
        else:
            assert "paper's RAH-LoRA Table 1" not in text
    assert (layout["paper"] or {}).get("backbone") == backbone
    assert layout["marked"].keys() == {"VQAv2", "MM-Bench", "SEED"}
    assert _marked_metrics(record) == {  # the bars the PNG marks (MME-P: Table 2's General, scaled / 20)
        ("vqav2_val", "exact_match"): ["RAH-LoRA Table 1 VQAv2"], ("seedbench", "seed_all"): ["RAH-LoRA Table 1 SEED"],
        ("mmbench_en_dev_static", "gpt_eval_score"): ["RAH-LoRA Table 1 MM-Bench"],
        ("mme", "mme_perception_score"): ["Table 2 General"]}
    assert layout["protocol"]["POPE"] == [{
        "task": "pope", "metric": "pope_f1_split_mean", "scale": 100.0, "aggregation": RAH_TABLE1.protocols["POPE"][0]
        .aggregation, "paper": RAH_TABLE1.protocols["POPE"][0].paper, "differs": None}]
    groups = {row["task"]: row["group"] for row in record["rows"]}  # a task of another preset keeps its group
    assert (groups["vqav2_val"], groups["pope"], groups["mme"]) == ("RAH-LoRA Table 1", "Hallucination", "General")


def test_rahs_paper_rows_are_whole() -> None:
    import yaml

    paper = yaml.safe_load(RAH_PAPER_FILE.read_text(encoding="utf-8"))
    assert paper["columns"] == list(RAH_TABLE1.columns) == ["VQAv2", "TextVQA", "GQA", "POPE", "MME", "MM-Bench",
                                                            "SciQA", "SEED"]
    assert [task for tasks in RAH_TABLE1.columns.values() for task in tasks] == list(PRESETS["rah"].tasks)
    assert set(PRESETS["rah"].tasks) <= set(RAH_TABLE1.scores)
    for entry in paper["backbones"].values():
        assert len(entry["baseline"]) == len(entry["rah"]) == len(paper["columns"])


def test_hallucination_tasks_not_set_up_are_refused_before_loading(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """CHAIR needs NLTK's data and AMBER spaCy and its metadata files, none of which lmms-eval installs: eval says what
    is missing and the --tasks without those tasks, before a model loads; set up, nothing is said."""
    import importlib.util

    from llamafactory_hera.evaluation import presets
    from llamafactory_hera.runtime.errors import RecipeError

    planned = presets.plan_tasks("hallucination", "mllm", "hera", None)
    monkeypatch.setattr(presets, "offline", lambda: None)  # the datasets are fetched online (tests/test_eval_cli.py)
    assert all(isinstance(line, str) for line in presets._nltk_missing())  # the real look-up runs (here: no data)
    monkeypatch.setenv("AMBER_BASE_DIR", str(tmp_path / "amber"))
    monkeypatch.setattr(presets, "_nltk_missing", lambda: ["NLTK's wordnet (python -m nltk.downloader wordnet)"])
    with pytest.raises(RecipeError) as refused:
        presets.check_task_setup(planned)
    message = str(refused.value)
    assert "coco_cap_chair needs NLTK's wordnet" in message and "amber_g needs" in message
    assert str(tmp_path / "amber" / "metadata") in message and message.endswith("--tasks pope")
    (tmp_path / "amber" / "metadata").mkdir(parents=True)
    for name in presets.AMBER_FILES:
        (tmp_path / "amber" / "metadata" / name).write_text("{}")
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name.startswith(("spacy", "en_core"))
                        else real_find_spec(name, *a))
    monkeypatch.setattr(presets, "_nltk_missing", lambda: [])
    presets.check_task_setup(planned)  # all set up: nothing raised

