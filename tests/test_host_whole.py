"""LLaMA-Factory stays whole with the plugin installed: every stock stage trains exactly as without it.

For pt, sft, dpo, kto and rm, the same recipe runs through LLaMA-Factory's ``run_exp`` (what ``llamafactory-cli
train`` calls) in a fresh process with the plugin active, and in another with LLAMAFACTORY_HERA_DISABLE=1; the logged
losses must be identical step for step, the files each run writes the same, its adapter bit for bit. Each process
trains the five stages one after the other, in the same order (accelerate's process-wide state reset between them,
as between the suite's in-process runs): a process start costs more than the stage's two steps.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

from conftest import offline_env, read_trainer_log, run_process

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


STAGES = (("pt", "pt_text"), ("sft", "sft_text"), ("dpo", "pairs_text"), ("kto", "kto_text"), ("rm", "pairs_text"))
# one process, the recipes in turn through run_exp, accelerate's state reset before each (what the start-up hook does
# on LLAMAFACTORY_HERA_DISABLE is read once, at the process's start)
RUN_ALL = ("import sys, yaml\n"
           "from llamafactory.train.tuner import run_exp\n"
           "from llamafactory_hera_testing.accelerator_run import reset_accelerate_state\n"
           "for path in sys.argv[1:]:\n"
           "    reset_accelerate_state()\n"
           "    run_exp(yaml.safe_load(open(path, encoding='utf-8')))\n")


def test_stock_stages_train_identically_with_the_plugin(assets, tmp_path: Path) -> None:
    data = _datasets(tmp_path / "data")
    losses: dict[str, dict[str, list[float]]] = {}
    for label, extra_env in (("plugin", {}), ("stock", {"LLAMAFACTORY_HERA_DISABLE": "1"})):
        paths = []
        for stage, dataset in STAGES:
            recipe = {
                "model_name_or_path": str(assets.models["qwen2_5_vl"]), "trust_remote_code": True, "stage": stage,
                "do_train": True, "finetuning_type": "lora", "lora_target": "all", "dataset": dataset,
                "dataset_dir": str(data), "template": assets.templates["qwen2_5_vl"], "cutoff_len": 64,
                "overwrite_cache": True, "preprocessing_num_workers": 1, "per_device_train_batch_size": 4,
                "max_steps": 2, "logging_steps": 1, "learning_rate": 1e-3, "save_strategy": "no",
                "output_dir": str(tmp_path / label / stage), "overwrite_output_dir": True, "report_to": "none",
                "seed": 0,
            }
            paths.append(tmp_path / label / f"{stage}.yaml")
            paths[-1].parent.mkdir(parents=True, exist_ok=True)
            paths[-1].write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
        proc = run_process([sys.executable, "-c", RUN_ALL, *map(str, paths)], cwd=tmp_path / label,
                           env=offline_env(tmp_path / label, **extra_env), timeout=900)
        assert proc.returncode == 0, (label, proc.stdout[-4000:], proc.stderr[-8000:])
        losses[label] = {stage: [line["loss"] for line in read_trainer_log(tmp_path / label / stage) if "loss" in line]
                         for stage, _ in STAGES}
        assert not any((tmp_path / label / stage / "hera_state.json").exists() for stage, _ in STAGES)
    for stage, _ in STAGES:
        assert len(losses["plugin"][stage]) == 2 and losses["plugin"][stage] == losses["stock"][stage], stage
        # the same files (the plugin adds none of its own to a plain recipe's folder), the same adapter bit for bit
        written = [sorted(str(path.relative_to(tmp_path / label / stage)) for path in
                          (tmp_path / label / stage).rglob("*") if path.is_file()) for label in ("plugin", "stock")]
        assert written[0] == written[1] and "adapter_model.safetensors" in written[0], (stage, written)
        adapters = [load_file(tmp_path / label / stage / "adapter_model.safetensors") for label in ("plugin", "stock")]
        assert adapters[0].keys() == adapters[1].keys(), stage
        assert all(torch.equal(adapters[0][key], adapters[1][key]) for key in adapters[0]), stage
