"""``stage: rah`` through the stock ``llamafactory-cli train``: the adapter, the profile, and the refusals."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import base_recipe, gqa_llava, image_less_dataset, mixed_size_dataset, run_train
from llamafactory_hera.rah.config import parse_rah_arguments
from llamafactory_hera.rah.raw_checks import validate_raw_host_args

# on 4-head tiny layers the paper's percentiles keep 0 or 1 head: these force targets, anchors and kept steps
FORCED = {"rah_isal_percentile": 50, "rah_caf_percentile": 0, "rah_beta": -100, "rah_num_anchors": 2, "rah_rank": 2,
          "rah_delta": 10.0}


def rah_recipe(assets, family: str, out: Path, **overrides: Any) -> dict[str, Any]:
    recipe = {k: v for k, v in base_recipe(assets, family, out).items() if not k.startswith("hera_")}
    for key in ("max_steps", "learning_rate", "lr_scheduler_type", "per_device_train_batch_size"):
        recipe.pop(key, None)
    recipe |= {"stage": "rah", "rah_samples": 8, "rah_probe_samples": 4, "rah_kl_samples": 4, **FORCED}
    recipe.update(overrides)
    return {k: v for k, v in recipe.items() if v is not None}


def _logits(model: Any, batch: dict[str, Any]) -> torch.Tensor:
    with torch.no_grad():
        return model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits


@pytest.mark.parametrize("family,module", [("llava", {"v_proj", "o_proj"}), ("qwen2_5_vl", {"o_proj"})])
def test_rah_writes_an_adapter_that_llamafactory_loads(assets, tmp_path: Path, family: str, module: set[str]) -> None:
    from llamafactory_hera_patches.tools.model_data import (
        load_model_for_scoring,
        multimodal_dataset_and_collator,
        parse_recipe,
    )

    out = tmp_path / "out"
    proc = run_train(rah_recipe(assets, family, out), tmp_path)
    assert "RAH-LoRA: layers 0..0 (1)" in proc.stdout + proc.stderr  # auto: the first half of 2 layers
    config = json.loads((out / "adapter_config.json").read_text())
    assert (out / "adapter_model.safetensors").is_file() and (out / "rah_profile.png").is_file()
    assert {name.rsplit(".", 1)[1] for name in config["target_modules"]} == module
    assert all(".language_model.layers.0." in name for name in config["target_modules"])
    profile = json.loads((out / "rah_profile.json").read_text())
    assert profile["summary"]["calibrated"] >= 1 and profile["layers"] == [0]
    assert set(profile["isal"]) == {"L0"} and len(profile["caf"]["L0"]) == 4
    for target in profile["targets"]:
        if target["outcome"] == "calibrated":
            assert target["kl"] <= 10.0 and target["alpha"] == 0.15 and len(target["anchors"]) == 2
    # LLaMA-Factory's own loader takes it as adapter_name_or_path, and it changes the model's outputs
    base_args = parse_recipe({**rah_recipe(assets, family, out), "stage": "sft"})
    base, tokenizer_module, template = load_model_for_scoring(base_args, "cpu")
    dataset, collator = multimodal_dataset_and_collator(base_args, base, tokenizer_module, template, 0, [0])
    batch = collator([dataset[0]])
    adapted_args = parse_recipe({**rah_recipe(assets, family, out), "stage": "sft", "adapter_name_or_path": str(out)})
    adapted, _, _ = load_model_for_scoring(adapted_args, "cpu")
    assert not torch.allclose(_logits(base.float(), batch), _logits(adapted.float(), batch))


def _refusal(assets, tmp_path: Path, **overrides: Any) -> str:
    proc = run_train(rah_recipe(assets, "llava", tmp_path / "out", **overrides), tmp_path, check=False)
    assert proc.returncode != 0 and not (tmp_path / "out" / "adapter_config.json").exists()
    assert "all params:" not in proc.stdout + proc.stderr  # LLaMA-Factory's line once the model has loaded
    return proc.stdout + proc.stderr


@pytest.mark.parametrize("overrides,message", [
    ({"flash_attn": "sdpa"}, "stage: rah needs attention weights, which sdpa attention does not return"),
    ({"finetuning_type": "full"}, "finetuning_type: full cannot hold it"),
    ({"rah_layers": "0-5"}, "rah_layers: [2, 3, 4, 5] outside the model, which has decoder layers 0..1"),
    ({"rah_probe_samples": 40, "rah_samples": 100}, "has 32 image rows, fewer than the 40 the probes need"),
    ({"rah_dleta": 0.1}, "Unknown RAH-LoRA key 'rah_dleta'. Did you mean 'rah_delta'?"),
    ({"rah_delta": 0}, "rah_delta: got 0; allowed range is > 0.0."),
    ({"do_predict": True, "predict_with_generate": True}, "do_predict: stage: rah writes its adapter from a "
     "calibration and evaluates nothing. Remove it; to write predictions with the adapter, run stage: sft with "
     "do_train: false, adapter_name_or_path: this run's output_dir"),
    ({"rah_samples": 2}, "[llamafactory-hera] error: rah_samples: got 2; the CAF and KL probes (rah_probe_samples: 4, "
                         "rah_kl_samples: 4) are drawn from the calibration rows, so at least 4 are needed."),
])
def test_bad_settings_are_refused_before_calibrating(assets, tmp_path: Path, overrides, message) -> None:
    assert message in _refusal(assets, tmp_path, **overrides)


def test_a_dataset_without_images_is_refused(assets, tmp_path: Path) -> None:
    folder = image_less_dataset(assets, tmp_path / "data")
    assert "has no image in any of its 32 rows" in _refusal(assets, tmp_path, dataset_dir=str(folder))


def test_rah_layers_forms() -> None:
    assert parse_rah_arguments({"rah_layers": "0-3"}).rah_layers == [0, 1, 2, 3]
    assert parse_rah_arguments({"rah_layers": [4, 0, 2]}).rah_layers == [0, 2, 4]
    assert parse_rah_arguments({}).layer_list(32) == list(range(16))
    for bad in ("3-1", "[1, 1]", "x"):
        with pytest.raises(ValueError, match="rah_layers"):
            parse_rah_arguments({"rah_layers": bad})


def test_a_v_update_under_gqa_takes_anchors_from_other_kv_groups(assets, tmp_path: Path) -> None:
    """A same-group head has the target's own V rows: as the only anchor it made an all-zero adapter reported as a
    calibration (KL 0, exit 0). Its anchors now come from the other KV group and the V rows move."""
    from safetensors.torch import load_file

    out = tmp_path / "out"
    model = gqa_llava(assets, tmp_path / "gqa_llava")
    run_train(rah_recipe(assets, "llava", out, model_name_or_path=str(model), rah_update="v", rah_num_anchors=1,
                         rah_layers="0-1"), tmp_path)
    profile = json.loads((out / "rah_profile.json").read_text())
    calibrated = [t for t in profile["targets"] if t["outcome"] == "calibrated"]
    assert calibrated and profile["summary"]["kl_to_original"] > 0
    for target in profile["targets"]:  # 4 query heads on 2 KV heads: heads 0-1 and 2-3 share V rows
        head = int(target["head"].split("H")[1])
        assert all(int(a["head"].split("H")[1]) // 2 != head // 2 for a in target["anchors"])
    weights = load_file(str(out / "adapter_model.safetensors"))
    assert weights and all(".v_proj." in k for k in weights) and all(bool(w.abs().sum() > 0) for w in weights.values())


def test_a_run_whose_steps_round_to_nothing_is_an_error(assets, tmp_path: Path) -> None:
    """alpha_max 1e-20 moves no float32 weight (KL 0 fits any delta): no target counts as calibrated, no adapter."""
    out = tmp_path / "out"
    proc = run_train(rah_recipe(assets, "llava", out, rah_alpha_max=1e-20), tmp_path, check=False)
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0 and not (out / "adapter_config.json").exists()
    profile = json.loads((out / "rah_profile.json").read_text())
    count = profile["summary"]["targets"]
    assert count and {t["outcome"] for t in profile["targets"]} == {"unchanged"}
    assert (f"[llamafactory-hera] error: RAH-LoRA changed no weight: 0 of {count} targets calibrated, {count} "
            "unchanged (the step rounds to nothing in float32); no adapter was written.") in text


def test_rows_of_every_image_size_make_the_maps(assets, tmp_path: Path) -> None:
    """Qwen2.5-VL on images of 4 sizes: every row has its map and the console says how many layouts there were."""
    out = tmp_path / "out"
    folder = mixed_size_dataset(assets, tmp_path / "data")
    proc = run_train(rah_recipe(assets, "qwen2_5_vl", out, dataset_dir=str(folder), rah_samples=16), tmp_path)
    summary = json.loads((out / "rah_profile.json").read_text())["summary"]
    assert summary["samples_without_a_map"] == 0 and summary["map_layouts"] > 1
    assert (f"the rows' images come in {summary['map_layouts']} layouts (grids of image tokens); the attention "
            "similarity averages the per-layout map cosines, weighted by rows (no row is left out)") in proc.stdout


def test_ray_with_several_workers_is_one_line_before_ray_starts(assets, tmp_path: Path) -> None:
    """Under ``USE_RAY=1`` each Ray worker refused stage: rah after Ray had started, naming FORCE_TORCHRUN and torchrun
    (the wrong fix) inside Ray's traceback; now the launcher refuses first, in one line naming Ray's own keys."""
    recipe = rah_recipe(assets, "llava", tmp_path / "out", ray_num_workers=2)
    proc = run_train(recipe, tmp_path, check=False, process=True, env={"USE_RAY": "1"})
    said = proc.stdout + proc.stderr
    assert proc.returncode == 1, said
    assert "USE_RAY=1 with ray_num_workers: 2: stage: rah runs as one process" in said, said
    assert "Set ray_num_workers: 1, or unset USE_RAY." in said and "FORCE_TORCHRUN" not in said, said
    assert "Traceback" not in said, said
    validate_raw_host_args({"ray_num_workers": 1}, parse_rah_arguments({}))  # one worker is one process: taken


def test_predict_with_generate_alone_is_taken_as_before() -> None:
    """Without do_eval or do_predict the key does nothing in stage: rah, which always ignored it: a recipe that ran
    before still runs (do_eval and do_predict are refused above)."""
    validate_raw_host_args({"predict_with_generate": True}, parse_rah_arguments({}))
