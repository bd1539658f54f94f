"""A HARC run started from LlamaBoard as its Runner starts one: the stage picked in the stock UI, the role datasets in
the HARC panel, the stock Dataset box left empty, ``save_cmd``'s YAML run by the stock ``llamafactory-cli train`` with
``LLAMABOARD_ENABLED`` / ``LLAMABOARD_WORKDIR``; then what LlamaBoard's monitor shows."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from conftest import CLI, offline_env

PROBE = r'''
import json, os, subprocess, sys
from llamafactory.webui import control
from llamafactory.webui.common import save_cmd
from llamafactory.webui.interface import create_ui

settings = json.loads(sys.argv[1])
demo = create_ui()
preview = next(f for f in demo.fns.values() if getattr(f.fn, "__name__", "") == "preview_train")
runner = preview.fn.__self__
manager = runner.manager

def data_for(label, dataset):
    data = {c: c.value for c in preview.inputs}
    values = {"top.lang": "en", "top.model_name": "Custom", "top.model_path": settings["model"],
              "top.template": "llama3",
              "train.training_stage": label, "train.dataset": dataset, "train.dataset_dir": settings["dataset_dir"],
              "train.output_dir": "harc_board", "train.compute_type": "fp32",
              "train.batch_size": settings["batch_size"],
              "train.logging_steps": 1, "train.gradient_accumulation_steps": 2, **settings["panel"]}
    for elem_id, value in values.items():
        data[manager.get_elem_by_id(elem_id)] = value
    return data

report = {"sft_error": runner._initialize(data_for("Supervised Fine-Tuning", []), True, True)}
data = data_for(settings["label"], [])
report["error"] = runner._initialize(data, True, True)
args = runner._parse_train_args(data)
report["args"] = {k: v for k, v in args.items() if k.startswith("harc_") or k in ("stage", "dataset")}
env = {**os.environ, "LLAMABOARD_ENABLED": "1", "LLAMABOARD_WORKDIR": args["output_dir"]}
proc = subprocess.run([settings["cli"], "train", save_cmd(args)], env=env, capture_output=True, text=True)
report["returncode"] = proc.returncode
report["tail"] = (proc.stdout + proc.stderr)[-4000:]
report["said"] = [line for line in (proc.stdout + proc.stderr).splitlines() if "[llamafactory-hera]" in line]
report["output_dir"] = args["output_dir"]
log, progress, info = control.get_trainer_info("en", args["output_dir"], True)
report["running_log"] = log
report["has_plot"] = "loss_viewer" in info and info["loss_viewer"].value is not None
print("REPORT=" + json.dumps(report, default=str))
'''


def test_a_run_from_llamaboard_with_an_empty_dataset_box(harc_assets: Any, tmp_path: Path) -> None:
    panel = {"train.harc_harmful": "harc_harmful", "train.harc_harmless": "harc_harmless",
             "train.harc_pseudo": "harc_pseudo", "train.harc_harmful_completions": "harc_harmful_completions",
             "train.harc_extract_samples": 8, "train.harc_validate_samples": 4, "train.harc_refresh_steps": 2,
             "train.harc_layers_ramp_step": 2,
             "train.extra_args": json.dumps({"harc_band": 1, "harc_eval_max_new_tokens": 4, "max_steps": 3})}
    settings = {"label": "HARC (harmfulness-refusal coupling)", "model": str(harc_assets.models["llama3"]),
                "dataset_dir": str(harc_assets.dataset_dir), "cli": CLI, "panel": panel, "batch_size": 2}
    proc = subprocess.run([sys.executable, "-c", PROBE, json.dumps(settings)], cwd=tmp_path,
                          env=offline_env(tmp_path, GRADIO_ANALYTICS_ENABLED="False"), capture_output=True, text=True,
                          timeout=600)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("REPORT=")]
    assert proc.returncode == 0 and lines, f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    report = json.loads(lines[-1][len("REPORT="):])
    assert report["sft_error"]  # the stock check still refuses SFT without a dataset
    assert report["error"] == ""  # HARC names its datasets in its panel
    assert report["args"]["stage"] == "harc" and report["args"]["harc_harmful"] == "harc_harmful"
    assert report["returncode"] == 0, report["tail"]
    # LlamaBoard's Batch size box (2 by default) counts composed micro-batches: said, and honoured
    assert any("per_device_train_batch_size: 2 counts composed micro-batches" in line for line in report["said"])
    assert any("micro-batches of 12 rows" in line for line in report["said"])
    output = Path(report["output_dir"])
    if not output.is_absolute():
        output = tmp_path / output
    assert (output / "adapter_model.safetensors").is_file() and (output / "harc_eval.json").is_file()
    assert "HARC: base directions extracted" in report["running_log"]
    assert report["has_plot"]
    lines = [json.loads(line) for line in (output / "trainer_log.jsonl").read_text().splitlines()]
    assert all("harc_kl" in line for line in lines if "loss" in line)
