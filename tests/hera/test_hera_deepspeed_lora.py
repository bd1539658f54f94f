"""Two torchrun ranks (CPU, gloo) with LoRA: plain DDP, then DeepSpeed ZeRO-3 trains HeRA exactly like it.

Under ZeRO-3 the frozen o_proj base weight and the LoRA matrices are partitioned (an empty placeholder outside their
modules' calls): HeRA projects the heads through module calls, the monitor reads W_O inside a gather. LLaMA-Factory's
default gradient checkpointing stays on (HeRA's heads' layers run non-reentrant; DeepSpeed before 0.19.3 failed their
frozen weights' recompute, deepspeedai/DeepSpeed#8148). The DDP run is also the test that torchrun ranks share one
temperature. DDP and ZeRO-3 saving after each step share one two-rank launch (tests/dist_runs.py); ZeRO-3 resumed
from step 1 is a `llamafactory-cli train` launch of its own, as users resume.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from dist_runs import launch_runs, torchrun_cli
from engine_checks import assert_engine, evidence_env, read_evidence, zero3_partitioning_everything
from safetensors.torch import load_file

from conftest import REPO, base_recipe, read_trainer_log, saved_in_bf16
from llamafactory_hera_testing.resume import assert_resumed_equals_whole

LOGGED = ("loss", "lm_loss", "hera_loss", "hera_temperature", "hera_mknn", "hera_mknn_control")


def _run(assets, tmp: Path, **keys: Any) -> dict[str, Any]:
    """A two-rank LoRA run of 2 steps (unless ``keys`` say), its engine evidence written to ``tmp / "engine"``."""
    recipe = base_recipe(assets, "qwen2_5_vl", tmp / "out", **{"per_device_train_batch_size": 4, "max_steps": 2,
                                                               "hera_temperature_lr": 0.05, "hera_monitor_steps": 1,
                                                               **keys})
    return {"recipe": recipe, "env": {"HERA_TEST_ENGINE_EVIDENCE": str(tmp / "engine")}}


def _read(result: dict[str, Any], tmp: Path, zero3: bool) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The training log lines (with a loss) of a run, and each rank's engine evidence."""
    # LLaMA-Factory's default gradient checkpointing; under ZeRO-3, whose W_O columns are copied inside o_proj's call,
    # HeRA's heads' layer (L1) switched to the non-reentrant kind, else its heads read out of its reentrant checkpoint
    assert ("gradient checkpointing: reentrant (the recipe's) in 1 of 2 decoder layers; non-reentrant in layer 1 "
            "(HeRA's heads)" if zero3 else "gradient checkpointing: reentrant (the recipe's) in every decoder layer; "
            "HeRA's heads read out of the reentrant checkpoint of layer 1") in result["stdout"]
    return [line for line in read_trainer_log(tmp / "out") if "loss" in line], read_evidence(tmp / "engine", ranks=2)


def _logged(lines: list[dict[str, Any]]) -> list[tuple[float, ...]]:
    return [tuple(line[key] for key in LOGGED) for line in lines]


def test_torchrun_ranks_share_one_temperature_and_zero3_lora_trains_like_ddp(assets, tmp_path: Path) -> None:
    zero3 = str(REPO / "recipes" / "deepspeed" / "ds_z3_config.json")
    saved = {"deepspeed": zero3, "save_strategy": "steps", "save_steps": 1}
    plan = {"ddp": {}, **({"zero3": saved} if importlib.util.find_spec("deepspeed") is not None else {})}
    # 400 s per run: on a busy 2-core machine a two-rank ZeRO-3 run has come near 400 s
    results = launch_runs([_run(assets, tmp_path / name, **keys) for name, keys in plan.items()],
                          tmp_path / "launch", 2, env=evidence_env(tmp_path / "launch" / "engine"), seconds_per_run=400)
    runs = {name: _read(result, tmp_path / name, "deepspeed" in plan[name])
            for name, result in zip(plan, results, strict=True)}
    ddp, engine = runs["ddp"]
    assert_engine(engine, None)
    assert [line["current_steps"] for line in ddp] == [1, 2]
    # The logged temperature is the mean over ranks, the saved one is rank 0's: equal only if the ranks agree.
    state = json.loads((tmp_path / "ddp" / "out" / "hera_state.json").read_text())
    assert state["temperature"] == pytest.approx(ddp[-1]["hera_temperature"], rel=1e-7)
    assert state["temperature"] != pytest.approx(0.07, abs=1e-3)
    if "zero3" not in plan:
        pytest.skip("deepspeed is not installed: the ZeRO-3 half of this test")

    whole, engine = runs["zero3"]
    assert_engine(engine, 3)  # o_proj's base weight is a partition: equal losses are not a silent DDP fallback
    # step 1 checks the forward through partitioned W_O and LoRA, step 2 the update of step 1
    for got, want in zip(_logged(whole), _logged(ddp), strict=True):
        assert got == pytest.approx(want, rel=1e-5)

    # resumed in a new process, as users resume: `llamafactory-cli train` under torchrun
    resumed_run = _run(assets, tmp_path / "resumed", **saved,
                       resume_from_checkpoint=str(tmp_path / "zero3" / "out" / "checkpoint-1"))
    resumed, engine = _read(torchrun_cli(resumed_run, tmp_path / "resumed"), tmp_path / "resumed", True)
    assert_engine(engine, 3)
    assert _logged(resumed) == _logged(whole)[1:]
    # the adapter (gathered on save), each rank's engine partition and optimizer state, the temperature and its own
    # optimizer: bit for bit
    assert {"model", "hera_temperature_optimizer.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt",
            "hera_state.json"} <= set(assert_resumed_equals_whole(tmp_path / "zero3" / "out",
                                                                  tmp_path / "resumed" / "out", 2))


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None or importlib.util.find_spec("bitsandbytes") is None,
                    reason="deepspeed and bitsandbytes are not both installed")
def test_zero3_with_qlora_or_dora_trains_like_ddp(assets, tmp_path: Path) -> None:
    """LLaMA-Factory's ZeRO-3 + QLoRA (``quantization_bit: 4``, double quantization; LLaMA-Factory allows 4-bit only
    under ZeRO-3): o_proj's packed 4-bit weight is a ZeRO-3 partition, which HeRA reads in the base layer's own call and
    dequantizes with its quant_state (hera/capture.py ``InCallColumns``), the monitor inside a gather. In
    float32, every parameter partitioned, the adapter's included, losses, HeRA terms, monitor points and temperature
    equal DDP's step for step, and so does the adapter. In bf16 as users run it (``bf16: true`` on a checkpoint saved
    in bf16, so the codes are stored in bf16, which DeepSpeed's bf16 cast leaves as they are), 3 steps: step 1 equals
    DDP's exactly (the codes reach the forward as loaded), the later steps within bf16's rounding of the two engines'
    updates (measured up to 1.4e-4 relative: ZeRO-3 trains bf16 copies of the adapter from fp32 masters, DDP the fp32
    adapter under autocast).
    ``use_dora: true`` under ZeRO-3 with every parameter partitioned, the adapters and magnitudes included (DoRA's row
    norm taken where PEFT's forward computes it, its magnitude in its module's call): as DDP's DoRA run, the magnitude
    included."""
    keys = {"quantization_bit": 4, "double_quantization": True}
    # the fp32 and DoRA runs with every parameter partitioned; the bf16 run with the stock config, as shipped
    stock = REPO / "recipes" / "deepspeed" / "ds_z3_config.json"
    zero3 = {"deepspeed": zero3_partitioning_everything(tmp_path)}
    bf16 = {"bf16": True, "use_cpu": True, "max_steps": 3,
            "model_name_or_path": str(saved_in_bf16(assets.models["qwen2_5_vl"], tmp_path / "bf16_model"))}
    dora = {"use_dora": True}
    plan = {"ddp": keys, "zero3": {**keys, **zero3}, "ddp_bf16": {**keys, **bf16},
            "zero3_bf16": {**keys, **bf16, "deepspeed": str(stock)}, "ddp_dora": dora, "zero3_dora": {**dora, **zero3}}
    results = launch_runs([_run(assets, tmp_path / name, **keys) for name, keys in plan.items()],
                          tmp_path / "launch", 2, env=evidence_env(tmp_path / "launch" / "engine"), seconds_per_run=400)
    runs = {name: _read(result, tmp_path / name, "deepspeed" in plan[name])
            for name, result in zip(plan, results, strict=True)}
    for name in plan:
        assert_engine(runs[name][1], 3 if name.startswith("zero3") else None)  # ZeRO-3: o_proj's weight a partition
        assert {record["o_proj_class"] for record in runs[name][1]} == {"Linear" if "dora" in name else "Linear4bit"}
    logged = {name: _logged(runs[name][0]) for name in plan}
    assert [len(logged[name]) for name in plan] == [2, 2, 3, 3, 2, 2]
    for name in ("zero3", "zero3_dora"):
        for got, want in zip(logged[name], logged[name.replace("zero3", "ddp")], strict=True):
            assert got == pytest.approx(want, rel=1e-5), name
        got, want = (load_file(tmp_path / run / "out" / "adapter_model.safetensors")
                     for run in (name, name.replace("zero3", "ddp")))
        assert got.keys() == want.keys() and all(torch.allclose(got[k], want[k], rtol=0, atol=1e-6) for k in want)
    assert any("lora_magnitude_vector" in key for key in got)  # the DoRA pair, compared last
    assert logged["zero3_bf16"][0] == logged["ddp_bf16"][0]
    for got, want in zip(logged["zero3_bf16"][1:], logged["ddp_bf16"][1:], strict=True):  # MKNN: a neighbour may swap
        assert got[:4] == pytest.approx(want[:4], rel=1e-3) and got[4:] == pytest.approx(want[4:], abs=0.02)
