"""The shipped RAH-LoRA recipes (recipes/*_rah.yaml): they parse as LLaMA-Factory and the plugin read them, keep the
paper's defaults, and run on a tiny model of their family."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO, run_train
from llamafactory_hera.rah.config import parse_rah_arguments

RECIPES = REPO / "recipes"
RAH_RECIPES = {  # recipe -> (model id, template, tiny family, model's decoder layers)
    "vicuna_7b_rah.yaml": ("llava-hf/llava-1.5-7b-hf", "llava", "llava", 32),
    "vicuna_13b_rah.yaml": ("llava-hf/llava-1.5-13b-hf", "llava", "llava", 40),
    "qwen2_5_7b_rah.yaml": ("Qwen/Qwen2.5-VL-7B-Instruct", "qwen2_vl", "qwen2_5_vl", 28),
}


def test_the_rah_recipes_are_the_shipped_ones() -> None:
    assert sorted(p.name for p in RECIPES.glob("*_rah*.yaml")) == sorted(RAH_RECIPES)


@pytest.mark.parametrize("name", sorted(RAH_RECIPES))
def test_rah_recipe_parses_with_llamafactory_and_the_plugin(name: str, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """LLaMA-Factory's reader and parser, as ``llamafactory-cli train`` runs them (``use_cpu``: no GPU here)."""
    from llamafactory.hparams import get_train_args, read_args

    from llamafactory_hera_patches.recipe.arguments import keys_of, split_args

    monkeypatch.setattr(sys, "argv", ["llamafactory-cli", str(RECIPES / name), f"output_dir={tmp_path / 'out'}"])
    host, own, method = split_args(read_args())
    assert method.stage == "rah" and host["stage"] == "sft"
    mine, ignored = keys_of(method, own)
    args = parse_rah_arguments(mine)
    assert not ignored and (args.rah_isal_percentile, args.rah_caf_percentile, args.rah_num_anchors) == (15, 70, 3)
    assert (args.rah_rank, args.rah_delta, args.rah_alpha_max, args.rah_samples, args.rah_probe_samples) == \
        (8, 0.05, 0.15, 100, 32)
    model_id, template, _, layers = RAH_RECIPES[name]
    assert args.layer_list(layers) == list(range(16 if layers == 32 else layers // 2))
    host["use_cpu"] = True
    model_args, data_args, _, finetuning_args, _ = get_train_args(host)
    assert model_args.model_name_or_path == model_id and data_args.template == template
    assert finetuning_args.finetuning_type == "lora" and "flash_attn" not in yaml.safe_load(
        (RECIPES / name).read_text())
    text = (RECIPES / name).read_text()
    assert f"llamafactory-cli train recipes/{name}" in text and "--adapter_name_or_path" in text


@pytest.mark.parametrize("name", sorted(RAH_RECIPES))
def test_rah_recipe_runs_on_a_tiny_model_of_its_family(name: str, assets, tmp_path: Path) -> None:
    """Only what this machine and a 4-head model force is changed: the tiny model and data, CPU, fewer rows, and
    target / anchor thresholds loose enough that 4 heads per layer yield a target."""
    recipe = yaml.safe_load((RECIPES / name).read_text())
    family = RAH_RECIPES[name][2]
    recipe.update({"model_name_or_path": str(assets.models[family]), "template": assets.templates[family],
                   "dataset": "hera_demo", "dataset_dir": str(assets.dataset_dir), "cutoff_len": 256,
                   "preprocessing_num_workers": 1, "output_dir": str(tmp_path / "out"), "bf16": False,
                   "rah_layers": "auto", "rah_samples": 8, "rah_probe_samples": 4, "rah_kl_samples": 4,
                   "rah_isal_percentile": 50, "rah_caf_percentile": 0, "rah_beta": -100, "rah_rank": 2,
                   "rah_num_anchors": 2, "rah_delta": 10.0})
    run_train(recipe, tmp_path)
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    kinds = {name.rsplit(".", 1)[1] for name in config["target_modules"]}
    assert kinds == ({"o_proj"} if family == "qwen2_5_vl" else {"v_proj", "o_proj"})
