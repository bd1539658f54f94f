"""DeepSpeed ZeRO-2 and ZeRO-3 (CPU, gloo, 2 ranks): HeRA trains exactly like plain DDP.

Full fine-tuning, so under ZeRO-3 the o_proj weights HeRA projects through are partitioned; the
teacher must stay whole. Step 1's losses check the forward (teacher features, W_O slices), step 2's
check the update of step 1 (gradients through partitioned weights, the temperature's own optimizer).
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from typing import Any

import pytest
from dist_runs import launch_runs, run_python
from engine_checks import assert_engine, evidence_env, read_evidence

from conftest import REPO, base_recipe, offline_env, read_trainer_log
from llamafactory_hera_testing.resume import assert_resumed_equals_whole

SAVED = {"save_strategy": "steps", "save_steps": 1}  # a checkpoint after each step: step 1's is resumed from
pytestmark = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed")


def _run(assets, tmp: Path, deepspeed: str | None, precompute: str, **keys: Any) -> dict[str, Any]:
    """One run of the launch: the HeRA recipe (full fine-tuning, the monitor at every step) and its engine evidence's
    folder."""
    recipe = base_recipe(assets, "qwen2_5_vl", tmp / "out", finetuning_type="full", per_device_train_batch_size=4,
                         max_steps=2, hera_temperature_lr=0.05, deepspeed=deepspeed, hera_teacher_precompute=precompute,
                         hera_monitor_steps=1, hera_k=3, hera_queue_size=8, **keys)  # each rank's queue saved
    return {"recipe": recipe, "env": {"HERA_TEST_ENGINE_EVIDENCE": str(tmp / "engine")}}


def _losses(result: dict[str, Any], tmp: Path, precompute: str, resumed: bool
            ) -> tuple[list[tuple[float, ...]], list[dict[str, Any]]]:
    """Per step (loss, hera_loss, hera_temperature, hera_mknn, hera_mknn_control); the alignment monitor scores at
    steps 0, 1 and 2 (every rank takes part in its forward; under ZeRO-3 the o_proj weights are gathered). And each
    rank's engine evidence (tests/engine_checks.py), taken at its first training step."""
    output = result["stdout"]
    precomputed = "teacher features of 32 training images computed before the first step" in output
    # each rank computes half of the images the monitor's probe pairs (rank 0's, broadcast) did not already compute
    split = re.search(r"\((\d+) on this rank(?:, (\d+) from this teacher's earlier pass)?", output)
    assert precomputed == (precompute == "true") and precomputed == (split is not None)
    assert split is None or int(split[1]) == -(-(32 - int(split[2] or 0)) // 2)
    lines = read_trainer_log(tmp / "out")
    scored = [line["current_steps"] for line in lines if "hera_mknn" in line]
    assert scored == [0, 1, 2] if not resumed else scored[-1] == 2  # resumed: from step 1
    return [(line["loss"], line["hera_loss"], line["hera_temperature"], line["hera_mknn"], line["hera_mknn_control"])
            for line in lines if "loss" in line], read_evidence(tmp / "engine", ranks=2)


def test_zero2_and_zero3_train_hera_like_ddp(assets, tmp_path: Path) -> None:
    """ZeRO-3 also fills the teacher cache before step 1 (split over both ranks, all-gathered); DDP and ZeRO-2 run
    the teacher inside the steps: the same losses either way. ZeRO-2 and ZeRO-3 stopped after step 1 and resumed:
    step 2 as the run not stopped, and its engine's weights and optimizer state (ZeRO-3: each rank's partition), the
    saved model (Qwen2.5-VL: a checkpoint conversion mapping; ZeRO-3: gathered on save), the temperature and its own
    optimizer bit-identical. DDP, ZeRO-2 and ZeRO-3 share one two-rank launch (tests/dist_runs.py, ZeRO-3 last), the
    two resumes another."""
    zero2, zero3 = (str(REPO / "recipes" / "deepspeed" / f"ds_z{stage}_config.json") for stage in (2, 3))
    plan = [("ddp", None, "false", {}), ("zero2", zero2, "false", SAVED), ("zero3", zero3, "true", SAVED)]
    # the three compared runs share one two-rank launch; 400 s per run: on a busy 2-core CI machine one two-rank
    # ZeRO-3 run with the monitor has come near 400 s
    results = launch_runs([_run(assets, tmp_path / name, config, precompute, **keys)
                           for name, config, precompute, keys in plan], tmp_path / "launch", 2,
                          env=evidence_env(tmp_path / "launch" / "engine"), seconds_per_run=400)
    # both resumes in a new process, as users resume (a launch of their own; tests/hera/test_hera_deepspeed_lora.py
    # resumes through `llamafactory-cli train` itself)
    resumes = [(f"{name}_resumed", config, precompute,
                {**SAVED, "resume_from_checkpoint": str(tmp_path / name / "out" / "checkpoint-1")})
               for name, config, precompute, _ in plan[1:]]
    results += launch_runs([_run(assets, tmp_path / name, config, precompute, **keys)
                            for name, config, precompute, keys in resumes], tmp_path / "launch_resumed", 2,
                           env=evidence_env(tmp_path / "launch_resumed" / "engine"), seconds_per_run=400)
    plan += resumes
    runs, engines = {}, {}
    for (name, _, precompute, _), result in zip(plan, results, strict=True):
        runs[name], engines[name] = _losses(result, tmp_path / name, precompute, name.endswith("resumed"))
    # equal losses prove nothing if DeepSpeed silently fell back to DDP: each run's engine is what it says
    for name, stage in (("ddp", None), ("zero2", 2), ("zero2_resumed", 2), ("zero3", 3), ("zero3_resumed", 3)):
        assert_engine(engines[name], stage)
    for fallback, stage in (("ddp", 2), ("ddp", 3), ("zero2", 3)):  # the checks tell the engines apart
        with pytest.raises(AssertionError):
            assert_engine(engines[fallback], stage)
    assert len(runs["ddp"]) == 2
    for name in ("zero2", "zero3"):
        for got, want in zip(runs[name], runs["ddp"], strict=True):
            assert got == pytest.approx(want, rel=1e-5), name
    assert runs["zero3"][1][2] != pytest.approx(0.07, abs=1e-3)  # the temperature learns under DeepSpeed too

    for name in ("zero2", "zero3"):
        assert runs[f"{name}_resumed"] == runs[name][1:], name
        compared = assert_resumed_equals_whole(tmp_path / name / "out", tmp_path / f"{name}_resumed" / "out", 2)
        assert {"hera_temperature_optimizer.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt", "hera_state.json",
                "hera_queue_rank0.pt", "hera_queue_rank1.pt"} <= set(compared), name


def test_heras_heads_under_zero3_gather_nothing_beyond_the_sft_twin(tmp_path: Path) -> None:
    """tests/hera/zero3_column_gather.py on two gloo ranks under torchrun, DeepSpeed ZeRO-3 with every parameter
    partitioned, no prefetch and nothing kept live: HeRA copies its heads' o_proj columns (and the adapter parts) in
    the modules' own calls, so a step with its term all-gathers exactly the bytes of the SFT twin's step (an older
    one gathered o_proj and each adapter matrix again in calls of their own, forward and backward); the weights after an
    SFT step and a HeRA step equal a brute-force reference on the unpartitioned layer (full fine-tuning, LoRA, DoRA)."""
    # torchrun's ranks forked from the warm process (tests/warm_launch.py): the script is what is tested here. With
    # the engine-evidence hook's environment of the ZeRO runs' launches, whose warm process serves it: the hook patches
    # the Trainer's step only, which the script never calls
    env = offline_env(tmp_path, engines=("deepspeed",), **evidence_env(tmp_path / "engine"))
    proc = run_python(Path(__file__).with_name("zero3_column_gather.py"), [], cwd=tmp_path, processes=2, env=env,
                      timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert proc.stdout.count(": ok") == 6, proc.stdout
