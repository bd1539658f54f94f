"""``llamafactory-hera eval`` through its real command line on the tiny models: a HeRA run against its
``hera_lambda: 0`` twin, a RAH-LoRA adapter against its base and a HARC run against its base, each on the offline
``demo`` tasks run by lmms-eval / lm-eval; the cache (a finished task is kept when a later one fails, a rerun skips
it); and the user's mistakes, each one line before any model is loaded."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from conftest import base_recipe, harc_recipe, offline_env, run_train

EVAL = str(Path(sys.executable).with_name("llamafactory-hera"))
REPORTS = ("eval_report.json", "eval_report.md", "eval_report.png")


def run_eval(tmp: Path, *args: str, env: dict[str, str] | None = None) -> tuple[subprocess.CompletedProcess, float]:
    started = time.perf_counter()
    proc = subprocess.run([EVAL, "eval", *args], cwd=tmp, env=env or offline_env(tmp), capture_output=True,
                          text=True, timeout=900)
    return proc, time.perf_counter() - started


def ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"


def report(run_dir: Path) -> dict[str, Any]:
    for name in REPORTS:
        assert (run_dir / name).is_file() and (run_dir / name).stat().st_size > 0, name
    return json.loads((run_dir / "eval_report.json").read_text(encoding="utf-8"))


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("llamafactory-hera: error: "), proc.stderr[-4000:]
    return lines[0]


@pytest.fixture(scope="module")
def hera_pair(assets, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A 3-step HeRA run on the tiny Qwen2.5-VL and its twin: the same recipe as a plain ``stage: sft`` run of
    ``llamafactory-cli`` (which records no template: the eval takes the run's)."""
    tmp = tmp_path_factory.mktemp("eval_hera")
    run_train(base_recipe(assets, "qwen2_5_vl", tmp / "hera"), tmp / "a")
    twin = {k: v for k, v in base_recipe(assets, "qwen2_5_vl", tmp / "twin").items() if not k.startswith("hera_")}
    run_train({**twin, "stage": "sft"}, tmp / "b")
    assert not any(p.name.startswith("hera_") for p in (tmp / "twin").iterdir())
    return tmp / "hera", tmp / "twin"


def test_hera_run_against_its_twin_on_the_demo_then_cached(hera_pair: tuple[Path, Path], tmp_path: Path) -> None:
    run_dir, twin = hera_pair
    proc, first = run_eval(tmp_path, str(run_dir), "--baseline", str(twin), "--tasks", "demo")
    ok(proc)
    record = report(run_dir)
    rows = [r for r in record["rows"] if r["task"] == "llamafactory_hera_demo_mllm"]
    assert [r["metric"] for r in rows] == ["accuracy"] and rows[0]["group"] == "Demo"
    assert rows[0]["run"] is not None and rows[0]["baseline"] is not None
    assert rows[0]["delta"] == pytest.approx(rows[0]["run"] - rows[0]["baseline"])
    assert record["baseline"]["run_dir"] == str(twin) and not record["failed"]
    alone = one_line_error(run_eval(tmp_path, str(twin), "--tasks", "demo")[0])  # the twin alone needs --template
    assert "records no template" in alone and "--template" in alone
    markdown = (run_dir / "eval_report.md").read_text(encoding="utf-8")
    assert "## Demo" in markdown and "| llamafactory_hera_demo_mllm | accuracy |" in markdown
    proc, again = run_eval(tmp_path, str(run_dir), "--baseline", str(twin), "--tasks", "demo")
    ok(proc)
    record = report(run_dir)
    assert record["run"]["cached_tasks"] == ["llamafactory_hera_demo_mllm"]
    assert record["baseline"]["cached_tasks"] == ["llamafactory_hera_demo_mllm"]
    assert "loading" not in proc.stdout + proc.stderr  # nothing loaded on a rerun
    print(f"hera vs twin: first {first:.1f} s, cached rerun {again:.1f} s")


def test_a_failing_task_keeps_the_finished_one(hera_pair: tuple[Path, Path], tmp_path: Path) -> None:
    """mmvp cannot be downloaded offline: it fails, the demo's result stays in the report and the cache."""
    run_dir, _ = hera_pair
    proc, seconds = run_eval(tmp_path, str(run_dir), "--tasks", "demo,mmvp")
    assert proc.returncode == 2, proc.stderr[-4000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("llamafactory-hera: error: ")]
    assert len(errors) == 1 and proc.stderr.rstrip().endswith(errors[0])  # after the progress bars, one line
    assert "run/mmvp" in errors[0] and "ConnectionError" in errors[0] and "rerun" in errors[0]
    record = report(run_dir)
    assert {r["task"] for r in record["rows"]} == {"llamafactory_hera_demo_mllm"}
    assert "mmvp" in record["failed"]["run"]
    print(f"demo cached + mmvp failing offline: {seconds:.1f} s")


def test_rah_adapter_against_its_base(assets, tmp_path: Path) -> None:
    from llamafactory_hera.rah.demo import build_rah_recipe

    # small and forced to calibrate some heads on the random tiny model (as tests/rah/test_rah_stage.py's FORCED)
    forced = {"rah_samples": 6, "rah_probe_samples": 3, "rah_kl_samples": 2, "rah_isal_percentile": 50,
              "rah_caf_percentile": 0, "rah_beta": -100, "rah_num_anchors": 2, "rah_rank": 2, "rah_delta": 10.0}
    run_train({**build_rah_recipe(assets, "llava", tmp_path / "rah"), **forced}, tmp_path / "train")
    proc, seconds = run_eval(tmp_path, str(tmp_path / "rah"), "--base", "--tasks", "demo")
    ok(proc)
    record = report(tmp_path / "rah")
    assert record["run"]["stage"] == "rah" and record["baseline"]["trained"] is False
    assert "adapter" in record["run"]["model"] and "adapter" not in record["baseline"]["model"]
    assert all(r["run"] is not None and r["baseline"] is not None for r in record["rows"])
    print(f"rah vs base: {seconds:.1f} s")


def test_harc_run_against_its_base(harc_assets, tmp_path: Path) -> None:
    run_train(harc_recipe(harc_assets, "qwen2", tmp_path / "harc", harc_eval=False), tmp_path / "train")
    proc, seconds = run_eval(tmp_path, str(tmp_path / "harc"), "--base", "--tasks", "demo", "--batch-size", "4")
    ok(proc)
    record = report(tmp_path / "harc")
    metrics = {(r["group"], r["task"], r["metric"]) for r in record["rows"]}
    assert ("Demo", "llamafactory_hera_demo_text", "acc") in metrics
    assert ("Refusal", "harc_refusal", "refusal_rate_harmful") in metrics
    assert ("Refusal", "harc_refusal", "refusal_rate_pseudo") in metrics
    assert all(r["run"] is not None and r["baseline"] is not None for r in record["rows"])
    assert "## Refusal" in (tmp_path / "harc" / "eval_report.md").read_text(encoding="utf-8")
    print(f"harc vs base: {seconds:.1f} s")


# --- the user's mistakes: one line, before any model is loaded ---

@pytest.fixture
def recorded_run(assets, tmp_path: Path) -> Path:
    """A folder with a HeRA run record and an adapter config (nothing to load: the errors come first)."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    host = {"model_name_or_path": str(assets.models["qwen2_5_vl"]), "template": "qwen2_vl", "seed": 0}
    (run_dir / "hera_run.json").write_text(json.dumps({"stage": "hera", "host": host}), encoding="utf-8")
    (run_dir / "adapter_config.json").write_text("{}", encoding="utf-8")
    return run_dir


def test_unknown_preset_names_the_closest(recorded_run: Path, tmp_path: Path) -> None:
    line = one_line_error(run_eval(tmp_path, str(recorded_run), "--tasks", "vision-centrc")[0])
    assert "unknown preset or task 'vision-centrc'" in line and "did you mean vision-centric" in line


def test_unknown_task_names_the_closest_registry_task(recorded_run: Path, tmp_path: Path) -> None:
    line = one_line_error(run_eval(tmp_path, str(recorded_run), "--tasks", "realworldq")[0])
    assert "unknown preset or task 'realworldq'" in line and "realworldqa" in line


def test_a_text_preset_on_an_mllm_run(recorded_run: Path, tmp_path: Path) -> None:
    line = one_line_error(run_eval(tmp_path, str(recorded_run), "--tasks", "capability")[0])
    assert "preset 'capability' is for text models" in line and "vision-centric" in line


def test_a_folder_without_a_run(tmp_path: Path) -> None:
    line = one_line_error(run_eval(tmp_path, str(tmp_path), "--tasks", "demo")[0])
    assert "holds no run record" in line and "hera_run.json" in line


def test_a_run_without_its_model(recorded_run: Path, tmp_path: Path) -> None:
    (recorded_run / "adapter_config.json").unlink()
    line = one_line_error(run_eval(tmp_path, str(recorded_run), "--tasks", "demo")[0])
    assert "neither adapter_config.json nor config.json" in line and "--base" in line


def test_twins_without_a_record_read_as_the_runs_kind_of_model(tmp_path: Path) -> None:
    """A HeRA run on a hub-id MLLM (no local config.json: the template tells it is multimodal) against the two
    record-less SFT twins its recipes document: the LoRA twin (base in adapter_config.json) and the full twin (the
    folder is the model; --base cannot know its base). Found by review: both were refused or read as text models."""
    from llamafactory_hera.evaluation.runs import read_pair

    run_dir, lora_twin, full_twin = tmp_path / "hera", tmp_path / "lora_sft", tmp_path / "full_sft"
    for folder in (run_dir, lora_twin, full_twin):
        folder.mkdir()
    host = {"model_name_or_path": "Qwen/Qwen2.5-VL-7B-Instruct", "template": "qwen2_vl", "image_max_pixels": 262144}
    (run_dir / "hera_run.json").write_text(json.dumps({"stage": "hera", "host": host}), encoding="utf-8")
    (run_dir / "adapter_config.json").write_text("{}", encoding="utf-8")
    (lora_twin / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": host["model_name_or_path"]}),
                                                  encoding="utf-8")
    (full_twin / "config.json").write_text(json.dumps({"model_type": "qwen2_5_vl"}), encoding="utf-8")
    run, twin = read_pair(run_dir, lora_twin, base=False)
    assert run.modality == twin.modality == "mllm" and run.recipe["image_max_pixels"] == 262144
    assert twin.recipe["template"] == "qwen2_vl" and twin.recipe["adapter_name_or_path"] == str(lora_twin)
    run, twin = read_pair(run_dir, full_twin, base=False)
    assert twin.modality == "mllm" and twin.recipe["model_name_or_path"] == str(full_twin)
    with pytest.raises(ValueError, match="--base: .* is a full fine-tuning run without a run record"):
        read_pair(full_twin, None, base=True, template="qwen2_vl")


def test_the_missing_extra(recorded_run: Path, tmp_path: Path) -> None:
    """Without lmms-eval (an import that fails, as in an environment without the extra) the fix is named."""
    shadow = tmp_path / "shadow" / "lmms_eval"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError(\"No module named 'lmms_eval'\")\n", encoding="utf-8")
    env = offline_env(tmp_path, PYTHONPATH=str(shadow.parent))
    line = one_line_error(run_eval(tmp_path, str(recorded_run), "--tasks", "demo", env=env)[0])
    assert "pip install 'llamafactory-hera[eval]'" in line


def test_the_demos_install_line_names_the_eval_extra_of_pyproject() -> None:
    import tomllib

    from conftest import REPO
    from llamafactory_hera.evaluation.cli import EXTRA_PACKAGES

    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert list(EXTRA_PACKAGES) == extras["eval"] and set(EXTRA_PACKAGES) <= set(extras["test"])


def test_every_preset_task_is_in_its_library_registry() -> None:
    """The presets name tasks of lmms-eval 0.7.3 / lm-eval 0.4.13's own registries (read in-process: no model)."""
    from llamafactory_hera.evaluation.backends import known_tasks
    from llamafactory_hera.evaluation.presets import LM, LMMS, PRESETS, REFUSAL_TASK

    for library, modality in ((LMMS, "mllm"), (LM, "text")):
        known = known_tasks(library)
        missing = {p.name: [t for t in p.tasks if t not in known and t != REFUSAL_TASK] for p in PRESETS.values()
                   if p.modality == modality}
        assert not any(missing.values()), (library, missing)
