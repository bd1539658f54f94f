"""``hera_heads: auto`` as a multi-rank run meets it: rank 0 scores while the others wait (``ddp_timeout``), then
loads the model it trains (the scoring copy must be gone, not just unnamed)."""

from __future__ import annotations

import weakref
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from conftest import base_recipe
from llamafactory_hera.hera.selection import select
from llamafactory_hera.hera.selection.auto import short_ddp_timeout_warning

FAMILY = "qwen2_5_vl"


@pytest.mark.parametrize("mode", ["text", "multimodal"])
def test_scoring_copy_is_released_before_the_teacher_loads(assets, monkeypatch: pytest.MonkeyPatch,
                                                             mode: str) -> None:
    """The model copy the heads are scored on is collected before the teacher loads (and so before rank 0 loads
    the model it trains): a weak reference to it is dead there."""
    from llamafactory_hera_patches.tools.model_data import parse_recipe

    copies: list[weakref.ref] = []
    alive_when_teacher_loads: list[bool] = []
    load_model, load_teacher = select.load_in_scoring_dtype, select.load_teacher

    def loading_model(*args: Any, **kwargs: Any) -> Any:
        loaded = load_model(*args, **kwargs)
        copies.append(weakref.ref(loaded[0]))
        return loaded

    def loading_teacher(*args: Any, **kwargs: Any) -> Any:
        alive_when_teacher_loads.append(copies[-1]() is not None)
        return load_teacher(*args, **kwargs)

    monkeypatch.setattr(select, "load_in_scoring_dtype", loading_model)
    monkeypatch.setattr(select, "load_teacher", loading_teacher)
    recipe_args = parse_recipe(base_recipe(assets, FAMILY, Path("/unused")))
    options = select.SelectionOptions(num_samples=6, k=3, batch_size=3, mode=mode, teacher=str(assets.teacher),
                                      device="cpu", progress=False)
    pairs, _ = select.prepare(recipe_args, options)
    scores = select.score_head_neighbours(recipe_args, options, pairs).scores
    assert scores.shape == (2, 4)
    assert alive_when_teacher_loads == [False]


@pytest.mark.parametrize(("world_size", "timeout", "warns"), [
    (2, 1800, True),  # LLaMA-Factory's default
    (1, 1800, False),  # one process: nobody waits
    (4, 180000000, False),  # the recipes' value
])
def test_short_ddp_timeout_warns_with_auto_heads_on_several_ranks(capsys: pytest.CaptureFixture[str],
                                                                  world_size: int, timeout: int, warns: bool) -> None:
    warning = short_ddp_timeout_warning(world_size, timeout)
    assert (warning is not None) == warns
    if warns:
        assert warning is not None and "ddp_timeout: 1800 s" in warning and "ddp_timeout: 180000000" in warning
        assert "\n" not in warning


def test_host_checks_print_the_ddp_timeout_warning(assets, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """Printed by the host checks (before any model loads) on rank 0 of a run with hera_heads: auto."""
    from llamafactory_hera.hera.config import parse_hera_arguments
    from llamafactory_hera.hera.parsed_checks import validate_host_args

    recipe = base_recipe(assets, FAMILY, tmp_path / "out", hera_heads="auto")
    model = SimpleNamespace(model_name_or_path=recipe["model_name_or_path"], trust_remote_code=True,
                            adapter_name_or_path=None, quantization_bit=None, disable_gradient_checkpointing=True)
    data = SimpleNamespace(dataset=["hera_demo"], dataset_dir=recipe["dataset_dir"], template=recipe["template"])
    training = SimpleNamespace(world_size=2, process_index=0, ddp_timeout=1800, per_device_train_batch_size=8,
                               fsdp="", do_train=True, output_dir=str(tmp_path / "out"))
    import llamafactory_hera.hera.parsed_checks as host_checks

    monkeypatch.setattr(host_checks, "check_run_inputs", lambda *args, **kwargs: None)
    hera = parse_hera_arguments({k: v for k, v in recipe.items() if k.startswith("hera_")})
    validate_host_args(model, data, training, SimpleNamespace(), SimpleNamespace(), hera)
    assert "ddp_timeout: 1800 s" in capsys.readouterr().out
