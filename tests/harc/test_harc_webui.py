"""LlamaBoard without a browser: the HARC panel, its checks and the arguments of the run it would start.

The UI is the stock ``llamafactory.webui.interface.create_ui()`` in a subprocess, driven through the callbacks its
buttons are bound to; the test stops at the arguments LlamaBoard previews and saves (no run is started).
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest

from conftest import offline_env
from llamafactory_hera.harc import webui_panel as panel
from llamafactory_hera.harc.args import HarcArguments

HARC_LABEL = "HARC (harmfulness-refusal coupling)"
ROLES = {"harc_harmful": "harc_harmful", "harc_harmless": "harc_harmless", "harc_pseudo": "harc_pseudo",
         "harc_harmful_completions": "harc_harmful_completions"}

PROBE = r'''
import json, sys
from llamafactory.extras.constants import TRAINING_STAGES
from llamafactory.webui import control
from llamafactory.webui.interface import create_ui

settings = json.loads(sys.argv[1])
demo = create_ui()
preview = next(f for f in demo.fns.values() if getattr(f.fn, "__name__", "") == "preview_train")
runner = preview.fn.__self__
manager = runner.manager
ids = [manager.get_id_by_elem(c) for c in preview.inputs]
report = {"stages": list(TRAINING_STAGES), "preview_inputs": sorted(ids),
          "train_ids": [i for i in manager._id_to_elem if i.startswith("train.")]}

def data_for(label, **overrides):
    data = {c: c.value for c in preview.inputs}
    values = {"top.lang": "en", "top.model_name": "Custom", "top.model_path": "tiny/model", "top.template": "llama3",
              "train.training_stage": label, "train.dataset": ["harc_harmful"],
              "train.dataset_dir": settings["dataset_dir"], "train.output_dir": "harc1", **settings["panel"],
              **overrides}
    for elem_id, value in values.items():
        data[manager.get_elem_by_id(elem_id)] = value
    return data

tab = manager.get_elem_by_id("train.harc_tab")
stage = manager.get_elem_by_id("train.training_stage")
toggle = next(f for f in demo.fns.values() if tab in f.outputs and stage in f.inputs)
report["visible"] = {label: toggle.fn(label).visible for label in TRAINING_STAGES}
report["initially_visible"] = tab.visible
change_lang = next(f for f in demo.fns.values() if getattr(f.fn, "__name__", "") == "change_lang")
report["labels"] = {lang: {manager.get_id_by_elem(e): [u.label, getattr(u, "info", None)]
                           for e, u in change_lang.fn(lang).items()
                           if manager.get_id_by_elem(e).startswith("train.harc_")} for lang in ("en", "zh")}
report["bad"] = {key: runner._initialize(data_for(settings["label"], **{"train." + key: value}), True, True)
                 for key, value in settings["bad"]}
report["bad_zh"] = runner._initialize(data_for(settings["label"], **{"top.lang": "zh", "train.harc_margin": 2}),
                                      True, True)
data = data_for(settings["label"])
report["error"] = runner._initialize(data, True, True)
report["args"] = runner._parse_train_args(data)
report["preview"] = next(runner.preview_train(data))[manager.get_elem_by_id("train.output_box")]
report["config_keys"] = sorted(runner._build_config_dict(data))
sft = data_for("Supervised Fine-Tuning", **{"train.harc_margin": 2})
report["sft_error"] = runner._initialize(sft, True, True)
report["sft_args"] = runner._parse_train_args(sft)
report["sft_config_keys"] = sorted(runner._build_config_dict(sft))
logs = [{"current_steps": s, "loss": 3.0 - s / 10, "harc_ce": 1.0, "harc_kl": 0.1 * s, "harc_couple": 0.5}
        for s in range(1, 6)]
fig = control.gen_loss_plot(logs)
report["harc_plot"] = [line.get_label() for ax in fig.axes for line in ax.get_lines()]
fig = control.gen_loss_plot([{k: v for k, v in log.items() if not k.startswith("harc_")} for log in logs])
report["stock_plot"] = [line.get_label() for ax in fig.axes for line in ax.get_lines()]
print("REPORT=" + json.dumps(report, default=str))
'''


@pytest.fixture(scope="module")
def board(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("harc_board")
    data_dir = tmp / "data"
    data_dir.mkdir()
    (data_dir / "dataset_info.json").write_text(json.dumps({name: {"file_name": f"{name}.json"} for name in ROLES}))
    settings = {
        "label": HARC_LABEL, "dataset_dir": str(data_dir),
        "panel": {**{f"train.{key}": f" {name} " for key, name in ROLES.items()},
                  "train.harc_batch_harmful": 3.0, "train.harc_margin": 0.4, "train.harc_refresh_steps": 0,
                  "train.extra_args": json.dumps({"harc_band": 1, "harc_weight_kl": 5.0})},
        "bad": [("harc_margin", 2), ("harc_batch_harmful", 0), ("harc_layers_final", 1), ("harc_harmful", ""),
                ("harc_refresh_steps", 1.5)],
    }
    env = offline_env(tmp, GRADIO_ANALYTICS_ENABLED="False")
    proc = subprocess.run([sys.executable, "-c", PROBE, json.dumps(settings)], cwd=tmp, env=env,
                          capture_output=True, text=True, timeout=300)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("REPORT=")]
    assert proc.returncode == 0 and lines, f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return json.loads(lines[-1][len("REPORT="):])


def test_panel_defaults_are_the_references() -> None:
    specs = {spec.name: spec.default for spec in HarcArguments.__dataclass_fields__.values()}
    assert panel.DEFAULTS == {key: specs[key] for key in panel.KEYS}
    assert panel.TAB == "harc_tab" and panel.ERROR_ALERT in panel.ALERTS
    assert (panel.DEFAULTS["harc_batch_harmful"], panel.DEFAULTS["harc_batch_harmless"],
            panel.DEFAULTS["harc_batch_pseudo"], panel.DEFAULTS["harc_margin"], panel.DEFAULTS["harc_weight_kl"],
            panel.DEFAULTS["harc_refresh_steps"], panel.DEFAULTS["harc_layers"], panel.DEFAULTS["harc_layers_final"],
            panel.DEFAULTS["harc_layers_ramp_step"]) == (6, 4, 2, 0.5, 10.0, 100, 2, 4, 500)
    for key, entry in panel.LOCALES.items():
        assert set(entry) == set(panel.LANGS), key
        assert entry["zh"]["label"] != entry["en"]["label"], key
    assert "optimizer steps" in panel.LOCALES["harc_refresh_steps"]["en"]["info"].lower()
    left_to_extra_args = set(specs) - set(panel.KEYS)  # named in the module docstring
    assert all(key in (panel.__doc__ or "") for key in left_to_extra_args), left_to_extra_args


def test_harc_args_from_panel_values() -> None:
    args = panel.build_harc_args({"harc_harmful": " bad ", "harc_batch_harmful": 4.0, "harc_margin": 0.25})
    assert args == {**panel.DEFAULTS, "harc_harmful": "bad", "harc_batch_harmful": 4, "harc_margin": 0.25}
    assert isinstance(args["harc_batch_harmful"], int)
    assert panel.build_harc_args({}) == panel.DEFAULTS
    good = {"harc_harmful": "h", "harc_harmless": "s", "harc_pseudo": "p"}
    assert panel.validate(good) == ""
    assert panel.validate({**good, "harc_pseudo": "", "harc_batch_pseudo": 0}) == ""
    assert panel.validate({**good, "harc_pseudo": ""}).startswith("harc_pseudo: missing")
    assert panel.validate({**good, "harc_margin": 2}).startswith("harc_margin")
    assert panel.validate({**good, "harc_harmful": "a, b"}).startswith("harc_harmful")
    assert panel.validate({**good, "harc_batch_harmless": 0, "harc_batch_pseudo": 0}).startswith("harc_batch_harmless")


def test_loss_figure_draws_the_harc_terms() -> None:
    logs = [{"current_steps": s, "loss": 2.0, "harc_kl": 0.1, "harc_ce": 1.0} for s in (1, 2)]
    assert panel.owns_loss_plot(logs) and not panel.owns_loss_plot([{"current_steps": 1, "loss": 2.0}])
    fig = panel.loss_figure(logs, lambda values: list(values))
    labels = [line.get_label() for ax in fig.axes for line in ax.get_lines()]
    assert labels == ["loss", "loss (smoothed)", "harc_ce (smoothed)", "harc_kl (smoothed)"]


def test_the_panel_shows_for_harc_only(board: dict[str, Any]) -> None:
    assert HARC_LABEL in board["stages"]
    ids = [f"train.{key}" for key in panel.KEYS]
    assert set(ids + ["train.harc_tab"]) <= set(board["train_ids"])
    assert set(ids) <= set(board["preview_inputs"])
    assert board["initially_visible"] is False
    assert board["visible"] == {label: label == HARC_LABEL for label in board["stages"]}
    labels = board["labels"]
    assert set(labels["en"]) == set(labels["zh"]) == set(ids + ["train.harc_tab"])
    assert labels["en"]["train.harc_tab"][0] == "HARC configurations"
    assert labels["zh"]["train.harc_tab"][0] == "HARC 参数设置"
    assert labels["en"]["train.harc_refresh_steps"][0] == "Refresh every (optimizer steps)"
    assert labels["zh"]["train.harc_margin"] == ["间隔 (m)", panel.LOCALES["harc_margin"]["zh"]["info"]]


def test_bad_values_name_the_key(board: dict[str, Any]) -> None:
    assert set(board["bad"]) == {"harc_margin", "harc_batch_harmful", "harc_layers_final", "harc_harmful",
                                 "harc_refresh_steps"}
    for key, message in board["bad"].items():
        assert message.startswith(f"Invalid HARC setting: {key}"), (key, message)
    assert "harc_layers_final: 1 is fewer than harc_layers: 2" in board["bad"]["harc_layers_final"]
    assert board["bad_zh"].startswith("HARC 参数无效：harc_margin")


def test_the_run_gets_the_panel_and_the_extra_arguments(board: dict[str, Any]) -> None:
    assert board["error"] == ""
    args = board["args"]
    assert args["stage"] == "harc"
    assert {k: v for k, v in args.items() if k.startswith("harc_")} == {
        **panel.DEFAULTS, **ROLES, "harc_batch_harmful": 3, "harc_margin": 0.4, "harc_refresh_steps": 0,
        "harc_weight_kl": 5.0,  # the extra-arguments box wins over the panel
        "harc_band": 1}
    preview = board["preview"]
    assert "--stage harc" in preview and "--harc_harmful harc_harmful" in preview
    assert "--harc_batch_harmful 3 " in preview and "--harc_weight_kl 5.0" in preview and "--harc_band 1" in preview
    assert {f"train.{key}" for key in panel.KEYS} <= set(board["config_keys"])


def test_other_stages_get_no_harc_keys(board: dict[str, Any]) -> None:
    assert board["sft_error"] == ""  # the panel's values are not checked for another stage
    assert board["sft_args"]["stage"] == "sft"
    assert sorted(k for k in board["sft_args"] if k.startswith("harc_")) == ["harc_band", "harc_weight_kl"]
    assert not any(k.startswith("train.harc_") for k in board["sft_config_keys"])


def test_llamaboard_plots_harc_terms_only_for_harc_logs(board: dict[str, Any]) -> None:
    assert board["harc_plot"] == ["loss", "loss (smoothed)", "harc_ce (smoothed)", "harc_kl (smoothed)",
                                  "harc_couple (smoothed)"]
    assert board["stock_plot"] == ["original", "smoothed"]

