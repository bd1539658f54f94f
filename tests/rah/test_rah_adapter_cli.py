"""The adapter a ``stage: rah`` run writes, used the ways a LLaMA-Factory user uses an adapter: merged by
``llamafactory-cli export``, trained further by ``llamafactory-cli train``, and answering in LLaMA-Factory's
``ChatModel`` (what ``llamafactory-cli chat`` runs), on the tiny LLaVA."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from dist_runs import run_python
from test_rah_stage import rah_recipe

from conftest import CLI, offline_env, run_train

CHAT = r'''
import json, sys
from llamafactory.chat import ChatModel
args = json.loads(sys.argv[1])
image = args.pop("image")
model = ChatModel(args)
reply = model.chat([{"role": "user", "content": "<image>Describe the image."}], images=[image])
print("REPLY=" + json.dumps([r.response_text for r in reply]))
'''


@pytest.fixture(scope="module")
def calibrated(assets, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("rah_adapter")
    recipe = rah_recipe(assets, "llava", tmp / "adapter")
    run_train(recipe, tmp)
    return tmp / "adapter", recipe


def _cli(verb: str, config: dict[str, Any], tmp: Path) -> subprocess.CompletedProcess:
    path = tmp / f"{verb}.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    proc = subprocess.run([CLI, verb, str(path)], cwd=tmp, env=offline_env(tmp), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def test_export_merges_the_adapter_into_the_calibrated_model(assets, calibrated, tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    adapter, recipe = calibrated
    merged = tmp_path / "merged"
    _cli("export", {"model_name_or_path": recipe["model_name_or_path"], "adapter_name_or_path": str(adapter),
                    "template": recipe["template"], "finetuning_type": "lora", "trust_remote_code": True,
                    "export_dir": str(merged), "export_size": 1, "export_device": "cpu"}, tmp_path)
    torch.manual_seed(0)
    ids = torch.randint(3, 200, (1, 12))
    base = AutoModelForImageTextToText.from_pretrained(recipe["model_name_or_path"], torch_dtype=torch.float32)
    with torch.no_grad():
        before = base(input_ids=ids).logits
        expected = PeftModel.from_pretrained(base, str(adapter)).eval()(input_ids=ids).logits
        exported = AutoModelForImageTextToText.from_pretrained(merged, torch_dtype=torch.float32)(input_ids=ids).logits
    assert not torch.allclose(before, expected)  # the adapter changes the model ...
    torch.testing.assert_close(exported, expected, rtol=1e-5, atol=1e-5)  # ... and export keeps exactly that


def test_sft_trains_on_from_the_adapter(assets, calibrated, tmp_path: Path) -> None:
    adapter, recipe = calibrated
    sft = {k: v for k, v in recipe.items() if not k.startswith("rah_")}
    sft |= {"stage": "sft", "adapter_name_or_path": str(adapter), "output_dir": str(tmp_path / "sft"),
            "max_steps": 1, "per_device_train_batch_size": 2, "learning_rate": 1e-4}
    run_train(sft, tmp_path)
    config = json.loads((tmp_path / "sft" / "adapter_config.json").read_text())
    assert config["target_modules"]  # LLaMA-Factory resumed the RAH adapter and saved it after a step


def test_chat_model_answers_with_the_adapter(assets, calibrated, tmp_path: Path) -> None:
    adapter, recipe = calibrated
    image = sorted((Path(recipe["dataset_dir"]) / "images").iterdir())[0]
    args = {"model_name_or_path": recipe["model_name_or_path"], "adapter_name_or_path": str(adapter),
            "template": recipe["template"], "finetuning_type": "lora", "trust_remote_code": True,
            "infer_backend": "huggingface", "max_new_tokens": 4, "do_sample": False, "image": str(image)}
    (tmp_path / "chat.py").write_text(CHAT, encoding="utf-8")  # in a process forked from the warm process
    proc = run_python(tmp_path / "chat.py", [json.dumps(args)], cwd=tmp_path, env=offline_env(tmp_path))
    lines = [line for line in proc.stdout.splitlines() if line.startswith("REPLY=")]
    assert proc.returncode == 0 and lines, f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    assert "Loaded adapter(s)" in proc.stdout + proc.stderr
    assert len(json.loads(lines[-1][len("REPLY="):])) == 1
