"""One scoring dtype (``scoring_dtype``): ``llamafactory-hera select`` and ``hera_heads: auto`` run the language model
in the recipe's compute dtype (bfloat16 with ``bf16: true``), whatever the device or the checkpoint's dtype; the dtype
is in the record and in the cache key, so a selection scored in another dtype is not reused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from conftest import base_recipe

FAMILY = "qwen2_5_vl"
KEYS = {"hera_select_samples": 12, "hera_k": 3, "hera_select_num_heads": 2, "hera_select_batch_size": 4}


def test_the_model_is_scored_in_the_stated_dtype(assets) -> None:
    """The fp32 checkpoint is cast to bfloat16 for a bf16 recipe; the caller's arguments are left as they were."""
    from llamafactory_hera.hera.selection.select import load_in_scoring_dtype, scoring_dtype
    from llamafactory_hera_patches.tools.model_data import parse_recipe

    assert [scoring_dtype(keys) for keys in ({"bf16": True}, {"pure_bf16": True}, {"fp16": "true"}, {})] == [
        "bfloat16", "bfloat16", "float16", "float32"]
    recipe_args = parse_recipe(base_recipe(assets, FAMILY, Path("/unused"), bf16=True))
    model, _, _ = load_in_scoring_dtype(recipe_args, "cpu", "bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert recipe_args.model_args.compute_dtype is None


def test_select_and_auto_agree_on_a_bf16_recipe_and_the_cache_keeps_dtypes_apart(
        assets, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """``select`` (in this process, on the CPU) and ``hera_heads: auto`` in a ``bf16: true`` run give identical scores
    and heads, both scored in bfloat16; the same recipe without ``bf16`` is scored again in float32, not served the
    bfloat16 selection from the cache."""
    from llamafactory.train.tuner import run_exp

    from llamafactory_hera.cli import main

    cache = tmp_path / "cache"
    monkeypatch.setenv("LLAMAFACTORY_HERA_CACHE", str(cache))
    recipe = base_recipe(assets, FAMILY, tmp_path / "bf16", hera_heads="auto", bf16=True, use_cpu=True,
                         max_steps=1, **KEYS)  # use_cpu: transformers refuses bf16 on the CPU without it
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    assert main(["select", str(path), "--device", "cpu", "--dry-run"]) == 0
    selected = json.loads((tmp_path / "recipe.hera_selection.json").read_text())

    run_exp(recipe)
    auto = json.loads((tmp_path / "bf16" / "hera_selection.json").read_text())
    assert selected["settings"]["dtype"] == auto["settings"]["dtype"] == "bfloat16"
    assert auto["scores"] == selected["scores"] and auto["selected"] == selected["selected"]

    capsys.readouterr()
    run_exp({**recipe, "bf16": False, "output_dir": str(tmp_path / "fp32")})
    assert "(selected heads;" in capsys.readouterr().out  # not "reusing cached head selection"
    fp32 = json.loads((tmp_path / "fp32" / "hera_selection.json").read_text())
    assert fp32["settings"]["dtype"] == "float32" and len(list(cache.rglob("*.json"))) == 2


def test_without_a_precision_key_the_checkpoints_own_dtype_is_scored(assets, tmp_path) -> None:
    """No ``bf16`` / ``fp16`` / ``pure_bf16``: LLaMA-Factory trains in the checkpoint's dtype, so selection scores
    in it too (a bf16 7B checkpoint is not cast to a float32 copy of twice its size); the keys still win."""
    import json
    import shutil

    from llamafactory_hera.hera.selection.select import scoring_dtype

    checkpoint = tmp_path / "bf16_checkpoint"
    checkpoint.mkdir()
    shutil.copy(assets.models["qwen2_5_vl"] / "config.json", checkpoint / "config.json")
    config = json.loads((checkpoint / "config.json").read_text())
    config["dtype"] = "bfloat16"
    config.pop("torch_dtype", None)
    (checkpoint / "config.json").write_text(json.dumps(config))
    assert scoring_dtype({"model_name_or_path": str(checkpoint)}) == "bfloat16"
    assert scoring_dtype({"model_name_or_path": str(checkpoint), "fp16": True}) == "float16"
    assert scoring_dtype({"model_name_or_path": str(tmp_path / "missing")}) == "float32"
    assert scoring_dtype({}) == "float32"
    assert scoring_dtype({"bf16": "true"}) == "bfloat16"
