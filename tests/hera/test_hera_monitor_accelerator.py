"""The alignment monitor (``hera_monitor_steps``) in a bf16 HeRA run on the simulated accelerator.

The run is ``bf16: true`` as the recipes set it, through the real ``run_exp`` on the device.
LLaMA-Factory loads a model in its checkpoint's dtype: the tiny checkpoint is float32, so its weights stay float32
(asserted), and the monitor's scoring runs in float32 (``layer_head_neighbours`` casts both sides). Checked here:

* values: the step-0 point equals the fp32 CPU run's step-0 point, and lies within one resolution step of
  ``select --report``'s "before" (which loads the model in bfloat16 for a ``bf16: true`` recipe);
* host syncs: per optimizer step, against the same run with the monitor off, on every step that is not a monitor
  step the counts are equal (no sync added), and a monitor step adds a stated number.

Not simulated: CUDA autocast. On a GPU accelerate wraps the model's forward in ``torch.autocast("cuda", bf16)``; the
simulated device has no autocast, so the run's forward (and the monitor's) computes in the weights' dtypes (bf16
base weights, fp32 LoRA weights). See :func:`bf16_on_the_device`.
"""

from __future__ import annotations

import contextlib
import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from dist_runs import launch_runs

from conftest import base_recipe, read_trainer_log

pytestmark = pytest.mark.accelerator

FAMILY = "qwen2_5_vl"
HEADS = ["L1H0", "L1H2"]
# steps 1-4 of 8 rows; logging at 2 and 4; the monitor at 0 and 3 (a step that does not log, so its cost is its own)
KEYS = dict(max_steps=4, logging_steps=2, max_samples=32, per_device_train_batch_size=8, save_strategy="no",
            hera_heads=HEADS, hera_k=3, hera_teacher_precompute="true")
MONITOR_STEP = 3


class _NoAutocast(contextlib.ContextDecorator):
    """What accelerate gets instead of ``torch.autocast`` on the simulated device: a context and decorator doing
    nothing."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None


def bf16_on_the_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let ``bf16: true`` through on the simulated device as it goes through on a GPU.

    transformers refuses ``bf16`` without a bf16 GPU (``use_cpu`` would make the Trainer place the run on the CPU), so
    it is told the GPU has bf16. accelerate then wraps the model's forward in ``torch.autocast(device_type=...)``,
    which torch refuses for the simulated device's type: autocast is left out (a no-op context), see the module doc.
    """
    import accelerate.accelerator
    import transformers.training_args

    monkeypatch.setattr(transformers.training_args, "is_torch_bf16_gpu_available", lambda: True)
    original = accelerate.accelerator.get_mixed_precision_context_manager

    def no_autocast_on_the_device(native_amp: bool = False, autocast_kwargs: Any = None) -> Any:
        from accelerate.state import AcceleratorState

        if AcceleratorState().device.type == "meta":
            return _NoAutocast()
        return original(native_amp, autocast_kwargs)

    monkeypatch.setattr(accelerate.accelerator, "get_mixed_precision_context_manager", no_autocast_on_the_device)


class _Dtypes:
    """The dtypes and device types of the model's weights when training begins (a ``TrainerCallback``)."""

    def __init__(self) -> None:
        self.seen: Counter[tuple[str, str]] = Counter()

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        self.seen.update((str(p.dtype), p.device.type) for p in model.parameters())

    def __getattr__(self, name: str) -> Any:
        if name.startswith("on_"):
            return lambda *args, **kwargs: None
        raise AttributeError(name)


def _device_run(accelerator: Any, recipe: dict[str, Any]) -> list[tuple[int, bool, Counter[str]]]:
    """``StepSyncs.steps`` of a ``run_exp`` on the device."""
    from llamafactory.train.tuner import run_exp

    from llamafactory_hera_testing.accelerator_run import StepSyncs

    counter = StepSyncs(accelerator)
    dtypes = _Dtypes()
    with accelerator:
        run_exp(recipe, callbacks=[counter, dtypes])
    return counter.steps, counter.where, dtypes.seen


def _points(out: Path) -> list[dict[str, Any]]:
    return [line for line in read_trainer_log(out) if "hera_mknn" in line]


def test_monitor_in_bf16_on_the_device(assets, accelerator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``bf16: true`` HeRA with the monitor on the device (the tiny float32 checkpoint: LLaMA-Factory loads a model in
    its checkpoint's dtype, so the weights stay float32 and, without autocast, so does the compute).

    Values: the step-0 point equals the fp32 CPU run's step-0 point exactly (same weights, same float32 scoring),
    and is within one resolution step (1 / (32 pairs x k 3)) of ``select --report``'s "before", which loads the model
    in bfloat16 for a ``bf16: true`` recipe (measured: L1H0 equal, L1H2 0.5 vs 0.4896, one neighbour of 96).

    Host syncs: steps 1, 2 and 4 (no point) count exactly the syncs of the run with ``hera_monitor_steps: 0``. Step 3
    (a point, not a logging step) adds 6: 3 device-to-host copies of the plugin (the pooled rows of each of the 2 probe
    batches, the scores' one ``tolist``), 1 ``item`` of the plugin (``top_k_stable``'s tie check, once per scored
    layer) and 2 ``item`` of the model's own forward (transformers' SDPA mask check, once per probe batch).
    """
    bf16_on_the_device(monkeypatch)
    on = tmp_path / "on"
    steps_on, where_on, dtypes = _device_run(accelerator, base_recipe(assets, FAMILY, on, bf16=True,
                                                                      hera_monitor_steps=MONITOR_STEP, **KEYS))
    steps_off, _, _ = _device_run(accelerator, base_recipe(assets, FAMILY, tmp_path / "off", bf16=True,
                                                           hera_monitor_steps=0, **KEYS))
    print("\nweights", dict(dtypes))
    print("monitor on ", [(s, logged, dict(c)) for s, logged, c in steps_on])
    print("monitor off", [(s, logged, dict(c)) for s, logged, c in steps_off])
    print(f"step {MONITOR_STEP} with the monitor:\n" + where_on[MONITOR_STEP - 1])
    assert {device for _, device in dtypes} == {"meta"}, dtypes
    assert {dtype for dtype, _ in dtypes} == {"torch.float32"}, dtypes  # the reasoning above rests on it
    assert [(s, logged) for s, logged, _ in steps_on] == [(1, False), (2, True), (3, False), (4, True)]
    for (step, _, on_counts), (_, _, off_counts), where in zip(steps_on, steps_off, where_on, strict=True):
        if step != MONITOR_STEP:
            assert on_counts == off_counts, (step, on_counts, off_counts, where)
    added = steps_on[MONITOR_STEP - 1][2] - steps_off[MONITOR_STEP - 1][2]
    assert +added == Counter({"to device": added["to device"], "to host": 3, "item": 3}), added
    ours = Counter(line.split(":")[0] for line in where_on[MONITOR_STEP - 1].splitlines()
                   if "llamafactory_hera/" in line and not line.startswith("to device"))
    assert ours == Counter({"to host": 3, "item": 1}), where_on[MONITOR_STEP - 1]

    points = _points(on)
    assert [p["current_steps"] for p in points] == [0, MONITOR_STEP]
    fp32 = tmp_path / "fp32"
    # on the CPU, in a process forked from the warm process (tests/dist_runs.py): this one holds the accelerator's
    # patches
    launch_runs([{"recipe": base_recipe(assets, FAMILY, fp32, **{**KEYS, "max_steps": 1},
                                        hera_monitor_steps=MONITOR_STEP)}], tmp_path / "cpu", 1)
    first = _points(fp32)[0]
    keys = [key for key in points[0] if key.startswith("hera_mknn")]
    assert len(keys) == 4 and {key: points[0][key] for key in keys} == {key: first[key] for key in keys}

    from llamafactory_hera.cli import main
    from llamafactory_hera.hera.selection.noise import resolution

    assert main(["select", "--report", str(on), "--samples", "256", "--k", "3", "--device", "cpu"]) == 0
    report = json.loads((on / "hera_report.json").read_text())
    assert report["settings"]["dtype"] == "bfloat16" and report["num_pairs"] == 32
    for head in HEADS:
        layer, index = int(head[1]), int(head[3])
        gap = abs(points[0][f"hera_mknn/{head}"] - report["before"][layer][index])
        print(head, points[0][f"hera_mknn/{head}"], report["before"][layer][index])
        assert gap <= resolution(32, 3) * (1 + 1e-6), (head, gap)
