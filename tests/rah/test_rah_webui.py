"""LlamaBoard without a browser: the RAH-LoRA panel, the run it starts, and what its monitor shows.

The UI is the stock ``llamafactory.webui.interface.create_ui()`` in a subprocess, driven through the callbacks its
buttons are bound to; the run is started as LlamaBoard's Runner starts it (its ``save_cmd`` YAML, the stock
``llamafactory-cli train``, ``LLAMABOARD_ENABLED`` / ``LLAMABOARD_WORKDIR``), on the tiny LLaVA.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from conftest import CLI, offline_env
from llamafactory_hera.board.spec import LANGS
from llamafactory_hera.rah.config import RahArguments
from llamafactory_hera.rah.webui_panel import PANEL as panel
from webui_probe import run_probe

RAH_LABEL = "RAH-LoRA (training-free head calibration)"
HERA_LABEL = "HeRA (Head-wise Representation Alignment)"

PROBE = r"""
import json, os, subprocess, sys
from llamafactory.webui import control
from llamafactory.webui.common import save_cmd
from webui_probe import Board, print_report

settings = json.loads(sys.argv[1])
RAH = settings["label"]
board = Board({"top.lang": "en", "top.model_name": "Custom", "top.model_path": settings["model"],
               "top.template": "llava", "train.dataset": ["hera_demo"], "train.dataset_dir": settings["dataset_dir"],
               "train.output_dir": "rah1", "train.compute_type": "fp32"})
runner, data_for = board.runner, board.data_for
report = {**board.report(), **board.panel("rah", ("en", "zh"))}
report["bad"] = {}
for key, value in (("rah_layers", "3-1"), ("rah_delta", 0), ("rah_num_anchors", 1.5), ("rah_isal_percentile", 100)):
    report["bad"][key] = board.error(data_for(RAH, **{"train." + key: value}))
report["too_deep"] = {value: board.error(data_for(RAH, **{"train.rah_layers": value}))
                      for value in ("0-5", "[1, 9]", "1")}
report["too_deep_elsewhere"] = board.error(data_for(RAH, **{"train.rah_layers": "0-5",
                                                            "top.model_path": "not/on/this/machine"}))
note = board.elem("train.rah_note")
report["note"] = {lang: board.change_lang(lang)[note].value for lang in ("en", "zh")}
report["note_first"] = note.value
data = data_for(RAH, **settings["panel"])
report["error"] = board.error(data)
args = runner._parse_train_args(data)
report["args"] = args
report["preview"] = board.preview_text(data)
report["sft_args"] = runner._parse_train_args(data_for("Supervised Fine-Tuning", **settings["panel"]))
report["lr_in_extra"] = runner._parse_train_args(data_for(RAH, **{
    "train.extra_args": json.dumps({"learning_rate": 0.001})})).get("learning_rate")
# start the run as Runner._launch does
env = {**os.environ, "LLAMABOARD_ENABLED": "1", "LLAMABOARD_WORKDIR": args["output_dir"]}
proc = subprocess.run([settings["cli"], "train", save_cmd(args)], env=env, capture_output=True, text=True)
report["returncode"] = proc.returncode
report["tail"] = (proc.stdout + proc.stderr)[-4000:]
report["output_dir"] = args["output_dir"]
log, progress, info = control.get_trainer_info("en", args["output_dir"], True)
report["running_log"] = log
report["progress_label"] = getattr(progress, "label", None)
report["plot_title"] = info["loss_viewer"].value is not None if "loss_viewer" in info else None
fig = control.gen_loss_plot([json.loads(line) for line in open(os.path.join(args["output_dir"], "trainer_log.jsonl"))])
report["figure_texts"] = [ax.get_title() for ax in fig.axes] + [t.get_text() for ax in fig.axes
                                                                 for t in ax.get_yticklabels()]
print_report(report)
"""


@pytest.fixture(scope="module")
def board(assets, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("rah_board")
    settings = {
        "label": RAH_LABEL, "model": str(assets.models["llava"]), "dataset_dir": str(assets.dataset_dir), "cli": CLI,
        # on 4-head tiny layers the paper's percentiles keep 0 or 1 head: these force targets and kept steps
        "panel": {"train.rah_layers": "[0]", "train.rah_isal_percentile": 50, "train.rah_caf_percentile": 0,
                  "train.rah_num_anchors": 2.0, "train.rah_rank": 2, "train.rah_delta": 10.0,
                  "train.rah_samples": 8, "train.rah_probe_samples": 4, "train.rah_kl_samples": 4,
                  "train.extra_args": json.dumps({"rah_beta": -100, "rah_rank": 3})},
    }
    env = offline_env(tmp, GRADIO_ANALYTICS_ENABLED="False")
    report = run_probe(PROBE, [json.dumps(settings)], tmp, env, timeout=600)
    report["cwd"] = str(tmp)
    return report


def test_panel_defaults_are_the_papers() -> None:
    specs = {spec.name: spec.default for spec in RahArguments.__dataclass_fields__.values()}
    assert panel.defaults == {key: specs[key] for key in panel.keys}
    assert (panel.defaults["rah_layers"], panel.defaults["rah_isal_percentile"], panel.defaults["rah_caf_percentile"],
            panel.defaults["rah_num_anchors"], panel.defaults["rah_rank"], panel.defaults["rah_delta"],
            panel.defaults["rah_alpha_max"], panel.defaults["rah_samples"], panel.defaults["rah_probe_samples"]) == (
        "auto", 15.0, 70.0, 3, 8, 0.05, 0.15, 100, 32)
    for key, entry in panel.locales.items():
        assert set(entry) == set(LANGS), key
        assert entry["zh"] != entry["en"] or key in ("rah_update",), key


def test_rah_args_from_panel_values() -> None:
    args = panel.build_args({"rah_layers": " [0, 2  4] ", "rah_rank": 4.0, "rah_update": "o"})
    assert args["rah_layers"] == "0,2,4" and args["rah_rank"] == 4 and isinstance(args["rah_rank"], int)
    assert panel.build_args({"rah_layers": " 0 - 15 "})["rah_layers"] == "0-15"
    assert panel.build_args({})["rah_layers"] == "auto"
    assert panel.validate({"rah_layers": "0-3"}) == ""
    assert panel.validate({"rah_layers": "two"}).startswith("rah_layers:")
    assert panel.validate({"rah_alpha_max": 2}).startswith("rah_alpha_max: got 2")


def test_the_panel_shows_for_rah_only(board: dict[str, Any]) -> None:
    assert RAH_LABEL in board["stages"] and HERA_LABEL in board["stages"]
    ids = [f"train.{key}" for key in panel.keys]
    assert set(ids + ["train.rah_tab"]) <= set(board["train_ids"])
    assert set(ids) <= set(board["preview_inputs"])
    assert board["initially_visible"] is False
    assert board["visible"] == {label: label == RAH_LABEL for label in board["stages"]}
    assert board["labels"]["en"]["train.rah_tab"]["label"] == "RAH-LoRA configurations"
    assert board["labels"]["zh"]["train.rah_tab"]["label"] == "RAH-LoRA 参数设置"
    assert board["labels"]["zh"]["train.rah_delta"]["label"] == "KL 预算 (delta)"


def test_bad_values_name_the_key(board: dict[str, Any]) -> None:
    for key, message in board["bad"].items():
        assert message.startswith(f"Invalid RAH-LoRA setting: {key}"), (key, message)


def test_the_run_gets_the_panel_and_the_extra_arguments(board: dict[str, Any]) -> None:
    assert board["error"] == ""
    args = board["args"]
    assert args["stage"] == "rah"
    assert {k: v for k, v in args.items() if k.startswith("rah_")} == {
        "rah_layers": "0", "rah_isal_percentile": 50, "rah_caf_percentile": 0, "rah_num_anchors": 2,
        "rah_rank": 3,  # the extra-arguments box wins over the panel
        "rah_delta": 10.0, "rah_alpha_max": 0.15, "rah_samples": 8, "rah_probe_samples": 4, "rah_kl_samples": 4,
        "rah_update": "auto", "rah_caf_form": "magnitude", "rah_isal_pairs": "paper", "rah_beta": -100}
    assert "--stage rah" in board["preview"] and "--rah_layers 0" in board["preview"]
    assert not any(k.startswith("rah_") and k != "rah_beta" and k != "rah_rank" for k in board["sft_args"])


def test_the_command_leaves_out_what_only_an_optimizer_uses(board: dict[str, Any]) -> None:
    unused = ("learning_rate", "num_train_epochs", "per_device_train_batch_size", "gradient_accumulation_steps",
              "lr_scheduler_type", "max_grad_norm", "warmup_steps")
    assert panel.declaration.unused_host_keys == unused
    assert not set(unused) & set(board["args"]), board["args"]
    assert not any(f"--{key} " in board["preview"] for key in unused), board["preview"]
    assert set(unused) <= set(board["sft_args"])  # other stages keep them
    assert board["lr_in_extra"] == 0.001  # set in "Extra arguments": sent as asked
    en = board["note"]["en"]
    assert board["note_first"] == en and en.startswith("RAH-LoRA is training-free: it takes no optimizer step")
    assert "learning rate, epochs, batch size" in en and "left out of the command" in en
    assert board["note"]["zh"].startswith("RAH-LoRA 无需训练")


def test_the_preview_checks_the_layers_against_the_models_depth(board: dict[str, Any], assets) -> None:
    config = json.loads((Path(assets.models["llava"]) / "config.json").read_text())
    depth = config["text_config"]["num_hidden_layers"]
    model = assets.models["llava"]
    for given, shown in (("0-5", "0-5"), ("[1, 9]", "1,9")):
        assert board["too_deep"][given] == (
            f"Invalid RAH-LoRA setting: rah_layers: {shown} goes beyond {model}, which has {depth} decoder layers "
            f"(num_hidden_layers of its text config; zero-based 0..{depth - 1}). Use auto or layers within "
            f"0-{depth - 1}."), given
    assert board["too_deep"]["1"] == ""
    assert board["too_deep_elsewhere"] == ""  # a model whose config is not on this machine: the run checks it


def test_the_run_writes_the_adapter_and_llamaboard_shows_its_progress(board: dict[str, Any]) -> None:
    assert board["returncode"] == 0, board["tail"]
    out = Path(board["cwd"]) / board["output_dir"]
    assert (out / "adapter_config.json").is_file() and (out / "rah_profile.json").is_file()
    profile = json.loads((out / "rah_profile.json").read_text())
    assert profile["settings"]["rank"] == 3 and profile["layers"] == [0]
    assert "RAH-LoRA: layers 0..0 (1)" in board["running_log"] and "targets calibrated" in board["running_log"]
    lines = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    phases = [line["rah_phase"] for line in lines]
    assert phases[0] == "I-SAL (attention)" and "CAF (gate gradients)" in phases
    assert lines[-1]["current_steps"] == lines[-1]["total_steps"] and lines[-1]["percentage"] == 100.0
    assert board["progress_label"].startswith("Running ") and board["plot_title"]
    assert "RAH-LoRA calibration (training-free: no loss)" in board["figure_texts"]
    assert "calibrating targets (trust region)" in board["figure_texts"]


def test_the_depth_is_read_from_the_hugging_face_cache_offline(assets, tmp_path: Path) -> None:
    # a model named by its hub id, present only in the Hugging Face cache: read without the network
    snapshot = tmp_path / "hf_home" / "hub" / "models--tiny-org--tiny-llava" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text((Path(assets.models["llava"]) / "config.json").read_text())
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    code = ("from llamafactory_hera.board.panel_checks import local_text_depth as depth; "
            "print(depth('tiny-org/tiny-llava'), depth('tiny-org/not-cached'), depth(''))")
    proc = subprocess.run([sys.executable, "-c", code], env=offline_env(tmp_path), capture_output=True, text=True,
                          timeout=120)
    config = json.loads((Path(assets.models["llava"]) / "config.json").read_text())
    assert proc.stdout.split() == [str(config["text_config"]["num_hidden_layers"]), "None", "None"], proc.stderr
