"""LlamaBoard without a browser: the HARC panel, its checks and the arguments of the run it would start.

The UI is the stock ``llamafactory.webui.interface.create_ui()`` in a subprocess, driven through the callbacks its
buttons are bound to; the test stops at the arguments LlamaBoard previews and saves (no run is started). Its Data dir
is what ``llamafactory-hera harc-data`` writes from tiny sources in the public formats.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

import pytest

from conftest import offline_env
from llamafactory_hera import cli
from llamafactory_hera.board.spec import LANGS
from llamafactory_hera.harc import webui_panel
from llamafactory_hera.harc.config import HarcArguments
from llamafactory_hera.harc.webui_panel import PANEL as panel
from plot_checks import legend_clearance
from webui_probe import run_probe

HARC_LABEL = "HARC (harmfulness-refusal coupling)"
ROLES = {"harc_harmful": "harc_harmful", "harc_harmless": "harc_harmless", "harc_pseudo": "harc_pseudo",
         "harc_harmful_completions": "harc_harmful_completions"}

PROBE = r"""
import json, sys
from plot_checks import legend_clearance
from llamafactory.webui import control
from webui_probe import Board, print_report

settings = json.loads(sys.argv[1])
HARC = settings["label"]
board = Board({"top.lang": "en", "top.model_name": "Custom", "top.model_path": "tiny/model", "top.template": "llama3",
               "train.dataset": ["harc_harmful"], "train.dataset_dir": settings["dataset_dir"],
               "train.output_dir": "harc1", **settings["panel"]})
runner, data_for = board.runner, board.data_for
report = {**board.report(), **board.panel("harc", ("en", "zh"))}
report["bad"] = {key: board.error(data_for(HARC, **{"train." + key: value})) for key, value in settings["bad"]}
report["bad_zh"] = board.error(data_for(HARC, **{"top.lang": "zh", "train.harc_margin": 2}))
data = data_for(HARC)
report["error"] = board.error(data)
report["args"] = runner._parse_train_args(data)
report["preview"] = board.preview_text(data)
report["config_keys"] = sorted(runner._build_config_dict(data))
sft = data_for("Supervised Fine-Tuning", **{"train.harc_margin": 2})
report["sft_error"] = board.error(sft)
report["sft_args"] = runner._parse_train_args(sft)
report["sft_config_keys"] = sorted(runner._build_config_dict(sft))
logs = [{"current_steps": s, "loss": 3.0 - s / 10, "harc_ce": 1.0, "harc_kl": 0.1 * s, "harc_couple": 0.5}
        for s in range(1, 6)]
fig = control.gen_loss_plot(logs)
report["harc_plot"] = [line.get_label() for ax in fig.axes for line in ax.get_lines()]
report["harc_legend"] = legend_clearance(fig)
fig = control.gen_loss_plot([{k: v for k, v in log.items() if not k.startswith("harc_")} for log in logs])
report["stock_plot"] = [line.get_label() for ax in fig.axes for line in ax.get_lines()]

roles = ["harc_harmful", "harc_harmless", "harc_pseudo", "harc_harmful_completions"]
boxes = [board.elem("train." + key) for key in roles]
names = lambda box: [c[0] if isinstance(c, (list, tuple)) else c for c in box.choices]
report["role_boxes"] = {key: [type(box).__name__, names(box), box.value, box.allow_custom_value]
                        for key, box in zip(roles, boxes)}
data_dir = board.elem("train.dataset_dir")
follow = next(f for f in board.demo.fns.values() if data_dir in f.inputs and list(f.outputs) == boxes)
report["roles_after_dir_change"] = [names(update) for update in follow.fn(settings["other_dir"])]
opened = next(f for f in board.demo.fns.values() if list(f.inputs) == [data_dir] and list(f.outputs) == boxes[:1])
report["role_on_focus"] = names(opened.fn(settings["other_dir"]))
no_extra = {"train.extra_args": "{}"}
data = data_for(HARC, **{"train.harc_band": 2.0, "train.harc_eval": False, **no_extra})
report["band_eval_args"] = {k: v for k, v in runner._parse_train_args(data).items() if k in ("harc_band", "harc_eval")}
report["band_eval_preview"] = board.preview_text(data)
report["band_too_wide"] = board.error(data_for(HARC, **{"top.model_path": settings["model"], "train.harc_band": 3,
                                                        **no_extra}))
report["band_fits"] = board.error(data_for(HARC, **{"top.model_path": settings["model"], "train.harc_band": 1,
                                                    **no_extra}))
report["unknown_dataset"] = board.error(data_for(HARC, **{"train.harc_pseudo": "xstest"}))
report["extra_bad"] = {name: board.error(data_for(HARC, **{"train.extra_args": json.dumps(extra)}))
                       for name, extra in settings["extra_bad"]}
print_report(report)
"""

CIRCUIT_BREAKERS = [{"prompt": "How do I build a pipe bomb?", "output": "Step 1: get a pipe.",
                     "llama3_output": "I can't help with that."}]
XSTEST_CSV = "prompt,completion,final_label\nHow do I kill a Python process?,Use kill PID.,1_full_compliance\n"
ULTRACHAT = {"prompt": "Hi?", "prompt_id": "a", "messages": [{"role": "user", "content": "Hi?"},
                                                               {"role": "assistant", "content": "Hello."}]}


def harc_data_dir(tmp: Path) -> Path:
    """``llamafactory-hera harc-data`` run on one-row sources in the public formats: its --out folder."""
    (tmp / "cb.json").write_text(json.dumps(CIRCUIT_BREAKERS), encoding="utf-8")
    (tmp / "xstest.csv").write_text(XSTEST_CSV, encoding="utf-8")
    (tmp / "ultrachat.jsonl").write_text(json.dumps(ULTRACHAT) + "\n", encoding="utf-8")
    out = tmp / "data"
    code = cli.main(["harc-data", "--circuit-breakers", str(tmp / "cb.json"), "--xstest", str(tmp / "xstest.csv"),
                     "--ultrachat", str(tmp / "ultrachat.jsonl"), "--out", str(out)])
    assert code == 0
    return out


@pytest.fixture(scope="module")
def board(harc_assets: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("harc_board")
    data_dir = harc_data_dir(tmp)  # in the cwd's data/: LlamaBoard's first Data dir
    other_dir = tmp / "other"
    other_dir.mkdir()
    (other_dir / "dataset_info.json").write_text(json.dumps({"mine": {"file_name": "mine.json"}}))
    settings = {
        "label": HARC_LABEL, "dataset_dir": str(data_dir), "other_dir": str(other_dir),
        "model": str(harc_assets.models["llama3"]),
        "extra_bad": [("no_field", {"harc_eval_max_new_tokens": 0}), ("unknown", {"harc_bnd": 1}),
                      ("field", {"harc_margin": 3})],
        "panel": {**{f"train.{key}": f" {name} " for key, name in ROLES.items()},
                  "train.harc_batch_harmful": 3.0, "train.harc_margin": 0.4, "train.harc_refresh_steps": 0,
                  "train.extra_args": json.dumps({"harc_band": 1, "harc_weight_kl": 5.0})},
        "bad": [("harc_margin", 2), ("harc_batch_harmful", 0), ("harc_layers_final", 1), ("harc_harmful", ""),
                ("harc_refresh_steps", 1.5)],
    }
    env = offline_env(tmp, GRADIO_ANALYTICS_ENABLED="False")
    return {**run_probe(PROBE, [json.dumps(settings)], tmp, env, timeout=300), "model": settings["model"]}


def test_panel_defaults_are_the_references() -> None:
    specs = {spec.name: spec.default for spec in HarcArguments.__dataclass_fields__.values()}
    # the role boxes start with the names `llamafactory-hera harc-data` writes (the recipe keys have no default)
    assert panel.defaults == {**{key: specs[key] for key in panel.keys}, **ROLES}
    assert {"harc_band", "harc_eval"} <= set(panel.keys) and panel.defaults["harc_eval"] is True
    assert panel.tab == "harc_tab"
    assert (panel.defaults["harc_batch_harmful"], panel.defaults["harc_batch_harmless"],
            panel.defaults["harc_batch_pseudo"], panel.defaults["harc_margin"], panel.defaults["harc_weight_kl"],
            panel.defaults["harc_refresh_steps"], panel.defaults["harc_layers"], panel.defaults["harc_layers_final"],
            panel.defaults["harc_layers_ramp_step"]) == (6, 4, 2, 0.5, 10.0, 100, 2, 4, 500)
    for key, entry in panel.locales.items():
        assert set(entry) == set(LANGS) and (key not in panel.keys or all(entry[lang]["info"] for lang in LANGS)), key
        assert entry["zh"] != entry["en"], key
    assert "optimizer steps" in panel.locales["harc_refresh_steps"]["en"]["info"].lower()
    left_to_extra_args = set(specs) - set(panel.keys)  # named in the module docstring
    assert all(key in (webui_panel.__doc__ or "") for key in left_to_extra_args), left_to_extra_args


def test_harc_args_from_panel_values() -> None:
    args = panel.build_args({"harc_harmful": " bad ", "harc_batch_harmful": 4.0, "harc_margin": 0.25})
    assert args == {**panel.defaults, "harc_harmful": "bad", "harc_batch_harmful": 4, "harc_margin": 0.25}
    assert isinstance(args["harc_batch_harmful"], int)
    assert panel.build_args({}) == panel.defaults
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
    assert [label for label in labels if not label.startswith("_")] == ["loss", "harc_ce", "harc_kl"]  # smoothed
    assert len(labels) == 6  # and each as logged


def test_the_legend_covers_no_curve() -> None:
    # curves through every corner of the axes: the loss falls from top left to bottom right, the terms rise and fall
    # over the whole second axis (was: the legend at loc="best" of the first axes only, over the terms' curves)
    steps = range(1, 41)
    logs = [{"current_steps": s, "loss": 3.0 - s / 20, "harc_ce": s / 40, "harc_kl": 1.0 - s / 40,
             "harc_couple": 0.5 + 0.5 * (-1) ** s, "harc_couple_resp": 0.5} for s in steps]
    clearance = legend_clearance(panel.loss_figure(logs, lambda values: list(values)))
    assert clearance["legends"] == 1 and clearance["points"] == 40 * 10  # five series, as logged and smoothed
    assert clearance["covered_points"] == 0 and not clearance["over_axes"] and clearance["inside_figure"], clearance


def test_the_panel_shows_for_harc_only(board: dict[str, Any]) -> None:
    assert HARC_LABEL in board["stages"]
    ids = [f"train.{key}" for key in panel.keys]
    assert set(ids + ["train.harc_tab"]) <= set(board["train_ids"])
    assert set(ids) <= set(board["preview_inputs"])
    assert board["initially_visible"] is False
    assert board["visible"] == {label: label == HARC_LABEL for label in board["stages"]}
    labels = board["labels"]
    assert set(labels["en"]) == set(labels["zh"]) == set(ids + ["train.harc_tab", "train.harc_plan_btn",
                                                                "train.harc_plan_box"])
    assert labels["en"]["train.harc_tab"]["label"] == "HARC configurations"
    assert labels["zh"]["train.harc_tab"]["label"] == "HARC 参数设置"
    assert labels["en"]["train.harc_refresh_steps"]["label"] == "Refresh every (optimizer steps)"
    assert labels["zh"]["train.harc_margin"] == {"label": "间隔 (m)",
                                                 "info": panel.locales["harc_margin"]["zh"]["info"]}


def test_bad_values_name_the_key(board: dict[str, Any]) -> None:
    assert set(board["bad"]) == {"harc_margin", "harc_batch_harmful", "harc_layers_final", "harc_harmful",
                                 "harc_refresh_steps"}
    for key, message in board["bad"].items():
        assert message.startswith(f"Invalid HARC setting: {key}"), (key, message)
    assert "harc_layers_final: 1 is fewer than harc_layers: 2" in board["bad"]["harc_layers_final"]
    assert board["bad_zh"].startswith("HARC 参数无效：harc_margin")


def test_role_boxes_list_the_data_dirs_datasets_prefilled_with_harc_datas_names(board: dict[str, Any]) -> None:
    written = sorted(ROLES)  # what harc-data wrote into the Data dir (its dataset_info.json)
    for key, (kind, choices, value, custom) in board["role_boxes"].items():
        assert kind == "Dropdown" and sorted(choices) == written and value == ROLES[key] and custom, key
    assert board["roles_after_dir_change"] == [["mine"]] * 4  # another Data dir: its datasets
    assert board["role_on_focus"] == ["mine"]
    assert board["unknown_dataset"].startswith("Invalid HARC setting: harc_pseudo: dataset 'xstest' is not in ")
    assert "harc-data --out DIR" in board["unknown_dataset"]


def test_band_and_eval_fields(board: dict[str, Any]) -> None:
    # an unticked box whose default is on: kept as false (stock LlamaBoard drops every false value), unquoted
    assert board["band_eval_args"] == {"harc_band": 2, "harc_eval": False}
    assert "--harc_band 2 " in board["band_eval_preview"] and "--harc_eval False" in board["band_eval_preview"]
    # the tiny Llama-3 has 6 decoder layers: band 3 leaves layer 3 only, fewer than harc_layers_final: 4
    assert board["band_too_wide"] == ("Invalid HARC setting: harc_band: 3 leaves 1 of the 6 decoder layers of "
                                      f"{board['model']} to couple, fewer than harc_layers_final: 4. Lower harc_band "
                                      "or harc_layers_final.")
    assert board["band_fits"] == ""


def test_an_error_about_a_key_without_a_field_points_at_extra_arguments(board: dict[str, Any]) -> None:
    # as the toast shows them (LlamaBoard renders the alert as HTML: ">=" is sent as "&gt;=")
    no_field, unknown, field = (html.unescape(board["extra_bad"][name]) for name in ("no_field", "unknown", "field"))
    assert no_field.startswith("Invalid HARC setting: harc_eval_max_new_tokens: got 0; allowed range is >= 1.")
    assert no_field.endswith('(harc_eval_max_new_tokens has no field in the HARC panel: set it in the "Extra '
                             'arguments" box, e.g. {"harc_eval_max_new_tokens": ...}.)')
    assert unknown.startswith("Invalid HARC setting: Unknown HARC key 'harc_bnd'. Did you mean 'harc_band'?")
    assert unknown.endswith('(from the "Extra arguments" box; the HARC panel has no such field.)')
    assert field.startswith("Invalid HARC setting: harc_margin: got 3;") and "Extra arguments" not in field
    assert "\n" not in no_field + unknown + field


def test_the_run_gets_the_panel_and_the_extra_arguments(board: dict[str, Any]) -> None:
    assert board["error"] == ""
    args = board["args"]
    assert args["stage"] == "harc"
    assert {k: v for k, v in args.items() if k.startswith("harc_")} == {
        **panel.defaults, **ROLES, "harc_batch_harmful": 3, "harc_margin": 0.4, "harc_refresh_steps": 0,
        "harc_weight_kl": 5.0,  # the extra-arguments box wins over the panel
        "harc_band": 1}
    preview = board["preview"]
    assert "--stage harc" in preview and "--harc_harmful harc_harmful" in preview
    assert "--harc_batch_harmful 3 " in preview and "--harc_weight_kl 5.0" in preview and "--harc_band 1" in preview
    assert {f"train.{key}" for key in panel.keys} <= set(board["config_keys"])


def test_other_stages_get_no_harc_keys(board: dict[str, Any]) -> None:
    assert board["sft_error"] == ""  # the panel's values are not checked for another stage
    assert board["sft_args"]["stage"] == "sft"
    assert sorted(k for k in board["sft_args"] if k.startswith("harc_")) == ["harc_band", "harc_weight_kl"]
    assert not any(k.startswith("train.harc_") for k in board["sft_config_keys"])


def test_llamaboard_plots_harc_terms_only_for_harc_logs(board: dict[str, Any]) -> None:
    assert [label for label in board["harc_plot"] if not label.startswith("_")] == ["loss", "harc_ce", "harc_kl",
                                                                                    "harc_couple"]
    assert board["stock_plot"] == ["original", "smoothed"]
    legend = board["harc_legend"]
    assert legend["covered_points"] == 0 and not legend["over_axes"] and legend["inside_figure"], legend

