"""LLaMA-Factory stays whole with the plugin installed: every stock stage trains exactly as without it.

For pt, sft, dpo, kto and rm, the same recipe runs through the stock `llamafactory-cli train` twice, with the
plugin active and with LLAMAFACTORY_HERA_DISABLE=1; the logged losses must be identical step for step.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import read_trainer_log, run_train

PROMPTS = ["Name a colour.", "Count to three.", "Say hello.", "Describe a circle.", "What is red?", "Name a shape.",
           "Say goodbye.", "Describe a square."]


def _datasets(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    pt = [{"text": f"{p} a red circle on a blue background"} for p in PROMPTS]
    sft = [{"instruction": p, "input": "", "output": "a red circle"} for p in PROMPTS]
    pairs = [{"instruction": p, "input": "", "chosen": "a red circle", "rejected": "blue"} for p in PROMPTS]
    kto = [{"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": "a red circle"}],
            "label": i % 2 == 0} for i, p in enumerate(PROMPTS)]
    for name, rows in (("pt", pt), ("sft", sft), ("pairs", pairs), ("kto", kto)):
        (folder / f"{name}.json").write_text(json.dumps(rows))
    info = {
        "pt_text": {"file_name": "pt.json", "columns": {"prompt": "text"}},
        "sft_text": {"file_name": "sft.json"},
        "pairs_text": {"file_name": "pairs.json", "ranking": True,
                       "columns": {"prompt": "instruction", "query": "input", "chosen": "chosen",
                                   "rejected": "rejected"}},
        "kto_text": {"file_name": "kto.json", "formatting": "sharegpt",
                     "columns": {"messages": "messages", "kto_tag": "label"},
                     "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                              "assistant_tag": "assistant"}},
    }
    (folder / "dataset_info.json").write_text(json.dumps(info))
    return folder


@pytest.mark.parametrize("stage,dataset", [("pt", "pt_text"), ("sft", "sft_text"), ("dpo", "pairs_text"),
                                           ("kto", "kto_text"), ("rm", "pairs_text")])
def test_stock_stage_trains_identically_with_the_plugin(assets, tmp_path: Path, stage: str, dataset: str) -> None:
    data = _datasets(tmp_path / "data")
    losses = {}
    for label, extra_env in (("plugin", {}), ("stock", {"LLAMAFACTORY_HERA_DISABLE": "1"})):
        out = tmp_path / label / "out"
        recipe = {
            "model_name_or_path": str(assets.models["qwen2_5_vl"]), "trust_remote_code": True, "stage": stage,
            "do_train": True, "finetuning_type": "lora", "lora_target": "all", "dataset": dataset,
            "dataset_dir": str(data), "template": assets.templates["qwen2_5_vl"], "cutoff_len": 64,
            "overwrite_cache": True, "preprocessing_num_workers": 1, "per_device_train_batch_size": 4,
            "max_steps": 2, "logging_steps": 1, "learning_rate": 1e-3, "save_strategy": "no",
            "output_dir": str(out), "overwrite_output_dir": True, "report_to": "none", "seed": 0,
        }
        run_train(recipe, tmp_path / label, env=extra_env, process=True)  # both runs alike: two fresh processes
        losses[label] = [line["loss"] for line in read_trainer_log(out) if "loss" in line]
        assert not (out / "hera_state.json").exists()
    assert len(losses["plugin"]) == 2 and losses["plugin"] == losses["stock"]
