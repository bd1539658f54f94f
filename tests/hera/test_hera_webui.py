"""LlamaBoard without a browser: the HeRA panel, the run's arguments, the saved config and the loss plot.

The UI is built with the stock ``llamafactory.webui.interface.create_ui()`` in a subprocess (once with
the plugin, once with ``LLAMAFACTORY_HERA_DISABLE=1``), and driven through the very callbacks its
buttons are bound to; stock stages must come out byte for byte as without the plugin.
"""

from __future__ import annotations

import json
from dataclasses import MISSING, fields
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from conftest import offline_env
from llamafactory_hera.board.spec import LANGS
from llamafactory_hera.hera.config import HeraArguments
from llamafactory_hera.hera.webui_panel import PANEL as panel
from webui_probe import run_probe

HERA_LABEL = "HeRA (Head-wise Representation Alignment)"
SFT_LABEL = "Supervised Fine-Tuning"

# Runs in a fresh interpreter (cwd: a temporary folder, where LlamaBoard keeps its cache and saves).
PROBE = r"""
import json, os, sys
from plot_checks import legend_clearance
from llamafactory.webui import control
from webui_probe import Board, print_report

HERA = "HeRA (Head-wise Representation Alignment)"
board = Board({"top.lang": "en", "top.model_name": "Custom", "top.model_path": "/models/tiny",
               "top.template": "qwen3_vl_nothink", "train.dataset": ["hera_demo"], "train.dataset_dir": "/data",
               "train.output_dir": "run1"})
runner, data_for = board.runner, board.data_for
report = board.report()
report["runs"] = {}
for label in json.loads(sys.argv[1]):
    data = data_for(label, **(json.loads(sys.argv[2]) if label == HERA else {}))
    report["runs"][label] = {"error": board.error(data), "args": runner._parse_train_args(data),
                             "config": runner._build_config_dict(data), "preview": board.preview_text(data)}

if "train.hera_tab" in report["train_ids"]:
    report.update(board.panel("hera", ("en", "zh", "ru", "ko", "ja")))
    runner.save_args(data_for(HERA, **{"train.config_path": "hera.yaml", "train.hera_heads": "L0H3",
                                       "train.hera_k": 4}))
    loaded = runner.load_args("en", "hera.yaml")
    report["loaded"] = {board.manager.get_id_by_elem(e): v for e, v in loaded.items()
                        if board.manager.get_id_by_elem(e).startswith("train.hera_")}
    report["bad_heads_error"] = board.error(data_for(HERA, **{"train.hera_heads": "L1X0"}))
    model = os.environ.get("HERA_PROBE_MODEL")
    report["heads_vs_model"] = {}
    for heads in ("L99H0", "L0H99", "L1H0, L1H2", "auto") if model else ():
        data = data_for(HERA, **{"top.model_path": model, "train.hera_heads": heads})
        report["heads_vs_model"][heads] = {"error": board.error(data), "preview": board.preview_text(data)}
    if model:  # the plan button: LlamaBoard's run arguments, the tiny model and its dataset, planned
        box = board.elem("train.hera_plan_box")
        plan = next(f for f in board.demo.fns.values() if list(f.outputs) == [box])
        report["plan"] = plan.fn(data_for(HERA, **{"top.model_path": model, "train.cutoff_len": 256,
                                                   "train.hera_heads": "L1H0, L1H2",
                                                   "train.dataset_dir": os.path.join(model, "..", "..", "data")}))
        report["preview_sends_not_plan"] = sorted(board.manager.get_id_by_elem(c) for c in board.preview.inputs
                                                  if c not in plan.inputs)
        report["plan_without_model"] = plan.fn(data_for(HERA))
    report["heads_elsewhere"] = board.error(data_for(HERA, **{"train.hera_heads": "L99H0"}))
    report["bad_values"] = {}
    for key, raw in (("hera_k", 0), ("hera_k", 1.5), ("hera_k", None), ("hera_temperature", 0),
                     ("hera_lambda", -1), ("hera_select_num_heads", 0)):
        try:
            value = board.elem("train." + key).preprocess(raw)  # what gradio does with the browser's value first
        except Exception as err:
            report["bad_values"][f"{key}={raw}"] = "gradio: " + str(err)
            continue
        report["bad_values"][f"{key}={raw}"] = board.error(data_for(HERA, **{"train." + key: value}))
    tab = board.elem("train.hera_tab")
    children = tab.parent.children
    buttons = children.index(board.elem("train.cmd_preview_btn").parent)
    # right above the buttons, with the other methods' panels (accordions) between at most
    report["panel_before_buttons"] = children.index(tab) < buttons and all(
        (getattr(c, "elem_id", "") or "").endswith("_tab") for c in children[children.index(tab):buttons])

for kind in ("hera", "stock"):
    log = [{"current_steps": s, "loss": 2.0 / s, **({"hera_loss": 1.0 / s} if kind == "hera" else {})}
           for s in range(1, 6)]
    fig = control.gen_loss_plot(log)
    report[f"plot_lines_{kind}"] = sorted(line.get_label() for ax in fig.axes for line in ax.get_lines())
    report[f"legend_{kind}"] = legend_clearance(fig)
print_report(report)
"""


def _probe(tmp_path: Path, labels: list[str], hera_overrides: dict[str, Any] | None = None, *,
           disable: bool = False, model: Path | None = None) -> dict[str, Any]:
    """The PROBE's report; ``model``: a local model the HeRA heads are checked against in the preview."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    env = offline_env(tmp_path, GRADIO_ANALYTICS_ENABLED="False", **({"LLAMAFACTORY_HERA_DISABLE": "1"} if disable
                                                                    else {}),
                      **({"HERA_PROBE_MODEL": str(model)} if model else {}))
    return run_probe(PROBE, [json.dumps(labels), json.dumps(hera_overrides or {})], tmp_path, env, timeout=300)


@pytest.fixture(scope="module")
def board(assets: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    overrides = {"train.hera_heads": "[L1H0, L1H2]", "train.hera_teacher": "/models/teacher", "train.hera_k": 3,
                 "train.hera_learn_temperature": False}
    return _probe(tmp_path_factory.mktemp("board"), [SFT_LABEL, "DPO", HERA_LABEL], overrides,
                  model=assets.models["qwen3_vl"])


@pytest.fixture(scope="module")
def stock(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return _probe(tmp_path_factory.mktemp("stock"), [SFT_LABEL, "DPO"], disable=True)


def test_panel_defaults_are_the_papers() -> None:
    specs = {spec.name: spec for spec in fields(HeraArguments)}
    for key, value in panel.defaults.items():
        spec = specs[key]
        expected = spec.default_factory() if spec.default is MISSING else spec.default
        expected = "auto" if key == "hera_heads" else expected  # the recipe requires heads; the panel starts on auto
        assert value == expected, key
    assert panel.defaults["hera_teacher"] == "facebook/dinov2-large"
    assert (panel.defaults["hera_k"], panel.defaults["hera_lambda"], panel.defaults["hera_temperature"],
            panel.defaults["hera_pooling"]) == (10, 0.01, 0.07, "assistant")
    assert set(panel.keys) <= set(specs)  # the rest (e.g. hera_temperature_lr) go into the extra-arguments box
    assert {"hera_heads", "hera_teacher", "hera_k", "hera_lambda", "hera_temperature", "hera_pooling",
            "hera_select_samples", "hera_select_num_heads"} <= set(panel.keys)
    for key, entry in panel.locales.items():
        assert set(entry) == set(LANGS), key
        assert entry["zh"] != entry["en"], key


def test_hera_args_from_panel_values() -> None:
    args = panel.build_args({"hera_heads": " [L13H12;  l7h6] ", "hera_k": 3.0, "hera_learn_temperature": False})
    assert args["hera_heads"] == "L13H12,l7h6" and args["hera_k"] == 3 and isinstance(args["hera_k"], int)
    assert args["hera_learn_temperature"] is False  # kept by the web-UI patch where LlamaBoard drops it
    assert not any(key.startswith("hera_select_") for key in args)
    auto = panel.build_args({})
    assert auto["hera_heads"] == "auto" and auto["hera_select_samples"] == 1000 and auto["hera_learn_temperature"]
    assert panel.validate({"hera_heads": "L1H0, L1H2"}) == ""
    assert "hera_k" in panel.validate({"hera_heads": "auto", "hera_k": 0})
    assert "L1X0" in panel.validate({"hera_heads": "L1X0"})


def test_ui_registers_the_panel_hidden_until_hera_is_picked(board: dict[str, Any]) -> None:
    assert HERA_LABEL in board["stages"]
    hera_ids = [f"train.{key}" for key in panel.keys]
    assert set(hera_ids + ["train.hera_tab"]) <= set(board["train_ids"])
    assert set(hera_ids) <= set(board["preview_inputs"])  # the buttons send the panel's values
    assert board["initially_visible"] is False and board["panel_before_buttons"]
    assert board["visible"] == {label: label == HERA_LABEL for label in board["stages"]}
    labels = board["labels"]
    assert labels["en"]["train.hera_tab"]["label"] == "HeRA configurations"
    assert labels["zh"]["train.hera_tab"]["label"] == "HeRA 参数设置"
    assert labels["en"]["train.hera_heads"]["label"] == "Heads to align"
    assert labels["zh"]["train.hera_heads"]["label"] == "对齐的注意力头"
    plan = ["train.hera_plan_btn", "train.hera_plan_box"]
    assert all(set(labels[lang]) == set(hera_ids + ["train.hera_tab"] + plan) for lang in labels)


def test_hera_stage_adds_the_hera_keys(board: dict[str, Any]) -> None:
    run = board["runs"][HERA_LABEL]
    assert run["error"] == ""
    args = run["args"]
    assert args["stage"] == "hera"
    assert {k: v for k, v in args.items() if k.startswith("hera_")} == {
        "hera_heads": "L1H0,L1H2", "hera_teacher": "/models/teacher", "hera_k": 3, "hera_lambda": 0.01,
        "hera_temperature": 0.07, "hera_pooling": "assistant", "hera_similarity": "cosine",
        "hera_teacher_feature": "cls", "hera_learn_temperature": False}
    assert "--stage hera" in run["preview"] and "--hera_heads L1H0,L1H2" in run["preview"]
    assert "--hera_learn_temperature False" in run["preview"]
    assert run["config"]["train.hera_heads"] == "[L1H0, L1H2]" and run["config"]["train.hera_k"] == 3
    assert board["bad_heads_error"].startswith("Invalid HeRA setting: hera_heads:")
    assert board["loaded"]["train.hera_heads"] == "L0H3" and board["loaded"]["train.hera_k"] == 4  # Load arguments


class _BrowserText(HTMLParser):
    """The text a browser shows for HTML set as ``innerHTML`` (LlamaBoard's toast; its Markdown box alike)."""

    def __init__(self, markup: str) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.feed(markup)
        self.close()

    def handle_data(self, data: str) -> None:
        self.parts.append(data)


def shown(markup: str) -> str:
    return "".join(_BrowserText(markup).parts)


def test_the_preview_checks_the_heads_against_the_models_config(board: dict[str, Any], assets: Any) -> None:
    """Heads outside the model's layers or heads are refused by the preview (and Start) with the run's own line, where
    the model's config can be read locally, as RAH-LoRA's layers are (unchecked, ``L99H0`` failed only after
    Start, in the run's log)."""
    model = assets.models["qwen3_vl"]
    text = json.loads((model / "config.json").read_text(encoding="utf-8"))["text_config"]
    layers, heads = text["num_hidden_layers"], text["num_attention_heads"]
    for given in ("L99H0", "L0H99"):
        want = (f"Invalid HeRA setting: hera_heads: {given} is outside {model}, which has layers L0..L{layers - 1} "
                f"and heads H0..H{heads - 1} per layer (zero-based). Fix or remove {given}.")
        shown_now = board["heads_vs_model"][given]
        assert shown(shown_now["error"]) == want and shown(shown_now["preview"]) == want, shown_now
    fits = board["heads_vs_model"]["L1H0, L1H2"]
    assert fits["error"] == "" and "--hera_heads L1H0,L1H2" in fits["preview"], fits
    assert board["heads_vs_model"]["auto"]["error"] == ""
    assert board["heads_elsewhere"] == ""  # a model whose config is not on this machine: the run checks it


def test_the_panel_plans_the_run_before_start(board: dict[str, Any]) -> None:
    """The plan button shows llamafactory-hera plan's report for the settings Start would run."""
    plan = board["plan"]
    assert board["preview_sends_not_plan"] == ["train.swanlab_link"]  # every setting; not the run's link
    assert plan.startswith("plan: LlamaBoard on 1 x ") and "stage hera, LoRA" in plan and "cutoff_len 256" in plan
    assert "lengths: from 32 sampled rows of hera_demo (seed 0; 32 rows to train on)" in plan
    assert "memory per GPU (GiB)" in plan and "\n  fits: " in plan and "HeRA's extra over SFT" in plan
    assert "head selection" not in plan  # the panel's heads (text) are planned, not auto
    assert board["plan_without_model"].startswith("model_name_or_path: no config.json of /models/tiny at hand")


def test_bad_values_show_the_key_and_the_head_format(board: dict[str, Any]) -> None:
    assert "write heads as L<layer>H<head>" in shown(board["bad_heads_error"])  # was "write heads as LH"
    assert set(board["bad_values"]) == {"hera_k=0", "hera_k=1.5", "hera_k=None", "hera_temperature=0",
                                        "hera_lambda=-1", "hera_select_num_heads=0"}
    for case, message in board["bad_values"].items():
        key, value = case.split("=")
        text = shown(message)
        # was "gradio: Value 0 is less than minimum value 1." (no field), or 1.5 silently rounded to 2
        assert text.startswith(f"Invalid HeRA setting: {key}"), (case, text)
        assert value in text or value == "None", (case, text)


def test_stock_stages_are_untouched(board: dict[str, Any], stock: dict[str, Any]) -> None:
    assert HERA_LABEL not in stock["stages"]
    for label in (SFT_LABEL, "DPO"):
        ours, theirs = board["runs"][label], stock["runs"][label]
        assert not any(k.startswith("hera_") for k in ours["args"])
        assert ours == theirs, label  # args, saved config, preview and checks identical to LLaMA-Factory alone


def test_loss_plot_shows_hera_loss_beside_the_loss(board: dict[str, Any], stock: dict[str, Any]) -> None:
    assert [label for label in board["plot_lines_hera"] if not label.startswith("_")] == ["hera_loss", "loss"]
    assert board["plot_lines_stock"] == stock["plot_lines_stock"] == ["original", "smoothed"]
    legend = board["legend_hera"]  # outside the axes: no curve under it (the stock plot's legend is LlamaBoard's)
    assert legend["legends"] == 1 and legend["points"] == 4 * 5, legend
    assert legend["covered_points"] == 0 and not legend["over_axes"] and legend["inside_figure"], legend
    assert board["legend_stock"] == stock["legend_stock"]


def test_the_patch_is_all_or_nothing_on_an_unknown_host_shape() -> None:
    from types import ModuleType

    from llamafactory_hera_patches.guard import HostMismatchError
    from llamafactory_hera_patches.webui import board as webui_board

    fake = ModuleType("llamafactory.webui.interface")
    fake.create_ui = lambda: None  # create_train_tab is missing
    with pytest.raises(HostMismatchError) as info:
        webui_board.apply(fake)
    assert "LLaMA-Factory 0.9.5" in str(info.value) and "create_train_tab" in str(info.value)
    assert not hasattr(fake, "_llamafactory_hera_patched")
