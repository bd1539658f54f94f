"""HeRA on every loss path LLaMA-Factory 0.9.5 has, under gradient accumulation: the default (the model's loss,
divided by the Trainer) and the custom loss functions ``use_dft_loss``, ``use_eaft_loss``, ``use_asft_loss``
(``compute_loss_func`` is set: the Trainer no longer divides, HeRA divides its own term)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from test_hera_train_inprocess import LogProbe

from conftest import base_recipe

LOSS_PATHS: dict[str, dict[str, Any]] = {
    "default": {},
    "dft": {"use_dft_loss": True},
    "eaft": {"use_eaft_loss": True, "eaft_alpha": 1.0},
    # ASFT's reference model is a copy of the base model, which LLaMA-Factory makes only outside LoRA
    "asft": {"use_asft_loss": True, "asft_alpha": 0.1, "finetuning_type": "full"},
}


@pytest.mark.parametrize("path", list(LOSS_PATHS))
def test_logged_loss_is_lm_loss_plus_lambda_hera_loss(assets, tmp_path: Path, path: str) -> None:
    """Every micro-batch has images (so every one has a HeRA term): the Trainer's logged ``loss`` is
    ``lm_loss + hera_lambda * hera_loss`` with 2 accumulation steps, whichever loss function computes ``lm_loss``."""
    from llamafactory.train.tuner import run_exp

    lam = 0.5
    recipe = base_recipe(assets, "qwen2_5_vl", tmp_path / "out", per_device_train_batch_size=4,
                         gradient_accumulation_steps=2, max_steps=2, hera_lambda=lam, **LOSS_PATHS[path])
    probe = LogProbe()
    run_exp(recipe, callbacks=[probe])
    assert len(probe.logs) == 2
    for logs in probe.logs:
        assert "hera_batches_without_term" not in logs and logs["hera_loss"] > 0.1, logs
        assert logs["loss"] == pytest.approx(logs["lm_loss"] + lam * logs["hera_loss"], rel=1e-3, abs=2e-4), logs
