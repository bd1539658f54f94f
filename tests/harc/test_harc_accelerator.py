"""``stage: harc`` through ``run_exp`` on the simulated accelerator: base extraction, steps
with all four terms and their backward, a refresh and the ramp, the end-of-run validation and refusal generation,
all with the model, batches and losses on a device that is not the CPU (CUDA's device rules, host syncs counted)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import harc_recipe, read_trainer_log

pytestmark = pytest.mark.accelerator

TERMS = ("harc_couple", "harc_couple_resp", "harc_kl", "harc_ce")


def small_harc(harc_assets: Any, output: Path, **overrides: Any) -> dict[str, Any]:
    """The conftest recipe cut down for the device (every value is real compute on the CPU): 3 optimizer steps of
    2 micro-batches of 2 + 2 + 1 rows, refresh at step 2, ramp at step 3, 4 + 2 held-out rows, 2 new tokens."""
    sizes = {"max_steps": 3, "harc_refresh_steps": 2, "harc_layers_ramp_step": 3, "harc_batch_harmful": 2,
             "harc_batch_harmless": 2, "harc_batch_pseudo": 1, "harc_extract_samples": 4,
             "harc_validate_samples": 2, "harc_eval_max_new_tokens": 2, "harc_response_tokens": 4,
             "save_strategy": "no"}
    return harc_recipe(harc_assets, "llama3", output, **{**sizes, **overrides})


def test_harc_trains_refreshes_and_evaluates_on_the_device(harc_assets: Any, accelerator: Any,
                                                           tmp_path: Path) -> None:
    """Every part of a HARC run on the device: directions extracted (base and refresh) from device residuals, the
    four terms logged finite with the coupling's gradient reaching the adapter (LoRA B moves off zero), the ramp,
    and the end-of-run validation cosines and greedy refusal generation with and without the adapter."""
    from llamafactory.train.tuner import run_exp
    from safetensors.torch import load_file

    output = tmp_path / "run"
    with accelerator:
        run_exp(small_harc(harc_assets, output))

    lines = [line for line in read_trainer_log(output) if "loss" in line]
    assert len(lines) == 3
    for line in lines:
        assert all(math.isfinite(line[term]) for term in (*TERMS, "loss")), line
    assert lines[0]["harc_couple"] > 0 and lines[0]["harc_couple_resp"] > 0 and lines[0]["harc_ce"] > 0
    # LoRA starts as the identity: KL 0 up to float noise (2.4e-09 seen under the simulator in a one-process run with
    # two threads; 0.0 under xdist), then the adapter moved the model: backward reached it
    assert abs(lines[0]["harc_kl"]) < 1e-7 and lines[-1]["harc_kl"] > 1e3 * max(abs(lines[0]["harc_kl"]), 1e-7), \
        [line["harc_kl"] for line in lines]

    weights = load_file(output / "adapter_model.safetensors")
    assert any("lora_B" in name and tensor.abs().max() > 0 for name, tensor in weights.items())

    history = json.loads((output / "harc_layers.json").read_text())["history"]
    assert [(e["step"], e["event"]) for e in history] == [(0, "base"), (2, "refresh"), (3, "ramp"), (3, "end")]
    record = torch.load(output / "harc_directions.pt", weights_only=False)
    assert all(t.device.type == "cpu" and torch.isfinite(t).all() for which in ("base", "current")
               for t in record[which].values())
    assert not torch.equal(record["base"]["v_ref"], record["current"]["v_ref"])  # the refresh changed them

    evaluation = json.loads((output / "harc_eval.json").read_text())
    assert [e["event"] for e in evaluation["validation"]] == ["base", "refresh", "ramp", "end"]
    assert all(math.isfinite(v) for e in evaluation["validation"] for layer in e["validation"].values()
               for v in layer.values())
    refusal = evaluation["refusal"]
    assert refusal["harmful"]["count"] == 2 and "before" in refusal
