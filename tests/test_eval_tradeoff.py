"""HARC's trade-off table and plot: the rows and the table from hand-made report records (the
capability preset's main scores and their mean, the demo stand-in, usability not measured on a non-HARC run), the
plot written, and end to end: a tiny HARC run against its base with ``--tasks jailbreak,demo``.

Cost: the hand-made records need no model; the end-to-end test trains HARC for 3 steps and evaluates 2 prompts per
attack, 8 tokens per answer, and the 8 demo questions."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from conftest import run_verb
from llamafactory_hera.evaluation.tradeoff import DEMO_STAND_IN, OVER_REFUSAL, markdown_lines, plot, tradeoff


def _row(group: str, task: str, metric: str, run: float | None, baseline: float | None,
         higher: bool = True) -> dict[str, Any]:
    delta = None if run is None or baseline is None else round(run - baseline, 6)
    return {"group": group, "task": task, "metric": metric, "run": run, "baseline": baseline, "delta": delta,
            "higher_is_better": higher, "library": "x"}


JAILBREAK_ROWS = [_row("Jailbreak", "jailbreak", "asr_direct", 0.25, 0.75, False),
                  _row("Jailbreak", "jailbreak", "asr_prefilling", 0.5, 1.0, False),
                  _row("Jailbreak", "jailbreak", "asr_templates", 0.4, 0.6, False),
                  _row("Jailbreak", "jailbreak", "asr_template:role_play", 0.0, 1.0, False),
                  _row("Jailbreak", "jailbreak", "asr_gcg_transfer", 0.3, 0.9, False)]  # another attack, as found
CAPABILITY = {"mmlu": {"acc": (0.61, 0.63)},  # lm-eval 0.4.13: mmlu and winogrande report acc only
              "arc_easy": {"acc": (0.80, 0.81), "acc_norm": (0.78, 0.77)},
              "hellaswag": {"acc": (0.55, 0.56), "acc_norm": (0.72, 0.74)},
              "winogrande": {"acc": (0.70, 0.70)}}


def _record(rows: list[dict[str, Any]], stage: str = "harc", trained: bool = False) -> dict[str, Any]:
    return {"rows": rows, "run": {"title": "harc run", "stage": stage},
            "baseline": {"title": "Llama-3.1-8B-Instruct", "trained": trained}}


def _harc_record() -> dict[str, Any]:
    rows = [*JAILBREAK_ROWS, _row("Refusal", "harc_refusal", "refusal_rate_harmful", 0.9, 0.5),
            _row("Refusal", "harc_refusal", "refusal_rate_pseudo", 0.125, 0.25, False)]
    for task, metrics in CAPABILITY.items():
        rows += [_row("Capability", task, metric, *values) for metric, values in metrics.items()]
        if task == "mmlu":  # a subtask lm-eval reports beside the group: not a capability row of its own
            rows.append(_row("Capability", "mmlu_abstract_algebra", "acc", 0.3, 0.2))
    rows.append(_row("Demo", "llamafactory_hera_demo_text", "acc", 0.5, 0.5))  # the capability preset ran: unused
    return _record(rows)


def test_the_tradeoff_rows_of_a_harc_run_with_the_capability_preset() -> None:
    held = tradeoff(_harc_record())
    rows = {(r["axis"], r["measure"]): r for r in held["rows"]}
    robustness = [r["measure"] for r in held["rows"] if r["axis"] == "Robustness"]
    assert robustness == ["ASR direct", "ASR prefilling", "ASR templates", "ASR gcg_transfer"]  # no per-template
    assert all(not r["higher_is_better"] for r in held["rows"] if r["axis"] != "Capability")
    assert rows[("Usability", OVER_REFUSAL)]["run"] == 0.125 and rows[("Usability", OVER_REFUSAL)]["delta"] == -0.125
    capability = [r for r in held["rows"] if r["axis"] == "Capability"]
    expected = {"mmlu": "acc", "arc_easy": "acc_norm", "hellaswag": "acc_norm", "winogrande": "acc"}
    assert [(r["task"], r["metric"]) for r in capability[:-1]] == list(expected.items())
    total_run = total_base = 0.0  # the mean by hand
    for task, metric in expected.items():
        total_run += CAPABILITY[task][metric][0]
        total_base += CAPABILITY[task][metric][1]
    mean = capability[-1]
    assert mean["measure"] == "mean of 4 tasks" and mean["higher_is_better"]
    assert mean["run"] == pytest.approx(total_run / 4) and mean["baseline"] == pytest.approx(total_base / 4)
    assert mean["delta"] == pytest.approx((total_run - total_base) / 4)
    assert held["capability"] == "capability" and not held["not_measured"] and not held["notes"]

    lines = markdown_lines({**_harc_record(), "tradeoff": held})
    assert lines[0] == "HARC trade-off: harc run vs base Llama-3.1-8B-Instruct"
    assert lines[2] == "| axis | measure | run | base | delta | better |"
    assert "| Robustness | ASR direct | 0.25 | 0.75 | -0.5 | lower (run better) |" in lines
    assert "| Usability | over-refusal (pseudo-harmful) | 0.125 | 0.25 | -0.125 | lower (run better) |" in lines
    assert "| Capability | mmlu acc | 0.61 | 0.63 | -0.02 | higher (base better) |" in lines
    assert "| Capability | winogrande acc | 0.7 | 0.7 | +0 | higher (even) |" in lines
    assert not any("template:" in line or "demo" in line for line in lines)


def test_a_non_harc_run_says_why_usability_is_not_measured_and_demo_stands_in() -> None:
    rows = [*JAILBREAK_ROWS[:2], _row("Demo", "llamafactory_hera_demo_text", "acc", 0.5, 0.375),
            _row("Demo", "llamafactory_hera_demo_text", "acc_norm", 0.625, 0.5)]
    record = _record(rows, stage="sft", trained=True)
    held = tradeoff(record)
    assert [(r["axis"], r["measure"], r["run"]) for r in held["rows"] if r["axis"] == "Capability"] == [
        ("Capability", f"{DEMO_STAND_IN} acc_norm", 0.625)]
    assert held["capability"] == "demo" and list(held["not_measured"]) == ["Usability"]
    lines = markdown_lines({**record, "tradeoff": held})
    assert lines[0] == "Jailbreak trade-off: harc run vs baseline Llama-3.1-8B-Instruct"  # not a HARC run
    assert lines[2] == "| axis | measure | run | baseline | delta | better |"
    assert "| Usability | over-refusal (pseudo-harmful) | not measured | – | – | lower |" in lines
    why = [line for line in lines if line.startswith("- usability not measured:")]
    assert len(why) == 1 and "stage: sft" in why[0] and "pseudo-harmful rows" in why[0]
    assert any("demo text task" in line and "stands in" in line for line in lines)

    alone = tradeoff(_record(rows[:2], stage="sft"))  # neither usability nor capability ran
    assert list(alone["not_measured"]) == ["Usability", "Capability"] and alone["capability"] is None
    assert tradeoff(_record(rows[2:])) is None  # no jailbreak task: no trade-off


def test_gcg_transfer_is_shown_beside_the_bases_own_suffixes() -> None:
    """The jailbreak task reports asr_gcg_transfer on the run only (the base's suffixes tried on it); on the base
    those suffixes are its gcg_adaptive attack, so the table shows that value beside the run's."""
    rows = [_row("Jailbreak", "jailbreak", "asr_gcg_adaptive", 0.5, 1.0, False),
            _row("Jailbreak", "jailbreak", "asr_gcg_transfer", 0.25, None, False)]
    found = {r["metric"]: r for r in tradeoff(_record(rows))["rows"]}
    assert found["asr_gcg_transfer"]["baseline"] == 1.0 and found["asr_gcg_transfer"]["delta"] == -0.75
    assert found["asr_gcg_transfer"]["measure"] == "ASR gcg_transfer (base: its own suffixes)"
    assert found["asr_gcg_adaptive"]["baseline"] == 1.0 and found["asr_gcg_adaptive"]["delta"] == -0.5
    alone = {r["metric"]: r for r in tradeoff(_record([rows[1]]))["rows"]}  # no adaptive row: nothing to fill
    assert alone["asr_gcg_transfer"]["baseline"] is None


def test_the_plot_is_written(tmp_path: Path) -> None:
    for name, record in (("harc", _harc_record()), ("alone", {**_record(JAILBREAK_ROWS[:2], stage="sft"),
                                                             "baseline": None})):
        record["tradeoff"] = tradeoff(record)
        path = tmp_path / f"{name}_tradeoff.png"
        plot(record, path)
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and 15_000 < path.stat().st_size < 1_000_000


# --- a tiny HARC run against its base, end to end ---

@pytest.fixture(scope="module")
def harc_run(trained_harc_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the session's tiny HARC run: this module's evals write their reports and cache into it."""
    import shutil

    return Path(shutil.copytree(trained_harc_run, tmp_path_factory.mktemp("eval") / "harc"))


def test_a_harc_run_against_its_base_prints_and_plots_the_tradeoff(harc_run: Path, capfd) -> None:
    from test_eval_cli import one_thread, report

    with one_thread():
        proc = run_verb(capfd, "eval", harc_run, "--base", "--tasks", "jailbreak,demo", "--attacks",
                        "direct,prefilling", "--limit", "2", cwd=harc_run.parent)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    assert "HARC trade-off:" in proc.stdout and "| Usability | over-refusal (pseudo-harmful) |" in proc.stdout
    assert "not a git repository" not in proc.stderr  # lm-eval's git call, outside a repository (the demo text task)
    record = report(harc_run, "eval_report_vs_base")
    rows = record["tradeoff"]["rows"]
    assert [r["measure"] for r in rows if r["axis"] == "Robustness"] == ["ASR direct [refusal matcher]",
                                                                       "ASR prefilling [refusal matcher]"]
    assert [r["metric"] for r in rows if r["axis"] == "Usability"] == ["refusal_rate_pseudo"]
    assert [r["task"] for r in rows if r["axis"] == "Capability"] == ["llamafactory_hera_demo_text"]
    assert all(r["run"] is not None and r["baseline"] is not None for r in rows)
    assert record["tradeoff"]["capability"] == "demo" and DEMO_STAND_IN in proc.stdout
    plot_file = harc_run / "eval_report_vs_base_tradeoff.png"
    assert plot_file.stat().st_size > 15_000 and plot_file.name in record["files"]
    answers = harc_run / "eval_report_vs_base_jailbreak.jsonl"
    assert answers.stat().st_size > 0 and answers.name in record["files"]
    assert "## HARC trade-off" in (harc_run / "eval_report_vs_base.md").read_text(encoding="utf-8")
    assert json.loads((harc_run / "eval_report_vs_base.json").read_text())["tradeoff"] == record["tradeoff"]

    again = run_verb(capfd, "eval", harc_run, "--base", "--tasks", "demo", "--limit", "2", cwd=harc_run.parent)
    assert again.returncode == 0  # the same comparison without the jailbreak task: its plot goes with its report
    assert report(harc_run, "eval_report_vs_base")["tradeoff"] is None and not plot_file.exists()
    assert not answers.exists()  # nor do the replaced report's jailbreak answers stay beside the new one
