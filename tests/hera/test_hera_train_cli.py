"""End-to-end HeRA runs through the stock `llamafactory-cli train` (real launcher, parser, collator, trainer)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from conftest import base_recipe, read_log_history, read_trainer_log, run_train
from llamafactory_hera_testing.resume import assert_resumed_equals_whole

HERA_KEYS = ("lm_loss", "hera_loss", "hera_temperature", "hera_image_samples", "hera_text_only_samples")


def _train_lines(output_dir: Path) -> list[dict]:
    return [line for line in read_trainer_log(output_dir) if "loss" in line]


def test_lambda_zero_equals_the_sft_baseline_twin_step_for_step(assets, tmp_path: Path) -> None:
    recipe = base_recipe(assets, "qwen2_5_vl", tmp_path / "hera" / "out", hera_lambda=0.0, max_steps=4)
    run_train(recipe, tmp_path / "hera")
    twin = dict(recipe, output_dir=str(tmp_path / "sft" / "out"))
    proc = run_train(twin, tmp_path / "sft", "stage=sft")  # the recipe's baseline twin: hera_* keys ignored
    assert proc.stderr.count("ignoring hera_") == 1 and "because the stage is not 'hera'" in proc.stderr
    hera, sft = _train_lines(tmp_path / "hera" / "out"), _train_lines(tmp_path / "sft" / "out")
    assert len(hera) == len(sft) == 4
    for h, s in zip(hera, sft, strict=True):
        assert h["loss"] == s["loss"] and h["lm_loss"] == pytest.approx(s["loss"], abs=1e-6)
        assert "hera_loss" in h and "hera_loss" not in s
    assert not (tmp_path / "sft" / "out" / "hera_state.json").exists()


@pytest.mark.parametrize("family,finetuning,accumulation", [
    ("qwen3_vl", "lora", 1), ("qwen2_5_vl", "full", 2), ("llava", "lora", 2),
])
def test_hera_run_logs_plots_and_records(assets, tmp_path: Path, family: str, finetuning: str,
                                         accumulation: int) -> None:
    out = tmp_path / "out"
    evaluation = {"val_size": 0.25, "eval_strategy": "steps", "eval_steps": 3, "per_device_eval_batch_size": 4}
    recipe = base_recipe(assets, family, out, finetuning_type=finetuning, hera_lambda=0.5, plot_loss=True,
                         per_device_train_batch_size=8 // accumulation, gradient_accumulation_steps=accumulation,
                         hera_k=2 if accumulation > 1 else 3, max_steps=3, hera_temperature_lr=0.05,
                         **(evaluation if family == "qwen3_vl" else {}))
    run_train(recipe, tmp_path)
    if family == "qwen3_vl":  # the SFT workflow's evaluation runs whole inside a HeRA run
        evals = [entry for entry in read_log_history(out) if "eval_loss" in entry]
        assert len(evals) == 1 and math.isfinite(evals[0]["eval_loss"])
    lines = _train_lines(out)
    assert [line["current_steps"] for line in lines] == [1, 2, 3]
    for line in lines:
        assert set(HERA_KEYS) <= set(line)
        assert line["hera_image_samples"] == 8 // accumulation and line["hera_text_only_samples"] == 0
        assert all(math.isfinite(line[key]) for key in HERA_KEYS)
        # The HeRA term is scaled exactly like the LM loss under gradient accumulation:
        # the logged total is lm_loss + lambda * hera_loss (a missing 1/accumulation would double the term).
        assert line["loss"] == pytest.approx(line["lm_loss"] + 0.5 * line["hera_loss"], rel=1e-5)
    assert lines[-1]["hera_temperature"] != pytest.approx(0.07, abs=1e-4)  # learnable, it moved
    history = [entry for entry in read_log_history(out) if "loss" in entry]
    assert all(set(HERA_KEYS) <= set(entry) for entry in history)  # trainer_state.json (and report_to)
    assert sorted(p.name for p in out.glob("*.png")) == (  # the host's loss (and eval) curves and the plugin's one
        ["training.png", "training_eval_loss.png", "training_loss.png"] if family == "qwen3_vl"
        else ["training.png", "training_loss.png"])
    assert (out / "training.png").stat().st_size > 10_000
    state = json.loads((out / "hera_state.json").read_text())
    assert state["heads"] == ["L1H0", "L1H2"]
    assert state["temperature"] == pytest.approx(lines[-1]["hera_temperature"], rel=1e-6)
    record = json.loads((out / "hera_run.json").read_text())
    assert record["stage"] == "hera" and record["hera_lambda"] == 0.5


def test_text_only_samples_stay_out_of_the_contrastive_term(assets, tmp_path: Path) -> None:
    out = tmp_path / "out"
    recipe = base_recipe(assets, "qwen2_5_vl", out, dataset="hera_demo_mixed", max_steps=3)
    run_train(recipe, tmp_path)
    lines = _train_lines(out)
    text_only = sum(line["hera_text_only_samples"] for line in lines)
    images = sum(line["hera_image_samples"] for line in lines)
    assert text_only > 0 and images + text_only == 8 * len(lines)
    assert all(math.isfinite(line["hera_loss"]) for line in lines)


def test_resume_restores_the_temperature(assets, tmp_path: Path) -> None:
    common = {"max_steps": 4, "save_strategy": "steps", "save_steps": 2, "hera_temperature_lr": 0.05,
              "hera_lambda": 1.0}
    full = tmp_path / "full" / "out"
    run_train(base_recipe(assets, "qwen2_5_vl", full, **common), tmp_path / "full")
    checkpoint = full / "checkpoint-2"
    saved = json.loads((checkpoint / "hera_state.json").read_text())
    reference = _train_lines(full)
    assert saved["temperature"] == pytest.approx(reference[1]["hera_temperature"], rel=1e-6)
    assert saved["temperature"] != pytest.approx(0.07, abs=1e-3)

    resumed = tmp_path / "resumed" / "out"
    run_train(base_recipe(assets, "qwen2_5_vl", resumed, resume_from_checkpoint=str(checkpoint), **common),
              tmp_path / "resumed")
    after = _train_lines(resumed)
    assert [line["current_steps"] for line in after] == [3, 4]
    for got, want in zip(after, reference[2:], strict=True):
        # Had tau restarted at 0.07, step 3 would log ~0.07 plus one update, far from the reference.
        assert got["hera_temperature"] == pytest.approx(want["hera_temperature"], rel=1e-5)
        assert got["hera_loss"] == pytest.approx(want["hera_loss"], rel=1e-4)
        assert got["lm_loss"] == pytest.approx(want["lm_loss"], rel=1e-5)
    # and bit for bit: the LoRA adapter, the optimizer, the temperature
    assert assert_resumed_equals_whole(full, resumed, 4) == ["model", "optimizer.pt", "hera_state.json"]


def test_cli_errors_reach_the_terminal_before_any_model_is_loaded(assets, tmp_path: Path) -> None:
    recipe = base_recipe(assets, "qwen2_5_vl", tmp_path / "out", hera_heads=["L9H0"])
    proc = run_train(recipe, tmp_path, check=False, process=True)  # the real process: exit code, short error
    assert proc.returncode != 0
    assert "hera_heads: L9H0 is outside" in proc.stderr and "layers L0..L1 and heads H0..H3" in proc.stderr
    assert "Loading weights" not in proc.stderr + proc.stdout and not (tmp_path / "out").exists()
    # the plugin's message, alone: no traceback through LLaMA-Factory above it, and a way to get one
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "[llamafactory-hera] error: hera_heads: L9H0 is outside" in proc.stderr
    assert "LLAMAFACTORY_HERA_TRACEBACK=1" in proc.stderr
    full = run_train(recipe, tmp_path, check=False, env={"LLAMAFACTORY_HERA_TRACEBACK": "1"})
    assert full.returncode != 0 and "Traceback" in full.stderr and "hera_heads: L9H0 is outside" in full.stderr


def test_disabled_plugin_leaves_llamafactory_stock(assets, tmp_path: Path) -> None:
    recipe = base_recipe(assets, "qwen2_5_vl", tmp_path / "out")
    proc = run_train(recipe, tmp_path, check=False, env={"LLAMAFACTORY_HERA_DISABLE": "1"})
    assert proc.returncode != 0 and "hera" in proc.stderr and "llamafactory_hera" not in proc.stderr
