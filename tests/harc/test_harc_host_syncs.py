"""Host syncs of one HARC optimizer step on the simulated accelerator, against plain SFT's on the same tiny Llama-3.

Counted with ``StepSyncs`` per optimizer step, logging steps apart. A step that is neither a
logging step nor a refresh / ramp (which extracts directions: forwards on held-out rows read back to the host) must
wait on the device no more often than SFT's, except for transformers' own mask check in HARC's second forward (the
KL reference): before, ``compute_loss`` added two ``nonzero`` per micro-batch (roles read back to select rows).
Host-to-device copies (``to device``) are left out of the comparison (HARC's batch has more tensors).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from conftest import harc_recipe

pytestmark = pytest.mark.accelerator

STEPS = {"max_steps": 4, "logging_steps": 2, "gradient_accumulation_steps": 1, "save_strategy": "no",
         "learning_rate": 1e-3, "seed": 0}


def _run(recipe: dict[str, Any], accelerator: Any) -> Any:
    from llamafactory.train.tuner import run_exp

    from llamafactory_hera_testing.accelerator_run import StepSyncs

    steps = StepSyncs(accelerator)
    with accelerator:
        run_exp(recipe, callbacks=[steps])
    return steps


def _syncs(counts: Counter[str]) -> Counter[str]:
    return Counter({kind: n for kind, n in counts.items() if kind != "to device"})


def sft_recipe(harc_assets: Any, output: Path) -> dict[str, Any]:
    """Plain LoRA SFT on the harmless role's rows, micro-batches of 5 rows (HARC's below: 2 + 2 + 1)."""
    return {"model_name_or_path": str(harc_assets.models["llama3"]), "template": harc_assets.templates["llama3"],
            "stage": "sft", "do_train": True, "finetuning_type": "lora", "lora_target": "all", "lora_rank": 8,
            "lora_alpha": 16, "dataset_dir": str(harc_assets.dataset_dir), "dataset": "harc_harmless",
            "cutoff_len": 256, "per_device_train_batch_size": 5, "output_dir": str(output),
            "overwrite_output_dir": True, "report_to": "none", "plot_loss": False, "disable_shuffling": True,
            **STEPS}


def harc_sync_recipe(harc_assets: Any, output: Path) -> dict[str, Any]:
    """4 steps: refresh after step 3 only (no ramp), logging at 2 and 4; step 1 is a plain step."""
    return harc_recipe(harc_assets, "llama3", output, harc_refresh_steps=3, harc_layers_ramp_step=1000,
                       harc_batch_harmful=2, harc_batch_harmless=2, harc_batch_pseudo=1, harc_extract_samples=4,
                       harc_validate_samples=2, harc_eval=False, harc_response_tokens=4, **STEPS)


def test_a_plain_harc_step_waits_on_the_device_no_more_than_an_sft_step(harc_assets: Any, accelerator: Any,
                                                                        tmp_path: Path) -> None:
    sft = _run(sft_recipe(harc_assets, tmp_path / "sft"), accelerator)
    harc = _run(harc_sync_recipe(harc_assets, tmp_path / "harc"), accelerator)
    table = {"sft": sft.steps, "harc": harc.steps}
    print({name: [(step, logged, dict(counts)) for step, logged, counts in rows] for name, rows in table.items()})
    assert [(step, logged) for step, logged, _ in harc.steps] == [(1, False), (2, True), (3, False), (4, True)]
    assert [(step, logged) for step, logged, _ in sft.steps] == [(1, False), (2, True), (3, False), (4, True)]
    for index, (step, logged, counts) in enumerate(harc.steps):
        if logged or step == 3:  # logging steps, and the refresh after step 3 (extraction reads back to the host)
            continue
        extra = _syncs(counts) - _syncs(sft.steps[index][2])  # the same step of SFT (the first, the last ...)
        # HARC's one extra forward per micro-batch (the adapter-disabled KL reference) runs transformers' SDPA mask
        # check (`padding_mask.all()`, one item per forward, SFT's forward has it too): nothing else may be added
        assert extra == Counter({"item": STEPS["gradient_accumulation_steps"]}), (
            f"HARC step {step} waits on the device more than SFT: {dict(extra)}\n{harc.where[index]}")
        assert harc.where[index].count("masking_utils.py") == 2 * STEPS["gradient_accumulation_steps"]
