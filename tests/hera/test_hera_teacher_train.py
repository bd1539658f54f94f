"""Non-DINOv2 teachers through LLaMA-Factory's real ``run_exp``: collator, steps, cache and precomputed pass."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_hera_train_inprocess import LogProbe

from conftest import base_recipe
from llamafactory_hera_testing.teachers import build_vision_teacher


def test_siglip2_teacher_trains_the_same_computed_in_the_steps_or_precomputed(assets, tmp_path: Path) -> None:
    """SigLIP2 (NaFlex: packed patch rows of varying grids) as teacher: the collator's rows in every step (no cache)
    and the precomputed pass give the same ``hera_loss`` step for step."""
    from llamafactory.train.tuner import run_exp

    teacher = build_vision_teacher("siglip2", tmp_path / "siglip2", seed=3)
    losses = {}
    settings = {"steps": {"hera_teacher_cache": False}, "precomputed": {"hera_teacher_precompute": True}}
    for name, overrides in settings.items():
        probe = LogProbe()
        recipe = base_recipe(assets, "qwen2_5_vl", tmp_path / name, hera_teacher=str(teacher), **overrides)
        run_exp(recipe, callbacks=[probe])
        losses[name] = [logs["hera_loss"] for logs in probe.logs]
    assert len(losses["steps"]) == 3 and all(0 < loss < 1e4 for loss in losses["steps"])
    assert losses["precomputed"] == pytest.approx(losses["steps"], rel=1e-5)


def test_cls_on_a_tower_without_pooled_feature_is_refused(assets, tmp_path: Path) -> None:
    from llamafactory.train.tuner import run_exp

    teacher = build_vision_teacher("siglip_vision_nohead", tmp_path / "nohead")
    recipe = base_recipe(assets, "qwen2_5_vl", tmp_path / "out", hera_teacher=str(teacher), hera_teacher_feature="cls")
    with pytest.raises(ValueError, match="hera_teacher_feature: got 'cls'.*Set hera_teacher_feature: mean"):
        run_exp(recipe)
