"""Head selection on the simulated accelerator: ``hera_heads: auto`` at the start of a HeRA
``run_exp``, ``llamafactory-hera select`` and ``select --report RUN`` run in this process with the model loaded as
LLaMA-Factory loads it (``device_map`` naming the device). Each scores every head with the same values as on the CPU;
a CPU tensor meeting a device tensor raises as CUDA would.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from dist_runs import launch_runs

from conftest import base_recipe
from llamafactory_hera.hera.selection.select import SelectionOptions, prepare, score_head_neighbours

pytestmark = pytest.mark.accelerator

FAMILY = "qwen2_5_vl"
COPIES_PER_BATCH = 1  # the pooled rows of every layer, in one device-to-host copy
KEYS = {"hera_select_samples": 12, "hera_k": 3, "hera_select_num_heads": 2, "hera_select_batch_size": 4}


def _cpu_scores(assets: Any, mode: str = "text", recipe: dict[str, Any] | None = None,
                dtype: str = "float32") -> torch.Tensor:
    """The same selection computed on the CPU, outside the simulated device (the reference)."""
    from llamafactory_hera_patches.tools.model_data import parse_recipe

    recipe = recipe or base_recipe(assets, FAMILY, Path("/unused"))
    options = SelectionOptions(num_samples=12, k=3, num_heads=2, batch_size=4, mode=mode, seed=int(recipe["seed"]),
                               teacher=str(assets.teacher), device="cpu", progress=False, dtype=dtype)
    recipe_args = parse_recipe(recipe)
    pairs, _ = prepare(recipe_args, options)
    return score_head_neighbours(recipe_args, options, pairs).scores


@pytest.mark.parametrize("mode", ["text", "multimodal"])
def test_auto_heads_select_on_the_device_then_train_them(assets, accelerator, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch, mode: str) -> None:
    """``hera_heads: auto`` in ``run_exp`` on the device: the selection loads its model and teacher there, scores
    every head as the CPU does, and the run trains the chosen heads."""
    from llamafactory.train.tuner import run_exp

    monkeypatch.setenv("LLAMAFACTORY_HERA_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    recipe = base_recipe(assets, FAMILY, out, hera_heads="auto", hera_select_mode=mode, max_steps=1, **KEYS)
    with accelerator:
        run_exp(recipe)
    record = json.loads((out / "hera_selection.json").read_text())
    assert record["settings"]["device"] == "meta" and len(record["selected"]) == 2
    torch.testing.assert_close(torch.tensor(record["scores"]), _cpu_scores(assets, mode), atol=1e-6, rtol=0)
    assert json.loads((out / "hera_state.json").read_text())["heads"] == record["selected"]


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_select_command_scores_on_the_device(assets, accelerator, tmp_path: Path, bf16: bool) -> None:
    """``llamafactory-hera select RECIPE --device meta`` in this process: the model is loaded by LLaMA-Factory with
    ``device_map`` naming the device, and the scores equal the CPU's (a ``bf16: true`` recipe: in bfloat16 on both)."""
    from llamafactory_hera.cli import main

    recipe = base_recipe(assets, FAMILY, tmp_path / "out", bf16=bf16 or None, **KEYS)
    recipe.pop("hera_heads")
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    with accelerator:
        code = main(["select", str(path), "--device", "meta"])
    assert code == 0
    teacher_inputs = [frame for kind, frame in accelerator.where
                      if kind == "to device" and frame.split(":")[0].endswith("hera/teacher.py")]
    assert teacher_inputs, "the teacher's images never reached the device: its forward ran on the CPU"
    record = json.loads((tmp_path / "recipe.hera_selection.json").read_text())
    dtype = "bfloat16" if bf16 else "float32"
    assert record["settings"]["device"] == "meta" and record["settings"]["dtype"] == dtype
    torch.testing.assert_close(torch.tensor(record["scores"]), _cpu_scores(assets, dtype=dtype), atol=1e-6, rtol=0)
    assert yaml.safe_load(path.read_text(encoding="utf-8"))["hera_heads"] == record["selected"]


def test_report_of_a_finished_run_on_the_device(assets, accelerator, tmp_path: Path) -> None:
    """A small HeRA run trained on the CPU (``run_exp`` in a process of its own), then ``select --report RUN --device
    meta`` on the device in this process: the before and after maps equal the CPU's report of the same run. (The CPU
    run is a separate process: an in-process CPU ``run_exp`` after another accelerator test of the same process moved
    its model to the simulated device in ``Trainer._move_model_to_device``.)"""
    from llamafactory_hera.cli import main

    out = tmp_path / "run"
    # on the CPU, in a process forked from the warm process (tests/dist_runs.py)
    launch_runs([{"recipe": base_recipe(assets, FAMILY, out, max_steps=1, **KEYS)}], tmp_path / "cpu", 1)
    args = ["select", "--report", str(out), "--samples", "12", "--k", "3"]
    assert main([*args, "--device", "cpu"]) == 0
    on_cpu = json.loads((out / "hera_report.json").read_text())
    with accelerator:
        assert main([*args, "--device", "meta"]) == 0
    on_device = json.loads((out / "hera_report.json").read_text())
    for key in ("before", "after"):
        torch.testing.assert_close(torch.tensor(on_device[key]), torch.tensor(on_cpu[key]), atol=1e-6, rtol=0)


@pytest.mark.parametrize("mode", ["text", "multimodal"])
def test_one_copy_to_the_host_per_batch(assets, accelerator, mode: str) -> None:
    """The hooks pool every layer's ``o_proj`` input on the device; the batch's pooled rows of all layers come to the
    host in one copy (not one per layer), and nothing else in the collection waits on the device."""
    from llamafactory_hera.heads.architecture import head_projections
    from llamafactory_hera.hera.selection import collect
    from llamafactory_hera.hera.teacher import batches_of
    from llamafactory_hera_patches.tools.model_data import (
        load_model_for_scoring,
        multimodal_dataset_and_collator,
        parse_recipe,
    )

    recipe_args = parse_recipe(base_recipe(assets, FAMILY, Path("/unused")))
    options = SelectionOptions(num_samples=12, k=3, batch_size=4, mode=mode, teacher=str(assets.teacher),
                               progress=False)
    pairs, _ = prepare(recipe_args, options)
    batches = len(list(batches_of(pairs, options.batch_size)))
    with accelerator:
        model, tokenizer_module, template = load_model_for_scoring(recipe_args, "meta")
        if mode == "multimodal":
            dataset, collator = multimodal_dataset_and_collator(recipe_args, model, tokenizer_module, template, 0,
                                                                [p.row for p in pairs])
        accelerator.reset()
        if mode == "text":
            pooled = collect.collect_text(model, tokenizer_module["tokenizer"], pairs, 4, "meta", progress=False)
        else:
            pooled = collect.collect_multimodal(model, dataset, collator, list(range(len(pairs))), 4, "meta",
                                                progress=False)
    ours = [(kind, frame) for kind, frame in accelerator.where if "llamafactory_hera" in frame]  # not the model's
    copies = [frame for kind, frame in ours if kind == "to host"]
    assert len(pooled) == len(head_projections(model)) > 1
    assert all(p.device.type == "cpu" and p.shape[0] == len(pairs) for p in pooled.values())
    assert len(copies) <= batches * COPIES_PER_BATCH, (batches, accelerator.report())
    assert [kind for kind, _ in ours if kind not in ("to host", "to device")] == [], accelerator.report()
