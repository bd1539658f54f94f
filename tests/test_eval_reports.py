"""``llamafactory-hera eval``'s reports and device placement: one report per comparison (``--baseline TWIN``
then ``--base`` used to overwrite ``eval_report.*`` silently), the rerun of a comparison says what it replaced; several
visible GPUs get the pinning note, and docs/eval.md tells how to pin.

In-process, no model: the evaluation loop is replaced by fixed results."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import pytest
from test_eval_records import _hera_folder

from llamafactory_hera.evaluation.runs import ModelSpec, read_pair
from markdown_docs import bash_lines, read, section


def _run_folder(folder: Path) -> Path:
    return _hera_folder(folder, image_max_pixels=262144)


def evaluate_scored(monkeypatch: pytest.MonkeyPatch, run_dir: Path, baseline: Path | None, base: bool,
                    tasks: str = "demo", scores: Any = None) -> list[str]:
    """``eval RUN_DIR [--baseline B | --base] --tasks TASKS`` past the checks, the loop replaced by fixed results:
    ``scores(label, task)`` (metric -> value; default: ``accuracy`` 0.5 for the run, 0.25 for the baseline). What
    was said."""
    from llamafactory_hera.evaluation import cli, runner
    from llamafactory_hera.evaluation.presets import plan_tasks
    from llamafactory_hera.evaluation.runner import Outcome

    scores = scores or (lambda label, task: {"accuracy": 0.5 if label == "run" else 0.25})

    def scored(spec: ModelSpec, rows_from: ModelSpec, planned: list[Any], *_: Any) -> Outcome:
        return Outcome(spec, {t.name: {"entries": [{"task": t.name, "metric": metric, "value": value,
                                                    "higher_is_better": True}
                                                   for metric, value in scores(spec.label, t.name).items()],
                                       "seconds": 0.1} for t in planned})

    monkeypatch.setattr(runner, "evaluate_model", scored)
    run, other = read_pair(run_dir, baseline, base)
    args = argparse.Namespace(run_dir=run_dir, tasks=tasks, limit=None, batch_size=8)
    said: list[str] = []
    monkeypatch.setattr(cli, "say", said.append)  # where eval says it
    cli._evaluate(args, run, other, plan_tasks(tasks, run.modality, run.stage, None))
    return said


def test_each_comparison_keeps_its_own_report(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run_dir, twin = _run_folder(tmp_path / "hera"), _run_folder(tmp_path / "sft twin")
    first = evaluate_scored(monkeypatch, run_dir, twin, base=False)
    assert not any("replaced" in line for line in first)
    evaluate_scored(monkeypatch, run_dir, None, base=True)
    against_twin = json.loads((run_dir / "eval_report_vs_sft_twin.json").read_text(encoding="utf-8"))
    against_base = json.loads((run_dir / "eval_report_vs_base.json").read_text(encoding="utf-8"))
    assert against_twin["baseline"]["run_dir"] == str(twin) and against_base["baseline"]["trained"] is False
    for stem in ("eval_report_vs_sft_twin", "eval_report_vs_base"):
        assert all((run_dir / f"{stem}{suffix}").stat().st_size > 0 for suffix in (".json", ".md", ".png"))
    assert not (run_dir / "eval_report.json").exists()
    again = evaluate_scored(monkeypatch, run_dir, twin, base=False)  # the same comparison again: replaced, and said
    replaced = [line for line in again if "replaced" in line]
    assert len(replaced) == 1 and "eval_report_vs_sft_twin.json" in replaced[0], again
    assert against_twin["created"] in replaced[0] and str(twin) in replaced[0]
    assert json.loads((run_dir / "eval_report_vs_base.json").read_text(encoding="utf-8")) == against_base
    evaluate_scored(monkeypatch, run_dir, None, base=False)
    assert (run_dir / "eval_report.json").is_file()  # the run alone


def test_baselines_in_same_named_folders_keep_their_own_reports(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """``--baseline a/sft`` then ``--baseline b/sft``: the second used to replace the first's report."""
    run_dir = _run_folder(tmp_path / "hera")
    first, second = _run_folder(tmp_path / "a" / "sft"), _run_folder(tmp_path / "b" / "sft")
    evaluate_scored(monkeypatch, run_dir, first, base=False)
    said = evaluate_scored(monkeypatch, run_dir, second, base=False)
    assert not any("replaced" in line for line in said), said
    reports = {json.loads(path.read_text(encoding="utf-8"))["baseline"]["run_dir"]: path.name
               for path in run_dir.glob("eval_report_vs_sft*.json")}
    assert set(reports) == {str(first), str(second)} and reports[str(first)] == "eval_report_vs_sft.json"
    again = evaluate_scored(monkeypatch, run_dir, second, base=False)  # the second comparison again: its own file
    assert any("replaced" in line and reports[str(second)] in line for line in again), again
    assert len(list(run_dir.glob("eval_report_vs_sft*.json"))) == 2


def test_the_report_names_what_a_model_took_over(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run_dir, twin = _run_folder(tmp_path / "hera"), tmp_path / "legacy"
    twin.mkdir()
    (twin / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "Qwen/Qwen2.5-VL-7B-Instruct"}))
    said = evaluate_scored(monkeypatch, run_dir, twin, base=False)
    assert any("baseline" in line and "recorded no template, image_max_pixels" in line and "262144" in line
               for line in said), said
    markdown = (run_dir / "eval_report_vs_legacy.md").read_text(encoding="utf-8")
    assert "- baseline recorded no template, image_max_pixels: loaded with template: qwen2_vl" in markdown


@pytest.mark.parametrize(("count", "noted"), [(0, False), (1, False), (8, True)])
def test_several_visible_gpus_get_the_pinning_note(count: int, noted: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from llamafactory_hera.evaluation.runner import PIN, device_note

    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    note = device_note()
    assert (note is not None) == noted
    if noted:
        assert "device_map: auto" in note and "8" in note and PIN in note


def test_the_docs_tell_how_to_pin_an_eval_to_one_gpu() -> None:
    """Unpinned, on an 8-GPU node a 7B-14B model is split across all GPUs as a pipeline at batch size 1: the docs say
    how to pin one GPU."""
    from llamafactory_hera.evaluation.runner import PIN

    doc = read("docs/eval.md")
    text = section(doc, "On a node with several GPUs")
    assert "device_map: auto" in text
    pinned = [line for line in bash_lines(text) if line.startswith(PIN.removesuffix(" ..."))]
    assert pinned and all(" --base" in line or " --baseline " in line for line in pinned), pinned
    assert "#on-a-node-with-several-gpus" in doc.split("\n## ", 1)[0]


def test_the_docs_name_each_comparisons_report() -> None:
    text = section(read("docs/eval.md"), "Outputs")
    for name in ("`eval_report_vs_base.*`", "`eval_report_vs_<OTHER_RUN_DIR's folder name>.*`", "`eval_report.*`"):
        assert name in text
    assert "replaces its report" in text and "says what it replaced" in text


def test_a_baseline_folder_named_base_does_not_take_the_base_comparisons_report(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``--baseline runs/base`` then ``--base``: both used to be ``eval_report_vs_base.*``, the second replacing the
    first (and its jailbreak answers file)."""
    run_dir, named_base = _run_folder(tmp_path / "hera"), _run_folder(tmp_path / "runs" / "base")
    evaluate_scored(monkeypatch, run_dir, named_base, base=False)
    said = evaluate_scored(monkeypatch, run_dir, None, base=True)
    assert not any("replaced" in line for line in said), said
    reports = {path.name: json.loads(path.read_text(encoding="utf-8"))["baseline"]
               for path in run_dir.glob("eval_report_vs_base*.json")}
    assert reports["eval_report_vs_base.json"]["trained"] is False and len(reports) == 2
    assert [b["run_dir"] for name, b in reports.items() if name != "eval_report_vs_base.json"] == [str(named_base)]
