"""Two torchrun ranks (CPU, gloo) with LoRA: plain DDP, then DeepSpeed ZeRO-3 and FSDP2 train HeRA exactly like it.

Under ZeRO-3 the frozen o_proj base weight and the LoRA matrices are partitioned (an empty placeholder outside their
modules' calls): HeRA projects the heads through module calls, the monitor reads W_O inside a gather. LLaMA-Factory's
default gradient checkpointing stays on (HeRA's heads' layers run non-reentrant; DeepSpeed before 0.19.3 failed their
frozen weights' recompute, deepspeedai/DeepSpeed#8148). The DDP run is also the test that torchrun ranks share one
temperature. Five two-rank runs in all: DDP (shared by both tests), ZeRO-3 saving after each step, ZeRO-3 resumed
from step 1, FSDP2 saving after each step, FSDP2 resumed from step 1.

Under FSDP2 every LoRA matrix and o_proj's base weight is a DTensor shard outside its layer's forward: HeRA gathers
them with FSDP2's gradient averaging (hera/projection.py ``whole``), the monitor's text pass runs through the FSDP2
root, and the temperature has its own optimizer. The runs go through ``accelerate launch`` with LLaMA-Factory's
fsdp2_config.yaml and the test-only shim in tests/fsdp_cpu (tests/fsdp_checks.py).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from engine_checks import assert_engine, evidence_env, read_evidence
from fsdp_checks import accelerate_launch, assert_fsdp2
from safetensors.torch import load_file

from conftest import REPO, base_recipe, read_trainer_log, run_train
from llamafactory_hera_testing.resume import assert_resumed_equals_whole

LOGGED = ("loss", "lm_loss", "hera_loss", "hera_temperature", "hera_mknn", "hera_mknn_control")


def _recipe(assets, tmp: Path, **keys: Any) -> dict[str, Any]:
    return base_recipe(assets, "qwen2_5_vl", tmp / "out", per_device_train_batch_size=4, max_steps=2,
                       hera_temperature_lr=0.05, hera_monitor_steps=1, **keys)


def _run(assets, tmp: Path, **keys: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The training log lines (with a loss) of a two-rank LoRA run of 2 steps, and each rank's engine evidence."""
    recipe = _recipe(assets, tmp, **keys)
    # 900 s: on a busy 2-core machine a two-rank ZeRO-3 run has come near 400 s
    proc = run_train(recipe, tmp, env={"FORCE_TORCHRUN": "1", "NPROC_PER_NODE": "2",
                                       **evidence_env(tmp / "engine")}, timeout=900)
    # LLaMA-Factory's default gradient checkpointing, HeRA's heads' layer (L1) switched to the non-reentrant kind
    assert "gradient checkpointing: reentrant (the recipe's) in 1 of 2 decoder layers; non-reentrant in layer 1 " \
        "(HeRA's heads)" in proc.stdout + proc.stderr
    return [line for line in read_trainer_log(tmp / "out") if "loss" in line], read_evidence(tmp / "engine", ranks=2)


def _logged(lines: list[dict[str, Any]]) -> list[tuple[float, ...]]:
    return [tuple(line[key] for key in LOGGED) for line in lines]


@pytest.fixture(scope="module")
def ddp(assets, tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict[str, Any]], Path]:
    """The two-rank DDP run: its log lines with a loss and its output_dir."""
    tmp = tmp_path_factory.mktemp("ddp")
    lines, engine = _run(assets, tmp)
    assert_engine(engine, None)
    return lines, tmp / "out"


def test_torchrun_ranks_share_one_temperature_and_zero3_lora_trains_like_ddp(assets, ddp, tmp_path: Path) -> None:
    ddp, ddp_out = ddp
    assert [line["current_steps"] for line in ddp] == [1, 2]
    # The logged temperature is the mean over ranks, the saved one is rank 0's: equal only if the ranks agree.
    state = json.loads((ddp_out / "hera_state.json").read_text())
    assert state["temperature"] == pytest.approx(ddp[-1]["hera_temperature"], rel=1e-7)
    assert state["temperature"] != pytest.approx(0.07, abs=1e-3)
    if importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed is not installed: the ZeRO-3 half of this test")

    zero3 = str(REPO / "recipes" / "deepspeed" / "ds_z3_config.json")
    saved = {"deepspeed": zero3, "save_strategy": "steps", "save_steps": 1}
    whole, engine = _run(assets, tmp_path / "zero3", **saved)
    assert_engine(engine, 3)  # o_proj's base weight is a partition: equal losses are not a silent DDP fallback
    # step 1 checks the forward through partitioned W_O and LoRA, step 2 the update of step 1
    for got, want in zip(_logged(whole), _logged(ddp), strict=True):
        assert got == pytest.approx(want, rel=1e-5)

    resumed, _ = _run(assets, tmp_path / "resumed", **saved,
                      resume_from_checkpoint=str(tmp_path / "zero3" / "out" / "checkpoint-1"))
    assert _logged(resumed) == _logged(whole)[1:]
    # the adapter (gathered on save), each rank's engine partition and optimizer state, the temperature and its own
    # optimizer: bit for bit
    assert {"model", "hera_temperature_optimizer.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt",
            "hera_state.json"} <= set(assert_resumed_equals_whole(tmp_path / "zero3" / "out",
                                                                  tmp_path / "resumed" / "out", 2))


def test_fsdp2_lora_trains_saves_and_resumes_like_ddp(assets, ddp, tmp_path: Path) -> None:
    """``accelerate launch`` with an FSDP2 config (FULL_STATE_DICT): DDP's losses, HeRA terms, monitor points and
    temperature step for step; DDP's adapter; stopped at step 1 and resumed, the run not stopped bit for bit (the
    adapter's resume copy is whole on every rank: patches/fsdp_adapter.py). Every rank's trainable parameters and
    o_proj's weight are DTensor shards at each step, at each save and after the resume's load: no silent DDP."""
    lines, ddp_out = ddp
    saved = {"save_strategy": "steps", "save_steps": 1}
    accelerate_launch(_recipe(assets, tmp_path / "fsdp2", **saved), tmp_path / "fsdp2")
    assert_fsdp2(tmp_path / "fsdp2", {"step", "save"})
    whole = [line for line in read_trainer_log(tmp_path / "fsdp2" / "out") if "loss" in line]
    for got, want in zip(_logged(whole), _logged(lines), strict=True):
        assert got == pytest.approx(want, rel=1e-5)
    temperature = json.loads((tmp_path / "fsdp2" / "out" / "hera_state.json").read_text())["temperature"]
    assert temperature == pytest.approx(whole[-1]["hera_temperature"], rel=1e-7) and temperature > 0.0701
    got, want = (load_file(folder / "adapter_model.safetensors") for folder in (tmp_path / "fsdp2" / "out", ddp_out))
    assert got.keys() == want.keys() and all(torch.allclose(got[k], want[k], rtol=0, atol=1e-6) for k in want)

    accelerate_launch(_recipe(assets, tmp_path / "resumed", **saved, resume_from_checkpoint=str(
        tmp_path / "fsdp2" / "out" / "checkpoint-1")), tmp_path / "resumed")
    assert_fsdp2(tmp_path / "resumed", {"load", "step", "save"})
    resumed = [line for line in read_trainer_log(tmp_path / "resumed" / "out") if "loss" in line]
    assert _logged(resumed) == _logged(whole)[1:]
    assert {"model", "optimizer.bin", "pytorch_model_fsdp.bin", "hera_temperature_optimizer.pt",
            "hera_state.json"} <= set(assert_resumed_equals_whole(tmp_path / "fsdp2" / "out",
                                                                  tmp_path / "resumed" / "out", 2))
