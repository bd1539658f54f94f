"""HeRA refuses heads that no trainable weight can move (their layer's o_proj frozen, nothing trainable feeding its
input): the run would move only the temperature while logging hera_loss. Real ``run_exp`` on the tiny Qwen2.5-VL
(2 decoder layers, 4 heads each; vision tower and projector frozen by LLaMA-Factory's defaults)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from conftest import base_recipe

FAMILY = "qwen2_5_vl"
LAST_LAYER_ONLY: dict[str, dict[str, Any]] = {
    "freeze": {"finetuning_type": "freeze", "freeze_trainable_layers": 1},  # the last layer trains
    "lora": {"finetuning_type": "lora", "lora_target": "layers.1.self_attn.q_proj,layers.1.self_attn.o_proj"},
}


def _run(recipe: dict[str, Any]) -> None:
    from llamafactory.train.tuner import run_exp

    run_exp(recipe)


@pytest.mark.parametrize("tuning", list(LAST_LAYER_ONLY))
def test_heads_in_a_frozen_layer_are_refused_at_start(assets, tmp_path: Path, tuning: str) -> None:
    """A head in layer 0 when only layer 1 trains: refused before any step, naming the head, the key and the fix;
    a head in layer 1 of the same recipe trains."""
    out = tmp_path / "out"
    recipe = base_recipe(assets, FAMILY, out, hera_heads=["L0H1", "L1H0"], max_steps=1, **LAST_LAYER_ONLY[tuning])
    with pytest.raises(ValueError, match=r"hera_heads: \[L0H1\] cannot train") as caught:
        _run(recipe)
    message = str(caught.value)
    assert "\n" not in message and f"finetuning_type: {tuning}" in message and "layers [1]" in message
    assert ("freeze_trainable_layers" if tuning == "freeze" else "lora_target") in message
    assert not (out / "trainer_log.jsonl").exists()  # no step ran
    _run({**recipe, "hera_heads": ["L1H0"]})
    assert (out / "trainer_log.jsonl").exists()


def test_auto_heads_say_which_selected_heads_cannot_train(assets, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """``hera_heads: auto`` selecting every head (so layer 0's too) under a last-layer-only freeze recipe."""
    monkeypatch.setenv("LLAMAFACTORY_HERA_CACHE", str(tmp_path / "cache"))
    recipe = base_recipe(assets, FAMILY, tmp_path / "out", hera_heads="auto", hera_select_num_heads=8,
                         hera_select_samples=12, hera_select_batch_size=4, max_steps=1, **LAST_LAYER_ONLY["freeze"])
    with pytest.raises(ValueError, match=r"hera_heads: auto selected \[(L\dH\d, ){7}L\dH\d\]; \[.*\] of them "
                                         r"cannot train") as caught:
        _run(recipe)
    stuck = str(caught.value).split("; [")[1].split("]")[0].split(", ")
    assert sorted(stuck) == ["L0H0", "L0H1", "L0H2", "L0H3"] and "list heads of those layers" in str(caught.value)
