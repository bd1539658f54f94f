"""A `stage: hera` run that cannot train HeRA stops before its first step, and one that trains less of it says so."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from test_hera_train_inprocess import LogProbe

from conftest import base_recipe, image_less_dataset, run_train
from llamafactory_hera.hera.args import parse_hera_arguments
from llamafactory_hera.hera.preflight import check_contrastive_geometry, contrastive_geometry


def _args(**keys: Any):
    return parse_hera_arguments({"hera_heads": ["L0H0"], **keys})


@pytest.mark.parametrize("per_device,processes,keys,largest,queue", [
    (16, 1, {}, 16, 0),  # the recipes: no queue
    (2, 1, {}, 2 + 44, 44),  # auto switches the queue on from the configured geometry
    (2, 1, {"hera_k": 1}, 2 + 8, 8),  # a set of 2 has no negative even when it holds hera_k+1: auto adds a queue
    (4, 4, {}, 16, 0),  # gathered over 4 processes: 16 >= k+1
    (4, 4, {"hera_gather": False}, 4 + 44, 44),  # per device only
    (1, 1, {"hera_queue_size": 8}, 9, 8),
])
def test_contrastive_geometry_is_decided_from_the_batch_geometry(per_device, processes, keys, largest, queue) -> None:
    geometry = contrastive_geometry(_args(**keys), per_device, processes)
    assert (geometry.largest, geometry.queue) == (largest, queue)
    check_contrastive_geometry(geometry, _args(**keys))


@pytest.mark.parametrize("per_device,message", [
    (1, "can never hold 2 image samples"),
    (2, "there is no negative, and hera_loss would be exactly 0 every step"),
])
def test_contrastive_sets_without_a_negative_are_refused(per_device: int, message: str) -> None:
    args = _args(hera_queue_size=0)
    with pytest.raises(ValueError, match=f"per_device_train_batch_size: {per_device} on 1 process.*{message}"):
        check_contrastive_geometry(contrastive_geometry(args, per_device, 1), args)


def _refused(assets, tmp_path: Path, **overrides: Any) -> str:
    proc = run_train(base_recipe(assets, "qwen2_5_vl", tmp_path / "out", **overrides), tmp_path, check=False)
    assert proc.returncode != 0
    assert not (tmp_path / "out" / "trainer_log.jsonl").exists()  # stopped before the first step
    return proc.stdout + proc.stderr


@pytest.mark.parametrize("overrides,message", [
    ({"per_device_train_batch_size": 1, "hera_queue_size": 0}, "can never hold 2 image samples"),
    ({"per_device_train_batch_size": 2, "hera_queue_size": 0}, "there is no negative"),
    ({"use_unsloth_gc": True}, "stage: hera cannot run with use_unsloth_gc: true"),
])
def test_runs_that_cannot_train_hera_stop_before_the_first_step(assets, tmp_path: Path, overrides, message) -> None:
    assert message in _refused(assets, tmp_path, **overrides)


@pytest.mark.parametrize("heads", ["listed", "auto"])  # auto: before selection, whose error spoke of too few pairs
def test_a_dataset_without_any_image_is_refused(assets, tmp_path: Path, heads: str) -> None:
    folder = image_less_dataset(assets, tmp_path / "data")
    output = _refused(assets, tmp_path, dataset_dir=str(folder), **({"hera_heads": "auto"} if heads == "auto" else {}))
    assert "dataset: ['hera_demo'] has no image in any of its 32 rows" in output and "use stage: sft" in output


def test_fp16_under_deepspeed_with_a_learned_temperature_is_refused() -> None:
    from llamafactory_hera.hera.host_checks import validate_raw_host_args

    message = "cannot learn the temperature under DeepSpeed with fp16: true"
    with pytest.raises(ValueError, match=message):
        validate_raw_host_args({"deepspeed": "ds_z3.json", "fp16": True}, _args())
    with pytest.raises(ValueError, match=message):
        validate_raw_host_args(["--deepspeed", "ds.json", "--fp16"], _args())
    validate_raw_host_args({"deepspeed": "ds_z3.json", "bf16": True}, _args())
    validate_raw_host_args({"deepspeed": "ds_z3.json", "fp16": True}, _args(hera_learn_temperature=False))


def test_start_line_and_text_only_micro_batches_are_reported(assets, tmp_path: Path) -> None:
    """The mixed dataset has text-only rows; per-device batch 2 makes some micro-batches text-only or single."""
    out = tmp_path / "out"
    recipe = base_recipe(assets, "qwen2_5_vl", out, dataset="hera_demo_mixed", per_device_train_batch_size=2,
                         max_steps=8)
    proc = run_train(recipe, tmp_path)
    output = proc.stdout + proc.stderr
    start = next(line for line in output.splitlines() if "[llamafactory-hera] HeRA: heads" in line)
    for part in ("heads [L1H0, L1H2]", "(cls)", "k 3", "lambda 0.01", "temperature 0.07 learned (lr 0.001",
                 "pooling assistant", "gather n/a (1 process)", "queue 16 (auto: contrastive sets of at most 2",
                 "precompute auto -> off", "image rows 24/32 (8 text-only: LM loss only)"):
        assert part in start, part
    assert output.count("had no HeRA term") == 1
    end = next(line for line in output.splitlines() if "HeRA term in" in line)
    lines = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    missing = int(sum(line.get("hera_batches_without_term", 0) for line in lines))
    assert missing > 0 and f"HeRA term in {8 - missing} of 8 micro-batches" in end


def test_logged_loss_is_lm_loss_plus_the_weighted_hera_loss_in_every_case(assets, tmp_path: Path) -> None:
    """With micro-batches that have no HeRA term (text-only) under gradient accumulation, lambda * hera_loss is not
    what entered `loss`; hera_weighted_loss is."""
    from llamafactory.train.tuner import run_exp

    recipe = base_recipe(assets, "qwen2_5_vl", tmp_path / "out", dataset="hera_demo_mixed",
                         per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=6, hera_lambda=0.5)
    probe = LogProbe()
    run_exp(recipe, callbacks=[probe])
    for logs in probe.logs:
        assert logs["loss"] == pytest.approx(logs["lm_loss"] + logs["hera_weighted_loss"], rel=1e-4)
