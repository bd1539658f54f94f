"""HeRA with LoRA and with full fine-tuning under FSDP2 on two CPU ranks (gloo), under ``accelerate launch
--config_file`` with LLaMA-Factory's fsdp2_config.yaml (tests/fsdp_checks.py). LoRA, three runs: the config
without the test-only shim (accelerate 1.11 trains it as plain DDP on CPU: the DDP twin on the same data, same
launcher) and with the shim (FSDP2, a checkpoint after each step) one after another in one launch (tests/dist_probe.py,
which calls run_exp as LLaMA-Factory's launcher.py does), then resumed from step 1 in a launch of its own of
launcher.py, as users start it. Full fine-tuning: the DDP twin and FSDP2 in one launch, two steps, one save. The
launches of tests/dist_probe.py fork their ranks from the warm process, with the variables accelerate gives them
(tests/warm_launch.py).

Under FSDP2 every LoRA matrix and o_proj's base weight is a DTensor shard outside its layer's forward: HeRA gathers
them with FSDP2's gradient averaging (hera/projection.py ``whole``), the monitor's text pass runs through the FSDP2
root (selection/collect.py ``through_root``), and the learned temperature has its own optimizer.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from dist_runs import launch_runs, run_python
from fsdp_checks import accelerate_launch, accelerate_launch_runs, assert_fsdp2, fsdp_run, read_fsdp_evidence
from safetensors.torch import load_file

from conftest import base_recipe, offline_env, read_trainer_log
from llamafactory_hera_testing.resume import assert_resumed_equals_whole

LOGGED = ("loss", "lm_loss", "hera_loss", "hera_temperature", "hera_mknn", "hera_mknn_control")
SAVED = {"save_strategy": "steps", "save_steps": 1}
QUEUED = {"hera_queue_size": 8}  # each rank's feature queue in each checkpoint
OFFLOAD = {"FSDP_OFFLOAD_PARAMS": "true"}


def _recipe(assets: Any, tmp: Path, **keys: Any) -> dict[str, Any]:
    return base_recipe(assets, "qwen2_5_vl", tmp / "out", per_device_train_batch_size=4, max_steps=2,
                       hera_temperature_lr=0.05, hera_monitor_steps=1, **SAVED, **keys)


def _logged(tmp: Path) -> list[tuple[float, ...]]:
    return [tuple(line[key] for key in LOGGED) for line in read_trainer_log(tmp / "out") if "loss" in line]


def test_fsdp2_lora_trains_saves_and_resumes_like_ddp(assets, tmp_path: Path) -> None:
    """DDP's losses, HeRA terms, monitor points and temperature step for step; DDP's adapter; stopped at step 1 and
    resumed, the run not stopped bit for bit (the adapter's resume copy is whole on every rank:
    patches/engines/fsdp_adapter.py). Every rank's trainable parameters and o_proj's weight are DTensor shards at
    each step,
    at each save and after the resume's load; without the shim none is (no silent DDP either way)."""
    ddp, fsdp2, resumed = tmp_path / "ddp", tmp_path / "fsdp2", tmp_path / "resumed"
    accelerate_launch_runs([fsdp_run(_recipe(assets, ddp, **QUEUED), ddp, shim=False),
                            fsdp_run(_recipe(assets, fsdp2, **QUEUED), fsdp2)], tmp_path / "launch")
    assert {(r["distributed_type"], r["trainable_dtensors"], r["o_proj_dtensor"]) for r in read_fsdp_evidence(ddp)} \
        == {("DistributedType.MULTI_CPU", 0, False)}
    assert_fsdp2(fsdp2, {"step", "save"})
    assert len(_logged(fsdp2)) == 2
    for got, want in zip(_logged(fsdp2), _logged(ddp), strict=True):
        assert got == pytest.approx(want, rel=1e-5)
    temperature = json.loads((fsdp2 / "out" / "hera_state.json").read_text())["temperature"]
    assert temperature == pytest.approx(_logged(fsdp2)[-1][3], rel=1e-7) and temperature > 0.0701  # it trained
    got, want = (load_file(folder / "out" / "adapter_model.safetensors") for folder in (fsdp2, ddp))
    assert got.keys() == want.keys() and all(torch.allclose(got[k], want[k], rtol=0, atol=1e-6) for k in want)

    # resumed in a new process, as users start it: accelerate launch of LLaMA-Factory's launcher.py
    accelerate_launch(_recipe(assets, resumed, resume_from_checkpoint=str(fsdp2 / "out" / "checkpoint-1"), **QUEUED),
                      resumed)
    assert_fsdp2(resumed, {"load", "step", "save"})
    assert _logged(resumed) == _logged(fsdp2)[1:]
    assert {"model", "optimizer.bin", "pytorch_model_fsdp.bin", "hera_temperature_optimizer.pt", "hera_state.json",
            "hera_queue_rank0.pt", "hera_queue_rank1.pt"} <= set(assert_resumed_equals_whole(fsdp2 / "out",
                                                                                           resumed / "out", 2))


def test_the_shipped_configs_efficient_loading_gives_the_teacher_of_a_torchrun_run(assets, tmp_path: Path) -> None:
    """recipes/accelerate/fsdp2_config.yaml loads with ``fsdp_cpu_ram_efficient_loading: true``, under which
    transformers fills every parameter of a model loaded on a process that is not local rank 0 with zeros (FSDP
    broadcasts the trained model's; a teacher nothing broadcasts stays zeros on rank 1, and so would its half of
    the precomputed features). FSDP2 with the efficient loading on (the shipped config's) and off, one after
    another in one ``accelerate launch``, against the reference: torchrun DDP in a launch of its own, without
    accelerate's FSDP environment. Step 1's lm_loss and hera_loss (the teacher features of every image, computed half
    on each rank and gathered before the step) equal the reference's."""
    shipped = yaml.safe_load((Path(__file__).parents[2] / "recipes/accelerate/fsdp2_config.yaml").read_text())
    assert shipped["fsdp_config"]["fsdp_cpu_ram_efficient_loading"] is True  # as FSDP2_CONFIG (tests/fsdp_checks.py)
    keys = dict(per_device_train_batch_size=4, max_steps=1, hera_monitor_steps=0, hera_teacher_precompute="true")
    ddp, on, off = tmp_path / "ddp", tmp_path / "on", tmp_path / "off"
    reference = launch_runs([{"recipe": base_recipe(assets, "qwen2_5_vl", ddp / "out", **keys)}], ddp, 2)[0]
    runs = accelerate_launch_runs([fsdp_run(base_recipe(assets, "qwen2_5_vl", on / "out", **keys), on),
                                   fsdp_run(base_recipe(assets, "qwen2_5_vl", off / "out", **keys), off,
                                            FSDP_CPU_RAM_EFFICIENT_LOADING="false")], tmp_path / "launch")
    for folder in (on, off):
        assert_fsdp2(folder, {"step"})
    want = [reference["logs"][0][key] for key in ("lm_loss", "hera_loss")]
    assert [[run["logs"][0][key] for key in ("lm_loss", "hera_loss")] for run in runs] == [
        pytest.approx(want, rel=1e-5)] * 2


def test_fsdp2_full_finetuning_trains_like_ddp(assets, tmp_path: Path) -> None:
    """Full fine-tuning under FSDP2: every trainable parameter (the language model's) and o_proj's weight is a DTensor
    shard at each step and at the one save (step 2), and the run gives DDP's losses step for step and DDP's saved
    model, with FSDP2's CPU offload on (``fsdp_offload_params: true``: the shards and the optimizer in host memory;
    on the CPU the test-only shim leaves the host memory unpinned, which needs a CUDA driver). Monitor off, one
    checkpoint: the cheapest run that steps and saves. ``hera_heads: auto``: rank 0 selects
    in the stage (multimodal mode, LLaMA-Factory's data pipeline with its barriers) and the other rank receives the
    heads; both runs choose the same heads."""
    ddp, fsdp2 = tmp_path / "ddp", tmp_path / "fsdp2"
    keys = dict(finetuning_type="full", hera_monitor_steps=0, save_strategy="steps", save_steps=2, hera_heads="auto",
                hera_select_samples=24, hera_select_mode="multimodal", hera_select_num_heads=3)
    results = accelerate_launch_runs([fsdp_run(base_recipe(assets, "qwen2_5_vl", folder / "out",
                                                           per_device_train_batch_size=4, max_steps=2, **keys),
                                               folder, shim=shim, **env)
                                      for folder, shim, env in ((ddp, False, {}), (fsdp2, True, OFFLOAD))],
                                     tmp_path / "launch")
    assert [result["stdout"].count("hera_heads: auto ->") for result in results] == [1, 1]  # rank 0 selects
    heads = [json.loads((folder / "out" / "hera_state.json").read_text())["heads"] for folder in (fsdp2, ddp)]
    assert heads[0] == heads[1] == json.loads((fsdp2 / "out" / "hera_selection.json").read_text())["selected"]
    assert len(heads[0]) == 3
    assert {(r["distributed_type"], r["trainable_dtensors"], r["o_proj_dtensor"]) for r in read_fsdp_evidence(ddp)} \
        == {("DistributedType.MULTI_CPU", 0, False)}
    assert {record["offload_to_cpu"] for record in assert_fsdp2(fsdp2, {"step", "save"})} == {True}
    losses = [[tuple(line[k] for k in ("hera_loss", "lm_loss", "loss")) for line in read_trainer_log(folder / "out")
               if "loss" in line] for folder in (fsdp2, ddp)]
    assert len(losses[0]) == 2
    for got, want in zip(*losses, strict=True):
        assert got == pytest.approx(want, rel=1e-6)
    got, want = (load_file(folder / "out" / "model.safetensors") for folder in (fsdp2, ddp))
    assert got.keys() == want.keys() and all(torch.allclose(got[k], want[k], rtol=0, atol=1e-5) for k in want)


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes is not installed")
def test_fsdp2_with_qlora_trains_like_ddp(assets, tmp_path: Path) -> None:
    """``quantization_bit: 4`` (nf4, double quantization) with LoRA under FSDP2, the efficient loading off (N17 in
    docs/configurations.md): o_proj's packed 4-bit storage is a DTensor shard holding half of its rows at each step and
    save, which HeRA gathers and dequantizes with the layer's quant_state (hera/projection.py). ``hera_heads: auto``
    scores the 4-bit model on rank 0 (text mode) and both runs choose the same heads; losses, HeRA terms, monitor
    points and temperature equal DDP's step for step, and so does the adapter. Stopped at step 1 and resumed (a launch
    of its own, as users resume), it ends bit for bit as the run not stopped."""
    ddp, fsdp2, resumed = tmp_path / "ddp", tmp_path / "fsdp2", tmp_path / "resumed"
    keys = dict(quantization_bit=4, double_quantization=True, hera_heads="auto", hera_select_samples=24,
                hera_select_num_heads=2)
    loading = {"FSDP_CPU_RAM_EFFICIENT_LOADING": "false"}
    accelerate_launch_runs([fsdp_run(_recipe(assets, ddp, **keys), ddp, shim=False, **loading),
                            fsdp_run(_recipe(assets, fsdp2, **keys), fsdp2, **loading)], tmp_path / "launch")
    assert {(r["distributed_type"], r["trainable_dtensors"], r["o_proj_dtensor"]) for r in read_fsdp_evidence(ddp)} \
        == {("DistributedType.MULTI_CPU", 0, False)}
    assert {record["o_proj_class"] for record in assert_fsdp2(fsdp2, {"step", "save"})} == {"Linear4bit"}
    heads = [json.loads((folder / "out" / "hera_state.json").read_text())["heads"] for folder in (fsdp2, ddp)]
    assert heads[0] == heads[1] and len(heads[0]) == 2
    assert len(_logged(fsdp2)) == 2
    for got, want in zip(_logged(fsdp2), _logged(ddp), strict=True):
        assert got == pytest.approx(want, rel=1e-5)
    got, want = (load_file(folder / "out" / "adapter_model.safetensors") for folder in (fsdp2, ddp))
    assert got.keys() == want.keys() and all(torch.allclose(got[k], want[k], rtol=0, atol=1e-6) for k in want)

    # a new process, as users resume (the ranks forked from the warm process: the LoRA test resumes in a real launch)
    recipe = _recipe(assets, resumed, resume_from_checkpoint=str(fsdp2 / "out" / "checkpoint-1"), **keys)
    accelerate_launch_runs([fsdp_run(recipe, resumed)], resumed, fsdp_config={"fsdp_cpu_ram_efficient_loading": False})
    assert_fsdp2(resumed, {"load", "step", "save"})
    assert _logged(resumed) == _logged(fsdp2)[1:]
    assert {"model", "optimizer.bin", "pytorch_model_fsdp.bin", "hera_temperature_optimizer.pt",
            "hera_state.json"} <= set(assert_resumed_equals_whole(fsdp2 / "out", resumed / "out", 2))


def test_the_gather_of_an_offloaded_shard_gives_the_unsharded_gradient(tmp_path: Path) -> None:
    """tests/hera/fsdp2_offload_gather.py on the CPU (one gloo rank): HeRA's gather of a shard (whole, and some of
    its columns), with and without FSDP2's CPU offload, gives the unsharded model's loss and gradient (a detached
    gather fails it: 0.14 off). On a GPU (bench/gpu.sh offload) the same script takes the move of the host shard to
    the GPU (one rank: no collective)."""
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name("fsdp2_offload_gather.py")), "--device", "cpu"],
                          capture_output=True, text=True, timeout=300, env=offline_env(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert proc.stdout.count(": ok") == 4 and "offload True: offloaded True, shard on cpu" in proc.stdout, proc.stdout


def test_heras_gather_moves_the_head_columns_only(tmp_path: Path) -> None:
    """tests/hera/fsdp2_column_gather.py on two gloo ranks under torchrun: HeRA's projection of sharded o_proj
    weights (full fine-tuning, LoRA, DoRA, LoRA on nf4 stored in bf16; rows even and uneven over the ranks) equals a
    brute-force reference on the unsharded layer (values, and gradients averaged over the ranks), and all-gathers the
    head columns and the adapter parts only: the bytes counted on the collectives are those, not the whole weight
    (an older one moved it whole). A 4-bit weight whose shards are whole rows and blocks moves its columns in bf16
    (1088 bytes with the adapter's; a whole packed gather moves 1856); unaligned shards still move it whole.
    Without bitsandbytes (the oldest stack) the 4-bit settings are left out."""
    four_bit = importlib.util.find_spec("bitsandbytes") is not None
    # torchrun's ranks forked from the warm process (tests/warm_launch.py): the script is what is tested here
    proc = run_python(Path(__file__).with_name("fsdp2_column_gather.py"), [], cwd=tmp_path, processes=2, timeout=300,
                      env=offline_env(tmp_path, engines=("bitsandbytes",) if four_bit else ()))
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert proc.stdout.count(": ok") == (16 if four_bit else 12), proc.stdout
