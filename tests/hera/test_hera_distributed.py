"""Global contrastive batch across processes (gloo, CPU) and the feature queue for small micro-batches."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from dist_runs import launch_runs

from conftest import base_recipe, read_trainer_log, run_train
from llamafactory_hera_testing.resume import assert_resumed_equals_whole


def test_two_processes_equal_one_process_over_the_concatenated_batch(assets, tmp_path: Path) -> None:
    """2 ranks x 4 samples with hera_gather vs 1 process x 8 samples (same rows: no shuffling): the HeRA loss and
    the HeRA part of the averaged gradient (lambda=1 minus lambda=0) are the same. Control: with hera_gather false each
    rank contrasts only its own 4 samples, so the loss differs (against the same one-process run)."""
    common = dict(finetuning_type="full", max_steps=1, disable_shuffling=True, max_grad_norm=0.0,
                  hera_heads=["L1H0", "L1H2"], hera_k=3)
    runs = {}
    # one process runs both lambdas; one torchrun both lambdas and the hera_gather-false control (its imports once)
    control = base_recipe(assets, "qwen2_5_vl", tmp_path / "local" / "out", per_device_train_batch_size=4,
                          hera_lambda=1.0, hera_gather=False, **common)
    for processes, batch in ((1, 8), (2, 4)):
        recipes = [base_recipe(assets, "qwen2_5_vl", tmp_path / f"{processes}_{lam}" / "out",
                               per_device_train_batch_size=batch, hera_lambda=lam, **common) for lam in (1.0, 0.0)]
        results = launch_runs([{"recipe": r} for r in recipes + [control] * (processes == 2)],
                              tmp_path / str(processes), processes)
        runs[processes, 1.0], runs[processes, 0.0], *rest = results
    local = rest[0]
    one, two = runs[1, 1.0], runs[2, 1.0]
    assert two["logs"][0]["hera_loss"] == pytest.approx(one["logs"][0]["hera_loss"], rel=1e-5)
    assert two["logs"][0]["hera_image_samples"] == 4 and one["logs"][0]["hera_image_samples"] == 8
    for layer in (0, 1):
        hera_one = runs[1, 1.0]["grads"][layer] - runs[1, 0.0]["grads"][layer]
        hera_two = runs[2, 1.0]["grads"][layer] - runs[2, 0.0]["grads"][layer]
        scale = float(hera_one.abs().max())
        assert scale > 1e-6
        # float32 rounding of sums taken in another order (8 rows vs 2 x 4 averaged) is relative to the gradient's
        # scale (~0.35 here; measured up to 1.9e-7 absolute on near-zero entries): a fixed atol of 1e-7 was flaky
        torch.testing.assert_close(hera_two, hera_one, rtol=1e-4, atol=1e-5 * scale)
    assert local["logs"][0]["hera_loss"] != pytest.approx(one["logs"][0]["hera_loss"], rel=1e-3)


def test_precomputed_teacher_features_are_split_over_ranks_and_train_identically(assets, tmp_path: Path) -> None:
    """2 ranks, hera_teacher_precompute true: each rank sends half of the 32 training images the monitor's probe
    pairs did not already send through the teacher (rank 0's rows, broadcast),
    the all-gathered cache serves every step, and the losses equal those of teacher forwards inside the steps."""
    common = dict(finetuning_type="full", max_steps=2, per_device_train_batch_size=4, hera_heads=["L1H0", "L1H2"],
                  hera_k=3)
    settings = ("true", "false")  # one torchrun, one run after the other
    runs = dict(zip(settings, launch_runs([{"recipe": base_recipe(assets, "qwen2_5_vl", tmp_path / setting / "out",
                                                              hera_teacher_precompute=setting, **common)}
                                           for setting in settings], tmp_path, 2), strict=True))
    assert "teacher features of 32 training images computed before the first step" in runs["true"]["stdout"]
    # the monitor's probe pairs (rank 0, before the precompute) are shared with every rank; the rest is split
    computed, shared = (int(n) for n in re.search(r"\((\d+) on this rank, (\d+) from this teacher's earlier pass",
                                                  runs["true"]["stdout"]).groups())
    assert shared > 0 and computed == -(-(32 - shared) // 2)
    assert "computed before the first step" not in runs["false"]["stdout"]
    for on, off in zip(runs["true"]["logs"], runs["false"]["logs"], strict=True):
        assert on["loss"] == pytest.approx(off["loss"], rel=1e-5)
        assert on["hera_loss"] == pytest.approx(off["hera_loss"], rel=1e-5)


def test_small_micro_batches_switch_the_queue_on_and_resume_restores_it(assets, tmp_path: Path) -> None:
    """Per-device batch 2 with gradient accumulation and k=3: the queue switches on (logged), the loss is finite,
    and a run resumed from a checkpoint continues with the same queue: same losses as an uninterrupted run."""
    common = dict(per_device_train_batch_size=2, gradient_accumulation_steps=2, hera_k=3, max_steps=4,
                  save_strategy="steps", save_steps=2, hera_lambda=1.0)
    full = tmp_path / "full" / "out"
    proc = run_train(base_recipe(assets, "qwen2_5_vl", full, **common), tmp_path / "full")
    assert "queue 16 (auto: contrastive sets of at most 2 image samples" in proc.stdout + proc.stderr
    lines = [line for line in read_trainer_log(full) if "loss" in line]
    assert [line["hera_queue_size"] for line in lines] == [4, 8, 12, 16]
    assert all(line["hera_loss"] == line["hera_loss"] and line["hera_loss"] < 1e3 for line in lines)
    assert (full / "checkpoint-2" / "hera_queue_rank0.pt").is_file()

    resumed = tmp_path / "resumed" / "out"
    run_train(base_recipe(assets, "qwen2_5_vl", resumed, resume_from_checkpoint=str(full / "checkpoint-2"),
                          **common), tmp_path / "resumed")
    after = [line for line in read_trainer_log(resumed) if "loss" in line]
    assert [line["current_steps"] for line in after] == [3, 4]
    for got, want in zip(after, lines[2:], strict=True):
        assert got["hera_queue_size"] == want["hera_queue_size"]
        assert got["hera_loss"] == pytest.approx(want["hera_loss"], rel=1e-5)
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)
    # and bit for bit: the adapter, the optimizer, the temperature and the queue
    assert "hera_queue_rank0.pt" in assert_resumed_equals_whole(full, resumed, 4)


def test_queue_size_validation() -> None:
    from llamafactory_hera.hera.config import parse_hera_arguments
    from llamafactory_hera.hera.preparation_checks import contrastive_geometry

    args = parse_hera_arguments({"hera_heads": ["L0H0"], "hera_queue_size": "32"})
    assert contrastive_geometry(args, 64, 1).queue == 32  # 64 samples per set: a queue is not needed
    assert contrastive_geometry(parse_hera_arguments({"hera_heads": ["L0H0"]}), 2, 1).queue == 44  # auto, needed
    assert contrastive_geometry(parse_hera_arguments({"hera_heads": ["L0H0"], "hera_queue_size": 0}), 2, 1).queue == 0
    with pytest.raises(ValueError, match="hera_queue_size: got 'big'; allowed values are auto or a whole number"):
        parse_hera_arguments({"hera_heads": ["L0H0"], "hera_queue_size": "big"})
