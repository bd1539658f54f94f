"""What ``llamafactory-hera eval`` reads back from a run folder: every run of a method records its
loading keys and how it ended (``llamafactory_hera_run.json``, its ``stage: sft`` twin included); a run and its
baseline that load differently are refused, naming the key; a recorded ``seed: 0`` is 0; a failed run is refused.

Cost: two tiny in-process runs through ``run_exp`` (one SFT twin step; one HeRA run stopped where the SFT workflow
would start), the rest reads hand-written records."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from test_eval_cli import error_in_process, train

from conftest import base_recipe
from llamafactory_hera.evaluation.runs import read_pair, read_run
from llamafactory_hera.runtime.errors import RecipeError
from llamafactory_hera.runtime.run_record import RUN_RECORD

QWEN_RECIPE_PIXELS = 262144  # image_max_pixels of the Qwen recipes (recipes/*.yaml)


def _hera_folder(folder: Path, **host: Any) -> Path:
    """A HeRA run as hera_run.json records it (a LoRA adapter beside), no weights needed: nothing is loaded."""
    folder.mkdir(parents=True, exist_ok=True)
    host = {"model_name_or_path": "Qwen/Qwen2.5-VL-7B-Instruct", "template": "qwen2_vl", **host}
    (folder / "hera_run.json").write_text(json.dumps({"stage": "hera", "host": host}), encoding="utf-8")
    (folder / "adapter_config.json").write_text("{}", encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def sft_twin(assets, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One step of a HeRA recipe's ``stage: sft`` twin (its hera_* keys ignored) of the tiny Qwen2.5-VL, at
    LLaMA-Factory's default pixels."""
    tmp = tmp_path_factory.mktemp("sft_twin")
    recipe = {k: v for k, v in base_recipe(assets, "qwen2_5_vl", tmp / "twin", max_steps=1).items()
              if k != "image_max_pixels"}
    train({**recipe, "stage": "sft"})
    return tmp / "twin"


def test_an_sft_twin_records_how_it_loads(sft_twin: Path) -> None:
    record = json.loads((sft_twin / RUN_RECORD).read_text(encoding="utf-8"))
    assert record["stage"] == "sft" and record["status"] == "finished"
    loading = record["loading"]
    assert loading["template"] == "qwen2_vl" and loading["image_max_pixels"] == 768 * 768  # the host's default
    assert {"image_min_pixels", "video_max_pixels", "cutoff_len", "seed"} <= set(loading)
    twin = read_run(sft_twin, "baseline", trained=True)  # no --template needed any more
    assert twin.recipe["template"] == "qwen2_vl" and twin.recipe["image_max_pixels"] == 768 * 768


def test_a_baseline_that_loads_differently_is_refused(sft_twin: Path, tmp_path: Path) -> None:
    """The HeRA run at its recipe's 262144 pixels, the twin at the default 589824 (2.25x the image
    tokens): every vision delta would be confounded. Refused, naming the key, both values and the fix."""
    run_dir = _hera_folder(tmp_path / "hera", model_name_or_path=str(read_run(sft_twin, "b", True)
                                                                        .recipe["model_name_or_path"]),
                           image_max_pixels=QWEN_RECIPE_PIXELS)
    with pytest.raises(ValueError, match=r"^--baseline: .*image_max_pixels: 589824 but .*image_max_pixels: 262144 "
                                         r".*re-train one with image_max_pixels: 262144"):
        read_pair(run_dir, sft_twin, base=False)


def test_a_key_only_one_side_recorded_is_taken_over_and_said(tmp_path: Path) -> None:
    run_dir = _hera_folder(tmp_path / "hera", image_max_pixels=QWEN_RECIPE_PIXELS, seed=0)
    twin = tmp_path / "legacy_twin"  # a plain sft LoRA run without any record (trained without the plugin)
    twin.mkdir()
    (twin / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "Qwen/Qwen2.5-VL-7B-Instruct"}),
                                              encoding="utf-8")
    run, other = read_pair(run_dir, twin, base=False)
    assert other.recipe["image_max_pixels"] == QWEN_RECIPE_PIXELS
    assert other.inherited == {"template": "qwen2_vl", "image_max_pixels": QWEN_RECIPE_PIXELS}
    assert run.inherited == {}


def test_a_template_other_than_the_recorded_one_is_refused_naming_both(tmp_path: Path, capfd) -> None:
    """``eval --template llava`` on a run that recorded qwen2_vl is refused (it would evaluate with qwen2_vl unsaid).
    The same value is no news; a run that recorded none takes it, for its base model (``--base``) too."""
    run_dir = _hera_folder(tmp_path / "hera")
    line = error_in_process(capfd, str(run_dir), "--tasks", "demo", "--template", "llava")
    assert line == (f"llamafactory-hera: error: --template llava: {run_dir} records template: qwen2_vl, the template "
                    "it was trained with and is evaluated with; --template only fills in a template a run did not "
                    "record. Leave --template out, or evaluate a run trained with template: llava")
    run, _ = read_pair(run_dir, None, base=False, template="qwen2_vl")
    assert run.recipe["template"] == "qwen2_vl" and run.inherited == {}
    legacy = tmp_path / "legacy"  # a plain sft LoRA run trained without the plugin: no template recorded
    legacy.mkdir()
    (legacy / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "Qwen/Qwen2-0.5B-Instruct"}),
                                                encoding="utf-8")
    run, base = read_pair(legacy, None, base=True, template="qwen")
    assert run.recipe["template"] == base.recipe["template"] == "qwen" and base.inherited == {"template": "qwen"}


def test_a_recorded_model_or_adapter_folder_that_is_gone_is_one_line_before_loading(assets, tmp_path: Path,
                                                                                   capfd) -> None:
    """Eval checks the paths it will load with the stages' check (recipe/model_paths.py). A base model
    folder moved since training failed each task at loading ("OSError: Failed to load tokenizer."), a recorded
    adapter that is gone only after the base model's weights loaded (PEFT's "Can't find 'adapter_config.json'"),
    and either wrote a report of failed tasks into RUN_DIR. Now one line naming the flag, the record, the key and the
    path, and nothing is written."""
    model = assets.models["qwen2_5_vl"]
    moved, gone_adapter = f"{model}_moved", str(tmp_path / "stage1_lora")
    run_dir = _hera_folder(tmp_path / "hera", model_name_or_path=moved)
    line = error_in_process(capfd, str(run_dir), "--tasks", "demo")
    assert line.startswith(f"llamafactory-hera: error: RUN_DIR: {run_dir / 'hera_run.json'}: model_name_or_path: "
                           f"{moved} is not a folder and not a Hugging Face model id (organisation/name); "
                           f"{model.parent} has qwen2_5_vl"), line
    assert line.endswith(". Restore that folder, or correct the path in hera_run.json."), line

    run_dir = _hera_folder(tmp_path / "hera", model_name_or_path=str(model), adapter_name_or_path=gone_adapter)
    line = error_in_process(capfd, str(run_dir), "--tasks", "demo")
    assert line == (f"llamafactory-hera: error: RUN_DIR: {run_dir / 'hera_run.json'}: adapter_name_or_path: "
                    f"{gone_adapter} is not a folder and not a Hugging Face model id (organisation/name). Restore "
                    "that folder, or correct the path in hera_run.json."), line
    assert sorted(path.name for path in run_dir.iterdir()) == ["adapter_config.json", "hera_run.json"]

    run_dir = _hera_folder(tmp_path / "hera", model_name_or_path=str(model))
    twin = tmp_path / "sft_twin"  # a plain sft LoRA run trained without the plugin: its base in adapter_config.json
    twin.mkdir()
    (twin / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": moved}), encoding="utf-8")
    line = error_in_process(capfd, str(run_dir), "--baseline", str(twin), "--tasks", "demo")
    assert line.startswith(f"llamafactory-hera: error: --baseline: {twin / 'adapter_config.json'}: "
                           f"model_name_or_path: {moved} is not a folder "), line
    assert line.endswith("correct the path in adapter_config.json."), line


@pytest.mark.parametrize("kind", ["run_record", "hera", "rah", "harc", "llamaboard"])
def test_a_recorded_seed_of_0_is_read_as_0(kind: str, tmp_path: Path) -> None:
    """Seed 0 is 0: ``int(seed or 42)`` read it as 42, so HARC's refusal check drew another held-out split than
    training did (the demo's harmful refusal 100 % at the end of training, 62.5 % in eval)."""
    host = {"model_name_or_path": "Qwen/Qwen2-0.5B-Instruct", "template": "qwen", "seed": 0}
    records = {"run_record": (RUN_RECORD, {"stage": "harc", "status": "finished", "loading": host}),
               "hera": ("hera_run.json", {"stage": "hera", "host": host}),
               "rah": ("rah_profile.json", {"identity": host}),
               "harc": ("harc_run.json", {"stage": "harc", "host": host, "settings": {"harc_margin": 0.0}}),
               "llamaboard": ("training_args.yaml", {**host, "stage": "harc", "harc_margin": 0.0})}
    name, record = records[kind]
    (tmp_path / name).write_text(json.dumps(record), encoding="utf-8")  # JSON is YAML too
    (tmp_path / "adapter_config.json").write_text("{}", encoding="utf-8")
    spec = read_run(tmp_path, "run", trained=True)
    assert spec.seed == 0
    if kind in ("harc", "llamaboard"):
        assert spec.harc == {"harc_margin": 0.0}


def test_without_a_recorded_seed_the_hosts_default_is_used(tmp_path: Path) -> None:
    _hera_folder(tmp_path)
    assert read_run(tmp_path, "run", trained=True).seed == 42


# --- runs that failed ---

class _Boom(RuntimeError):
    pass


def _fail_in_the_workflow(monkeypatch: pytest.MonkeyPatch) -> None:
    """LLaMA-Factory's SFT workflow raises where it would load the model (after the run's records are written)."""
    import llamafactory.train.sft.workflow as workflow
    import llamafactory.train.tuner as tuner

    def boom(*_: Any, **__: Any) -> None:
        raise _Boom("out of memory while loading (simulated)")

    monkeypatch.setattr(workflow, "run_sft", boom)
    monkeypatch.setattr(tuner, "run_sft", boom)


def test_a_failed_hera_run_is_marked_and_refused(assets, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A failed run is marked and refused: an unmarked ``hera_run.json`` looks as if a run had happened."""
    _fail_in_the_workflow(monkeypatch)
    with pytest.raises(_Boom):
        train(base_recipe(assets, "qwen2_5_vl", tmp_path / "hera", max_steps=1))
    (tmp_path / "hera" / "adapter_config.json").write_text("{}", encoding="utf-8")  # even with an adapter left over
    hera_record = json.loads((tmp_path / "hera" / "hera_run.json").read_text(encoding="utf-8"))
    assert hera_record["status"] == "failed" and "simulated" in hera_record["error"]
    record = json.loads((tmp_path / "hera" / RUN_RECORD).read_text(encoding="utf-8"))
    assert record["status"] == "failed" and record["error"].startswith("_Boom: out of memory")
    with pytest.raises(ValueError, match=r"^RUN_DIR: .*llamafactory_hera_run.json says status: failed: _Boom: .*"
                                         r"did not finish.*Re-run training"):
        read_run(tmp_path / "hera", "run", trained=True)


def test_a_failed_plain_run_and_a_killed_one_are_refused(assets, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    _fail_in_the_workflow(monkeypatch)
    recipe = base_recipe(assets, "qwen2_5_vl", tmp_path / "sft", max_steps=1)
    with pytest.raises(_Boom):
        train({**recipe, "stage": "sft"})
    assert json.loads((tmp_path / "sft" / RUN_RECORD).read_text(encoding="utf-8"))["status"] == "failed"
    _hera_folder(tmp_path / "killed")  # a run killed from outside (out of host memory): its record says running
    (tmp_path / "killed" / RUN_RECORD).write_text(json.dumps({"stage": "hera", "status": "running", "loading": {}}))
    with pytest.raises(ValueError, match=r"llamafactory_hera_run.json says status: running \(killed, or still "
                                         r"training\)"):
        read_pair(tmp_path / "killed", None, base=True)


def test_a_failed_runs_own_record_is_marked_but_an_older_runs_is_not(tmp_path: Path) -> None:
    """What the stage patch does when a run raises, for RAH-LoRA's record (a calibration that changed no weight
    writes rah_profile.json, then raises): the record this run wrote is marked failed; one an earlier run left in the
    folder, untouched by this run, is not rewritten."""
    import os

    from llamafactory_hera.methods import RAH as METHOD
    from llamafactory_hera.runtime.run_record import write_ended, write_started

    older = tmp_path / "older"
    older.mkdir()
    (older / "rah_profile.json").write_text(json.dumps({"identity": {}}), encoding="utf-8")
    os.utime(older / "rah_profile.json", ns=(1, 1))
    for folder, marked in ((tmp_path / "this", True), (older, False)):
        path = write_started(folder, "rah", {"seed": 0})
        if marked:
            (folder / "rah_profile.json").write_text(json.dumps({"identity": {}}), encoding="utf-8")
        write_ended(path, ValueError("RAH-LoRA changed no weight: 0 of 5 targets calibrated\nmore"), METHOD.records)
        profile = json.loads((folder / "rah_profile.json").read_text(encoding="utf-8"))
        assert (profile.get("status") == "failed") == marked, folder
        error = json.loads(path.read_text(encoding="utf-8"))["error"]
        assert error == "ValueError: RAH-LoRA changed no weight: 0 of 5 targets calibrated"


def test_a_save_signals_stop_is_recorded_stopped_and_any_other_exit_failed(tmp_path: Path) -> None:
    """The save signal's stop ends the run with SystemExit(0) after its whole checkpoint: ``stopped``, with no error
    and the method's own record untouched; an exit with another status stays ``failed``."""
    from llamafactory_hera.methods import HERA as METHOD
    from llamafactory_hera.runtime.run_record import write_ended, write_started

    for code, status in ((0, "stopped"), (None, "stopped"), (2, "failed")):
        folder = tmp_path / str(code)
        path = write_started(folder, "hera", {"seed": 0})
        (folder / "hera_run.json").write_text(json.dumps({"identity": {}}), encoding="utf-8")
        write_ended(path, SystemExit(code), METHOD.records)
        record = json.loads(path.read_text(encoding="utf-8"))
        assert record["status"] == status and ("error" in record) == (status == "failed"), record
        mine = json.loads((folder / "hera_run.json").read_text(encoding="utf-8"))
        assert (mine.get("status") == "failed") == (status == "failed"), mine
    with pytest.raises(RecipeError, match=r"says status: stopped \(stopped by its save signal: the same training "
                                          r"command continues it\); that run did not finish"):
        read_run(tmp_path / "0", "run", trained=True)  # eval: the same command resumes it; nothing to evaluate yet


def test_an_error_amid_the_final_save_leaves_the_run_unfinished(tmp_path: Path) -> None:
    """A run whose final save failed with its adapter half-written (a full disk, an error in the save) was recorded
    ``finished`` (a model saved, then an error): the same command was refused as a finished run and eval read a torn
    file. Only a whole safetensors file counts as saved."""
    from llamafactory_hera.runtime.run_record import write_ended, write_started

    for torn, status in ((True, "failed"), (False, "finished")):
        folder = tmp_path / str(torn)
        path = write_started(folder, "hera", {"seed": 0})
        save_file({"lora_A": torch.ones(64, 8), "lora_B": torch.zeros(8, 64)}, folder / "adapter_model.safetensors")
        if torn:
            whole = (folder / "adapter_model.safetensors").read_bytes()
            (folder / "adapter_model.safetensors").write_bytes(whole[: len(whole) - 100])
        write_ended(path, OSError(28, "No space left on device"))
        assert json.loads(path.read_text(encoding="utf-8"))["status"] == status, torn


def test_a_sharded_final_model_with_one_cut_shard_leaves_the_run_unfinished(tmp_path: Path) -> None:
    """A full run's model in two shards and an index: one shard cut by a full disk in the final save. Taken as whole,
    the run would be recorded finished, the same command refused and eval would read the cut shard; every shard the
    index names must be whole."""
    from llamafactory_hera.runtime.run_record import whole_model_file, write_ended, write_started

    for cut, status in (("model-00002-of-00002.safetensors", "failed"), ("", "finished")):
        folder = tmp_path / (cut or "whole")
        path = write_started(folder, "hera", {"seed": 0})
        shards = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")
        weight_map = {}
        for index, shard in enumerate(shards):
            save_file({f"layer{index}.weight": torch.ones(64, 8)}, folder / shard)
            weight_map[f"layer{index}.weight"] = shard
        (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
        if cut:
            whole = (folder / cut).read_bytes()
            (folder / cut).write_bytes(whole[: len(whole) - 100])
        assert whole_model_file(folder / "model.safetensors.index.json") == (not cut)
        write_ended(path, OSError(28, "No space left on device"))
        assert json.loads(path.read_text(encoding="utf-8"))["status"] == status, cut


# --- what an 8-GPU node showed ---

def test_a_run_that_failed_after_saving_its_model_is_evaluated(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A failing do_predict, reporting backend or an interrupt after save_model left a saved model that eval refused
    ('holds no model to evaluate'); it is now finished with the error kept, and eval says so."""
    from llamafactory_hera.runtime.run_record import write_ended, write_started

    host = {"model_name_or_path": "Qwen/Qwen2-0.5B-Instruct", "template": "qwen", "seed": 0}
    path = write_started(tmp_path, "sft", host)
    (tmp_path / "adapter_config.json").write_text("{}", encoding="utf-8")
    save_file({"lora_A": torch.ones(4, 2)}, tmp_path / "adapter_model.safetensors")
    write_ended(path, KeyboardInterrupt("at the end"))
    record = json.loads(path.read_text(encoding="utf-8"))
    assert record["status"] == "finished" and record["error_after_save"] == "KeyboardInterrupt: at the end"
    assert read_run(tmp_path, "run", trained=True).recipe["model_name_or_path"] == host["model_name_or_path"]
    assert "saved its model, then failed (KeyboardInterrupt: at the end)" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.tmp")), "the temporary file is replaced, not left"


def test_a_checkpoint_folder_loads_as_its_run_recorded(tmp_path: Path) -> None:
    """eval RUN/checkpoint-N: the checkpoint has no record of its own; it took the baseline's image_max_pixels."""
    host = {"model_name_or_path": "Qwen/Qwen2.5-VL-7B-Instruct", "template": "qwen2_vl",
            "image_max_pixels": QWEN_RECIPE_PIXELS, "seed": 0, "output_dir": str(tmp_path)}
    (tmp_path / RUN_RECORD).write_text(json.dumps({"stage": "hera", "status": "finished", "loading": host}))
    checkpoint = tmp_path / "checkpoint-5"
    checkpoint.mkdir()
    (checkpoint / "adapter_config.json").write_text("{}", encoding="utf-8")
    spec = read_run(checkpoint, "run", trained=True)
    assert spec.recipe["image_max_pixels"] == QWEN_RECIPE_PIXELS and spec.stage == "hera"
    assert spec.recipe["adapter_name_or_path"] == str(checkpoint)


def test_a_run_that_names_itself_as_adapter_loads_it_once(tmp_path: Path) -> None:
    """A record whose adapter_name_or_path is the run itself (a do_predict into the training folder, recorded before
    that rule) applied the LoRA twice."""
    host = {"model_name_or_path": "Qwen/Qwen2-0.5B-Instruct", "template": "qwen",
            "adapter_name_or_path": [str(tmp_path)]}
    (tmp_path / RUN_RECORD).write_text(json.dumps({"stage": "sft", "status": "finished", "loading": host}))
    (tmp_path / "adapter_config.json").write_text("{}", encoding="utf-8")
    assert read_run(tmp_path, "run", trained=True).recipe["adapter_name_or_path"] == str(tmp_path)


def test_token_lists_compare_alike_in_both_record_forms(tmp_path: Path) -> None:
    """A run record keeps add_tokens as a list, LlamaBoard's training_args.yaml as 'a,b': not a difference."""
    host = {"model_name_or_path": "Qwen/Qwen2-0.5B-Instruct", "template": "qwen"}
    run_dir, twin = tmp_path / "run", tmp_path / "twin"
    for folder in (run_dir, twin):
        folder.mkdir()
        (folder / "adapter_config.json").write_text("{}", encoding="utf-8")
    (run_dir / RUN_RECORD).write_text(json.dumps({"stage": "sft", "status": "finished",
                                                  "loading": {**host, "add_tokens": ["<a>", "<b>"]}}))
    (twin / "training_args.yaml").write_text(json.dumps({**host, "stage": "sft", "add_tokens": "<a>,<b>"}))
    read_pair(run_dir, twin, base=False)


def test_a_run_that_does_not_train_writes_no_record(assets, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """do_predict into a training folder replaced the training run's record (and named the run as its adapter)."""
    _fail_in_the_workflow(monkeypatch)
    recipe = {k: v for k, v in base_recipe(assets, "qwen2_5_vl", tmp_path / "sft", max_steps=1).items()
              if not k.startswith("hera_")}
    with pytest.raises(_Boom):
        train({**recipe, "stage": "sft", "do_train": False, "do_eval": True, "eval_dataset": recipe["dataset"]})
    assert not (tmp_path / "sft" / RUN_RECORD).exists()
