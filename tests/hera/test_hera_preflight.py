"""A `stage: hera` run that cannot train HeRA stops before its first step, and one that trains less of it says so."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from test_hera_train_inprocess import LogProbe

from conftest import base_recipe, image_less_dataset, read_trainer_log, run_train
from llamafactory_hera.hera.config import parse_hera_arguments
from llamafactory_hera.hera.preparation_checks import check_contrastive_geometry, contrastive_geometry


def _args(**keys: Any):
    return parse_hera_arguments({"hera_heads": ["L0H0"], **keys})


@pytest.mark.parametrize("per_device,processes,keys,largest,queue", [
    (16, 1, {}, 16, 0),  # the recipes: no queue
    (2, 1, {}, 2 + 44, 44),  # auto switches the queue on from the configured geometry
    (2, 1, {"hera_k": 1}, 2 + 8, 8),  # a set of 2 has no negative even when it holds hera_k+1: auto adds a queue
    (4, 4, {}, 16, 0),  # gathered over 4 processes: 16 >= k+1
    (4, 4, {"hera_gather": False}, 4 + 44, 44),  # per device only
    (1, 1, {"hera_queue_size": 8, "hera_k": 3}, 9, 8),
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


@pytest.mark.parametrize("keys,queue,capped_from", [
    ({"hera_k": 10}, 12, 44),  # auto asked for 4 x (k + 1): 12 distinct images are left beside a batch set of 4
    ({"hera_k": 10, "hera_queue_size": 404}, 12, 404),  # a queue set in the recipe too
    ({"hera_k": 3, "hera_queue_size": 12}, 12, None),  # exactly the images a batch set leaves: no cap
])
def test_the_training_datas_distinct_images_cap_the_queue(keys: dict[str, Any], queue: int,
                                                          capped_from: int | None) -> None:
    """hera_k: 100 on 16 images: the queue is capped at the distinct images (an auto queue of 404 would hold the same
    16 images again and again)."""
    from llamafactory_hera.hera.preparation_checks import queue_cap_line

    args = _args(**keys)
    geometry = contrastive_geometry(args, 4, 1, distinct_images=16)
    assert (geometry.queue, geometry.capped_from, geometry.largest) == (queue, capped_from, 4 + queue)
    check_contrastive_geometry(geometry, args)
    line = queue_cap_line(geometry, args)
    if capped_from is None:
        assert line is None and "capped" not in geometry.queue_reason
    else:
        assert line == (f"note: hera_queue_size: {args.hera_queue_size} gives a queue of {capped_from} samples, but "
                        "the training data has 16 distinct images and a batch set holds 4: a longer queue than 12 "
                        "would hold the same images again. The queue holds 12 (set hera_queue_size: 12 to say so in "
                        "the recipe).")
        assert geometry.queue_reason.endswith(f"; capped from {capped_from}: the training data has 16 distinct "
                                              "images, 4 of them in the batch set")


@pytest.mark.parametrize("keys,per_device,distinct,message", [
    ({"hera_k": 100}, 8, 16, "hera_k: 100: a contrastive set needs 101 distinct images (hera_k + 1: an anchor and its "
                             "100 teacher neighbours; at least 3 for a negative), but the training data has 16 "
                             "distinct images, so no set can ever hold 101 (a queue would only repeat them). Lower "
                             "hera_k to at most 15, or train on more images (another dataset, or a larger "
                             "max_samples)."),
    ({"hera_k": 1}, 8, 2, "hera_k: 1: a contrastive set needs 3 distinct images (hera_k + 1: an anchor and its 1 "
                          "teacher neighbour; at least 3 for a negative), but the training data has 2 distinct images, "
                          "so no set can ever hold 3 (a queue would only repeat them). Train on more images"),
    ({"hera_k": 10, "hera_queue_size": 2}, 4, None,
     "hera_k: 10: each contrastive set needs hera_k + 1 = 11 samples (an anchor and its 10 teacher neighbours), but "
     "with per_device_train_batch_size: 4 on 1 process(es) and hera_queue_size: 2 a set holds at most 6 (4 of a batch "
     "set + 2 queued). Raise per_device_train_batch_size to 11, set hera_queue_size: auto (or at least 7), or lower "
     "hera_k to at most 5."),
    ({"hera_k": 10, "hera_queue_size": 0}, 8, 100, "hera_k: 10: each contrastive set needs hera_k + 1 = 11 samples"),
])
def test_sets_that_can_never_hold_k_plus_1_distinct_images_are_refused(keys: dict[str, Any], per_device: int,
                                                                        distinct: int | None, message: str) -> None:
    """Refused: unchecked, the run trained with k lowered to the set's size at every step (one warning), or, when the
    dataset had fewer distinct images than hera_k + 1, with neighbours that were the same images again."""
    args = _args(**keys)
    with pytest.raises(ValueError) as error:
        check_contrastive_geometry(contrastive_geometry(args, per_device, 1, distinct_images=distinct), args)
    assert str(error.value).startswith(message), str(error.value)


def test_rows_sharing_their_images_count_once() -> None:
    from datasets import Dataset

    from llamafactory_hera.hera.preparation_checks import count_image_rows

    rows = Dataset.from_dict({"_images": [["a.png"], ["a.png"], ["b.png"], None, ["a.png", "b.png"]],
                              "_videos": [None, None, None, ["v.mp4"], None]})
    counts = count_image_rows(rows)
    assert (counts.rows, counts.image_rows, counts.video_only_rows, counts.distinct_images) == (5, 4, 1, 3)


def test_a_queue_beyond_the_distinct_images_is_capped_with_a_line(assets, tmp_path: Path) -> None:
    """hera_k: 10 on 16 images with batches of 4: the auto queue of 44 would hold every image about three times; it
    holds 12 (16 - 4), said before the model loads and in the start line, and logged."""
    out = tmp_path / "out"
    proc = run_train(base_recipe(assets, "qwen2_5_vl", out, hera_k=10, max_samples=16, per_device_train_batch_size=4,
                                 max_steps=4), tmp_path)
    output = proc.stdout + proc.stderr
    assert ("[llamafactory-hera] note: hera_queue_size: auto gives a queue of 44 samples, but the training data has 16 "
            "distinct images and a batch set holds 4") in output
    start = next(line for line in output.splitlines() if "[llamafactory-hera] HeRA: heads" in line)
    assert "queue 12 (auto: " in start and "; capped from 44: the training data has 16 distinct images" in start
    assert [line["hera_queue_size"] for line in read_trainer_log(out) if "loss" in line] == [4, 8, 12, 12]


def test_the_hera_k_cap_counts_the_images_that_train(assets, tmp_path: Path) -> None:
    """16 rows with val_size: 0.25 train on 12 images; hera_k: 12 needs 13 distinct images: refused before
    the model loads (counting the 16 rows' images, validation rows among them, would let the run train)."""
    output = _refused(assets, tmp_path, hera_k=12, max_samples=16, val_size=0.25, per_device_train_batch_size=4)
    assert ("hera_k: 12: a contrastive set needs 13 distinct images (hera_k + 1: an anchor and its 12 teacher "
            "neighbours; at least 3 for a negative), but the training data (dataset: hera_demo, max_samples: 16, "
            "without val_size: 0.25's validation rows) has 12 distinct images") in output
    assert "Lower hera_k to at most 11, or train on more images (another dataset, a larger max_samples, or a smaller " \
           "val_size)." in output


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


def test_rows_without_images_say_which_rows_train(assets, tmp_path: Path) -> None:
    folder = image_less_dataset(assets, tmp_path / "data")
    output = _refused(assets, tmp_path, dataset_dir=str(folder), val_size=0.25)
    assert ("dataset: ['hera_demo'] has no image in any of its 24 rows that train (val_size: 0.25 holds the others "
            "out); stage: hera aligns heads") in output


def test_fp16_under_deepspeed_with_a_learned_temperature_is_refused() -> None:
    from llamafactory_hera.hera.raw_checks import validate_raw_host_args

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
