"""Bad input during a HeRA run: each case fails clearly (naming the culprit) or is skipped and counted."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from test_hera_train_inprocess import LogProbe

from conftest import base_recipe
from llamafactory_hera.runtime.errors import RecipeError


def _dataset_copy(assets, tmp_path: Path, edit) -> Path:
    folder = tmp_path / "data"
    shutil.copytree(assets.dataset_dir, folder)
    rows = json.loads((folder / "hera_demo.json").read_text())
    edit(rows, folder)
    (folder / "hera_demo.json").write_text(json.dumps(rows))
    return folder


def _run(recipe: dict[str, Any]) -> LogProbe:
    from llamafactory.train.tuner import run_exp

    probe = LogProbe()
    run_exp(recipe, callbacks=[probe])
    return probe


def test_missing_image_fails_before_training_naming_file_and_row(assets, tmp_path: Path) -> None:
    def edit(rows, folder):
        rows[5]["images"] = ["images/nope.png"]

    data = _dataset_copy(assets, tmp_path, edit)
    with pytest.raises(RecipeError, match=r"image '.*nope.png' of training dataset row 5 \(hera_demo: "
                                          r".*hera_demo.json\) does not exist"):
        _run(base_recipe(assets, "qwen2_5_vl", tmp_path / "out", dataset_dir=str(data)))


@pytest.mark.parametrize("precompute", ["false", "true"])  # found by the collator / by the pass before step 1
def test_unreadable_image_names_file_and_row(assets, tmp_path: Path, precompute: str) -> None:
    def edit(rows, folder):
        (folder / "images" / "0003.png").write_bytes(b"not a png")

    data = _dataset_copy(assets, tmp_path, edit)
    with pytest.raises(ValueError, match=r"HeRA cannot read '.*0003.png' \(training dataset row 3\)"):
        _run(base_recipe(assets, "qwen2_5_vl", tmp_path / "out", dataset_dir=str(data),
                         hera_teacher_precompute=precompute))


def test_a_dataset_without_any_image_is_refused_before_training(assets, tmp_path: Path) -> None:
    """It used to train plain SFT under `stage: hera` (exit 0, no hera_loss); micro-batches without images inside
    an image dataset are covered in test_hera_preflight.py."""
    def edit(rows, folder):
        for row in rows:
            row["images"] = []
            row["messages"][0]["content"] = row["messages"][0]["content"].replace("<image>", "")

    data = _dataset_copy(assets, tmp_path, edit)
    with pytest.raises(ValueError, match=r"has no image in any of its 32 rows; stage: hera aligns heads"):
        _run(base_recipe(assets, "qwen2_5_vl", tmp_path / "out", dataset_dir=str(data)))


def test_non_finite_hera_term_is_skipped_and_counted(assets, tmp_path: Path, monkeypatch) -> None:
    import llamafactory_hera.hera.trainer as trainer_module

    real = trainer_module.hera_loss_anchored
    monkeypatch.setattr(trainer_module, "hera_loss_anchored", lambda *a, **k: real(*a, **k) * float("nan"))
    weights: list[torch.Tensor] = []

    class Grab(LogProbe):
        def on_train_end(self, args, state, control, model=None, **kwargs):
            weights.extend(p.detach().clone() for p in model.parameters() if p.requires_grad)

    from llamafactory.train.tuner import run_exp

    probe = Grab()
    run_exp(base_recipe(assets, "qwen2_5_vl", tmp_path / "out"), callbacks=[probe])
    assert [logs["hera_nonfinite_skipped"] for logs in probe.logs] == [1.0, 1.0, 1.0]
    assert all(math.isfinite(logs["loss"]) and "hera_loss" not in logs for logs in probe.logs)
    assert weights and all(bool(torch.isfinite(w).all()) for w in weights)


def test_non_finite_terms_are_reported_without_a_logging_step(assets, tmp_path: Path, monkeypatch, capsys) -> None:
    """The finiteness check runs on the device and is read at logging steps; a run that never logs (logging_steps
    above max_steps) still warns and says at its end how many micro-batches were skipped as non-finite."""
    import llamafactory_hera.hera.trainer as trainer_module

    real = trainer_module.hera_loss_anchored
    monkeypatch.setattr(trainer_module, "hera_loss_anchored", lambda *a, **k: real(*a, **k) * float("nan"))
    from llamafactory.train.tuner import run_exp

    run_exp(base_recipe(assets, "qwen2_5_vl", tmp_path / "out", logging_steps=100))
    out = capsys.readouterr().out
    assert "warning: non-finite HeRA loss" in out
    assert "HeRA term in 0 of 3 micro-batches (0%); 3 skipped as non-finite" in out, out[-2000:]


def test_adapter_from_another_base_model_is_refused(assets, tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    other = AutoModelForImageTextToText.from_pretrained(assets.models["llava"])  # o_proj width 64
    get_peft_model(other, LoraConfig(r=2, target_modules=["o_proj"])).save_pretrained(tmp_path / "adapter")
    from llamafactory.train.tuner import run_exp

    recipe = base_recipe(assets, "qwen3_vl", tmp_path / "out", adapter_name_or_path=str(tmp_path / "adapter"))
    with pytest.raises(ValueError, match=r"adapter_name_or_path: .* was trained on another base model \(its o_proj "
                                         r"LoRA expects inputs of width 64, .* has 128"):
        run_exp(recipe)
