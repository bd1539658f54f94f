"""`llamafactory-hera select` and `hera_heads: auto` read the same recipe keys and choose the same heads."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from conftest import base_recipe, run_train, run_verb


def test_select_and_auto_choose_the_same_heads_from_the_recipe_keys(assets, tmp_path: Path, capfd) -> None:
    keys = {"hera_select_num_heads": 2, "hera_select_mode": "multimodal", "hera_select_samples": 1000,
            "hera_select_batch_size": 8, "hera_k": 5}
    recipe = base_recipe(assets, "qwen2_5_vl", tmp_path / "out", hera_heads="auto", max_steps=1, **keys)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    proc = run_verb(capfd, "select", str(path), "--device", "cpu", "--dry-run", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    selected = json.loads((tmp_path / "recipe.hera_selection.json").read_text())
    assert len(selected["selected"]) == 2 and selected["settings"]["mode"] == "multimodal"
    assert selected["settings"]["num_samples"] == 1000 and selected["settings"]["num_samples_used"] == 32
    assert "32 image-caption pairs scored, fewer than the 1000 asked for" in proc.stdout
    assert selected["settings"]["clamp"] == 0.95 and selected["data_notes"]["distinct_images"] == 32

    run = run_train(recipe, tmp_path / "train", env={"LLAMAFACTORY_HERA_CACHE": str(tmp_path / "cache")})
    auto = json.loads((tmp_path / "out" / "hera_selection.json").read_text())
    assert auto["selected"] == selected["selected"], run.stdout[-2000:]
    assert auto["scores"] == selected["scores"]


def test_rows_sharing_an_image_are_scored_once(assets, tmp_path: Path) -> None:
    from test_hera_teacher_identity import REUSED, reused_image_dataset

    from llamafactory_hera.hera.selection.select import SelectionOptions, prepare
    from llamafactory_hera_patches.tools.model_data import parse_recipe

    data = reused_image_dataset(assets, tmp_path / "data")
    recipe = base_recipe(assets, "qwen2_5_vl", tmp_path / "out", dataset=REUSED, dataset_dir=str(data))
    options = SelectionOptions(num_samples=100, k=3, teacher=str(assets.teacher), device="cpu", progress=False)
    pairs, identity = prepare(parse_recipe(recipe), options)
    first_images = [pair.images for pair in pairs]
    assert len(first_images) == len(set(first_images)) == identity["data_notes"]["distinct_images"]
    assert identity["data_notes"]["rows_sharing_an_image_dropped"] > 0


def test_a_read_only_recipe_is_refused_before_scoring(assets, tmp_path: Path, capfd) -> None:
    import os

    recipe = base_recipe(assets, "qwen2_5_vl", tmp_path / "out", hera_heads="auto", hera_k=5)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    os.chmod(path, 0o444)
    before = path.read_text()
    proc = run_verb(capfd, "select", str(path), "--device", "cpu", cwd=tmp_path)
    assert proc.returncode == 2 and "is read-only (mode 0444)" in proc.stderr and "--output NEW.yaml" in proc.stderr
    assert "Loading" not in proc.stderr and path.read_text() == before and os.stat(path).st_mode & 0o777 == 0o444


def test_an_unwritable_output_folder_is_refused_before_scoring(assets, tmp_path: Path) -> None:
    import pytest

    from llamafactory_hera.hera.selection.recipe_write import check_folder_writable

    with pytest.raises(PermissionError, match="cannot write the selection record and heatmap into"):
        check_folder_writable(tmp_path / "missing", "the selection record and heatmap")
    check_folder_writable(tmp_path, "the selection record and heatmap")


def test_the_comment_that_described_auto_is_rewritten_in_a_shipped_recipe() -> None:
    from llamafactory_hera.hera.selection.recipe_write import set_hera_heads

    text = (Path(__file__).resolve().parents[2] / "recipes" / "qwen3_8b_hera.yaml").read_text(encoding="utf-8")
    result = set_hera_heads(text, ["L1H0", "L2H3"])
    line = next(line for line in result.splitlines() if line.startswith("hera_heads:"))
    assert line.startswith("hera_heads: [L1H0, L2H3]") and line.endswith("(was: auto)")
    assert "at the start of training" not in result.split("hera_heads:")[1].split("\n# Paper")[0]
    assert "cached, recorded in output_dir" not in result  # the continuation of the old comment went with it
    assert yaml.safe_load(result) == {**yaml.safe_load(text), "hera_heads": ["L1H0", "L2H3"]}
