"""Host syncs of HeRA's training step on the simulated accelerator, against plain SFT's.

A device-to-host sync stalls the CPU until the GPU has run every queued kernel, so the next kernels are launched
late. Plain SFT (the same recipe, ``stage: sft``, no ``hera_*`` key) syncs where the Trainer logs; a HeRA step that
does not log must add none to it. Its checks (a non-finite loss, a micro-batch without a term) are counted on
the device and read at the logging step.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from conftest import base_recipe, read_trainer_log, simulated_accelerator

pytestmark = pytest.mark.accelerator

STEPS = dict(max_steps=4, logging_steps=2, max_samples=32, per_device_train_batch_size=8, save_strategy="no")


def sft_recipe(assets: Any, family: str, out: Path, **overrides: Any) -> dict[str, Any]:
    """The HeRA recipe as plain SFT: ``stage: sft`` and no ``hera_*`` key."""
    recipe = base_recipe(assets, family, out, **STEPS, **overrides)
    return {**{k: v for k, v in recipe.items() if not k.startswith("hera_")}, "stage": "sft"}


def step_syncs(accelerator: Any, recipe: dict[str, Any], counter: Any = None) -> tuple[list, list, list]:
    """``StepSyncs.steps`` of one run on the device: (global step, logged, Counter of syncs by kind); the frames; and
    where each wait fell in its step (``StepSyncs.waits``)."""
    from llamafactory.train.tuner import run_exp

    from llamafactory_hera_testing.accelerator_run import StepSyncs

    counter = counter or StepSyncs(accelerator)
    with accelerator:
        run_exp(recipe, callbacks=[counter])
    return counter.steps, counter.where, counter.waits


def none_earlier(mine: list[tuple[str, int, str]], reference: list[tuple[str, int, str]]) -> list[str]:
    """Where ``mine`` (a step's waits: kind, ops up to it, frame) waits otherwise than ``reference``: a wait of
    another kind or place in the order, or one after fewer ops than the reference's (earlier in the step)."""
    if [(kind, frame) for kind, _, frame in mine] != [(kind, frame) for kind, _, frame in reference]:
        return [f"waits differ: {[w[::2] for w in mine]} against {[w[::2] for w in reference]}"]
    return [f"{kind} at {frame}: after {ops} ops, SFT's after {theirs}"
            for (kind, ops, frame), (_, theirs, _) in zip(mine, reference, strict=True) if ops < theirs]


def pinned_buffers(monkeypatch: Any) -> dict[int, bool]:
    """Take the simulated accelerator for CUDA in the teacher cache's copies (where they pin their staging buffers)
    and note every staging buffer it asks for: data_ptr -> asked pinned. The buffers are ordinary CPU tensors (a
    CPU-only torch cannot pin) kept alive, so that no address is reused."""
    from llamafactory_hera.hera import teacher_cache

    asked: dict[int, bool] = {}
    kept: list[Any] = []
    make = teacher_cache.host_buffer

    def host_buffer(rows: int, width: int, dtype: Any, pinned: bool) -> Any:
        buffer = make(rows, width, dtype, False)
        kept.append(buffer)
        asked[buffer.data_ptr()] = pinned
        return buffer

    monkeypatch.setattr(teacher_cache, "pinned_copies", lambda device: True)
    monkeypatch.setattr(teacher_cache, "host_buffer", host_buffer)
    return asked


def without_copies(counts: Counter[str]) -> Counter[str]:
    """The syncs of ``counts``: copies to the device and non-blocking ones to the host are not waited for."""
    from llamafactory_hera_testing.accelerator import ASYNC_TO_HOST

    return Counter({kind: n for kind, n in counts.items() if kind not in ("to device", ASYNC_TO_HOST)})


@pytest.fixture(scope="module")
def sft_syncs(assets: Any, tmp_path_factory: pytest.TempPathFactory) -> tuple[list, list, list]:
    """Plain SFT's :func:`step_syncs` on its own simulated device: the reference of every case below, run once (the
    cases' patches are HeRA's, which a ``stage: sft`` run does not call)."""
    with pytest.MonkeyPatch.context() as patches, simulated_accelerator(patches) as device:
        return step_syncs(device, sft_recipe(assets, "qwen2_5_vl", tmp_path_factory.mktemp("sft")))


@pytest.mark.parametrize("teacher", ["precomputed", "in_step", "in_step_cached", "zero3_reads"])
def test_a_non_logging_hera_step_adds_no_sync_to_sft(assets, sft_syncs, accelerator, tmp_path: Path, teacher: str,
                                                     monkeypatch) -> None:
    """Step 3 (not logged): HeRA's device-to-host syncs equal SFT's (16 on this model: the Qwen2.5-VL forward's
    and the Trainer's own), asked for by the same frames in the same order, none after fewer ops of the step than
    SFT's. Its host-to-device copies exceed SFT's by 4 at most: the batch's three HeRA tensors (image counts, pooling
    weights, anchor indices) and one copy of the cached teacher features (in_step: the teacher's pixels instead).

    The precomputed run also has the alignment monitor scoring at every logging step (``hera_monitor_steps: 2``):
    step 3 has none of its work.

    Before (precomputed): 25 syncs, 9 more than SFT: 3 ``item`` (the trainer's two counts and its finiteness
    check), 5 boolean masks (2 in the trainer, their backward, 2 in the loss), 1 ``repeat_interleave`` (the
    teacher features); and 12 copies (SFT: 8).

    zero3_reads: the heads' weight columns read in o_proj's calls, as under DeepSpeed ZeRO-3 (hera/capture.py; every
    weight taken for a partition): the column index goes to the device once, not in every call (6-9 copies a step,
    each waited for from pageable memory).

    Precomputed, the cached features' copy comes from a staging buffer pinned for CUDA (the simulated device stands in
    for it): from pageable memory, a non-blocking copy can make the host wait for the forward before the backward.
    """
    from llamafactory_hera_testing.accelerator_run import StepSyncs

    hera_keys = {"precomputed": {"hera_teacher_precompute": "true", "hera_monitor_steps": 2},
                 "in_step": {"hera_teacher_cache": False, "hera_monitor_steps": 0},  # the default scores every step
                 # of a 4-step run; the precomputed case checks that a step without a point has none of the monitor's
                 # work. in_step_cached: the teacher runs in the steps and its new rows go to the cache (what
                 # hera_teacher_precompute: auto does when max_steps ends inside the first epoch)
                 "in_step_cached": {"hera_teacher_precompute": "false", "hera_monitor_steps": 0},
                 "zero3_reads": {"hera_teacher_precompute": "true", "hera_monitor_steps": 0}}
    if teacher == "zero3_reads":
        from llamafactory_hera.hera import capture

        monkeypatch.setattr(capture, "is_zero3_partition", lambda weight: True)
    sft, sft_where, sft_waits = sft_syncs
    asked = pinned_buffers(monkeypatch) if teacher != "in_step" else {}
    counter = StepSyncs(accelerator)
    hera, hera_where, hera_waits = step_syncs(accelerator, base_recipe(assets, "qwen2_5_vl", tmp_path / "hera", **STEPS,
                                                           **hera_keys[teacher]), counter)
    print("\nSFT ", [(s, logged, dict(c)) for s, logged, c in sft])
    print("HeRA", [(s, logged, dict(c)) for s, logged, c in hera])
    print("HeRA step 3:\n" + hera_where[2])
    assert [(s, logged) for s, logged, _ in hera] == [(1, False), (2, True), (3, False), (4, True)]
    assert without_copies(hera[2][2]) == without_copies(sft[2][2]), hera_where[2]
    # the same waits, in the same order, none of them earlier in the step than SFT's (HeRA's ops come before them or
    # after the last)
    assert not none_earlier(hera_waits[2], sft_waits[2]), none_earlier(hera_waits[2], sft_waits[2])
    assert hera[2][2]["to device"] - sft[2][2]["to device"] <= 4, hera_where[2]
    feature_copies = [ptr for ptr, frame in counter.copy_sources[2] if "teacher_cache.py" in frame]
    if teacher in ("precomputed", "zero3_reads"):
        assert len(feature_copies) == 1 and asked.get(feature_copies[0]) is True, (feature_copies, asked)
    elif teacher == "in_step":
        assert not feature_copies  # no cache: the teacher's own features, already on the device
    else:  # the new rows leave for the cache without a wait; rows cached at an earlier step come from pinned memory
        assert all(asked.get(ptr) is True for ptr in feature_copies) and len(feature_copies) <= 1, feature_copies
        cache_lines = [line for line in hera_where[2].splitlines() if "teacher_cache.py" in line]
        assert [line.split(":")[0] for line in cache_lines] == ["to host, non-blocking"], hera_where[2]
    if teacher == "precomputed":  # the alignment monitor scored at the logging steps only (and before step 1)
        points = [line["current_steps"] for line in read_trainer_log(tmp_path / "hera") if "hera_mknn" in line]
        assert points == [0, 2, 4]
