"""The plugin acts in LLaMA-Factory's processes only: a program that never imports LLaMA-Factory (``import
accelerate``, ``accelerate launch`` of a user's script, even one next to a folder named ``llamafactory/``) gets no
patch, no transformers version check and no plugin module in ``sys.modules``; ``accelerate launch`` is checked when
what it runs is LLaMA-Factory's training (decided by the script or module it runs). ``USE_V1=1`` (LLaMA-Factory's
v1 trainers) with a plugin stage, and ``accelerate launch llamafactory-cli`` (no file python can run), are one line;
``USE_V1=1`` with a stock recipe trains as without the plugin, v0's version checks not run.

An unsupported transformers without another venv: a folder first on ``PYTHONPATH`` holding only
``transformers-4.40.0.dist-info/METADATA``. The plugin's check reads the version with ``importlib.metadata.version``
(patches' stacks.py ``installed``), which takes the first distribution of that name on ``sys.path``: what it reads is
what an installed transformers 4.40 gives it (the code imported stays the supported release, which the programs here
do not look at), so a check that still runs there exits 1, as it did before.
"""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest
from test_accelerate_refusals import ACCELERATE, output_lines

from conftest import free_port, offline_env, run_process
from llamafactory_hera import _bootstrap
from llamafactory_hera.runtime.errors import RecipeError
from llamafactory_hera_patches import v1 as v1_patch

ALL_REDUCE = """import json, sys
import torch
import torch.distributed as dist

dist.init_process_group("gloo")
total = torch.ones(1) * (dist.get_rank() + 1)
dist.all_reduce(total)
plugin = sorted(name for name in sys.modules if name.startswith("llamafactory_hera"))
print(json.dumps({"sum": total.item(), "plugin": plugin}))
dist.destroy_process_group()
"""
PROBE = """import json, sys
sys.argv = ["accelerate", "launch", "train.py", "config.yaml"]
import accelerate, transformers, accelerate.commands.launch as launch, accelerate.utils.fsdp_utils as fsdp_utils
{then}
print(json.dumps({{"plugin": sorted(name for name in sys.modules if name.startswith("llamafactory_hera")),
                  "fsdp_patched": hasattr(fsdp_utils.fsdp2_prepare_model, "__wrapped__"),
                  "launch_patched": hasattr(launch, "_llamafactory_hera_patched")}}))
"""


def _user_project(tmp: Path, unsupported: bool) -> dict[str, str]:
    """A user's train.py (all_reduce) next to a folder named llamafactory/, with its own config.yaml (comments only:
    a LLaMA-Factory recipe check refused it as empty); the environment (transformers 4.40 when ``unsupported``)."""
    (tmp / "llamafactory").mkdir()
    (tmp / "train.py").write_text(ALL_REDUCE, encoding="utf-8")
    (tmp / "config.yaml").write_text("# my settings\n", encoding="utf-8")
    fake = tmp / "fake" / "transformers-4.40.0.dist-info"
    fake.mkdir(parents=True)
    (fake / "METADATA").write_text("Metadata-Version: 2.1\nName: transformers\nVersion: 4.40.0\n", encoding="utf-8")
    return offline_env(tmp, PYTHONPATH=str(tmp / "fake") if unsupported else "")


@pytest.mark.parametrize(("unsupported", "llamafactory"), [(True, False), (False, False), (False, True)])
def test_import_accelerate_is_left_alone_until_llamafactory_is_imported(unsupported: bool, llamafactory: bool,
                                                                         tmp_path: Path) -> None:
    """``import accelerate, transformers`` and accelerate's launch module (a user's launch): rc 0, nothing patched, no
    plugin module; importing LLaMA-Factory afterwards patches accelerate's FSDP utilities then, not the launch."""
    env = _user_project(tmp_path, unsupported)
    then = "import llamafactory.extras.constants" if llamafactory else ""
    proc = subprocess.run([sys.executable, "-c", PROBE.format(then=then)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert seen["fsdp_patched"] is llamafactory and not seen["launch_patched"], seen
    assert (seen["plugin"] != []) is llamafactory, seen


def test_accelerate_launch_of_a_plain_script_with_an_unsupported_transformers(tmp_path: Path) -> None:
    """Two CPU ranks (gloo) of a user's all_reduce script next to llamafactory/, on transformers 4.40: rc 0 (before: rc
    1 with the plugin's version line), each rank without a plugin module; its config.yaml is not read as a recipe."""
    env = _user_project(tmp_path, unsupported=True)
    proc = run_process([ACCELERATE, "launch", "--multi_gpu", "--num_processes", "2", "--main_process_port",
                        str(free_port()), "train.py", "config.yaml"], cwd=tmp_path, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # the two ranks print at once: their lines may run together
    ranks = [json.loads(found) for found in re.findall(r"\{[^{}]*\}", proc.stdout)]
    assert ranks == [{"sum": 3.0, "plugin": []}] * 2, proc.stdout


def test_llamafactory_training_is_recognised_by_what_the_launch_runs(tmp_path: Path) -> None:
    import llamafactory.launcher

    clone = tmp_path / "src"
    (clone / "llamafactory").mkdir(parents=True)
    (clone / "train.py").write_text("from llamafactory.train.tuner import run_exp\n\n\ndef main():\n    run_exp()\n")
    (tmp_path / "mine.py").write_text("import llamafactory.extras.misc\nprint('mine')\n")  # imports it, trains not
    runs = _bootstrap.runs_llamafactory
    assert runs(["accelerate", "launch", "-m", "llamafactory.launcher", "r.yaml"])
    assert runs(["accelerate", "launch", "--num_processes", "2", llamafactory.launcher.__file__, "r.yaml"])
    assert runs(["accelerate", "launch", str(clone / "train.py"), "r.yaml"])  # a clone's src/train.py
    assert runs(["accelerate", "launch", "llamafactory-cli", "train", "r.yaml"]) and runs(["x", "/bin/lmf", "train"])
    assert not runs(["accelerate", "launch", str(tmp_path / "mine.py"), llamafactory.launcher.__file__])
    (clone / "train.py").write_text(ALL_REDUCE)  # a user's train.py next to a folder named llamafactory/
    assert not runs(["accelerate", "launch", str(clone / "train.py"), "config.yaml"])
    assert not runs(["accelerate", "env"]) and not runs(["accelerate", "launch", "missing.py"])


def test_accelerate_launch_of_a_bare_llamafactory_cli_is_one_line(tmp_path: Path) -> None:
    """Each rank used to print "can't open file .../llamafactory-cli", then accelerate's traceback (19 lines on one
    CPU process, 48 on two): now one line naming the forms that run, and no rank starts."""
    (tmp_path / "recipe.yaml").write_text("stage: sft\n", encoding="utf-8")
    proc = run_process([ACCELERATE, "launch", "--cpu", "--num_processes", "1", "--num_machines", "1",
                        "--mixed_precision", "no", "--dynamo_backend", "no", "--num_cpu_threads_per_process", "1",
                        "llamafactory-cli", "train", "recipe.yaml"], cwd=tmp_path, timeout=300,
                       env=offline_env(tmp_path, HERA_TEST_RANK_MARKER=str(tmp_path / "ranks")))
    lines = output_lines(proc)
    assert proc.returncode == 1 and len(lines) <= 2 and "Traceback" not in proc.stderr, "\n".join(lines)
    assert lines[-1] == ("[llamafactory-hera] error: accelerate launch ... llamafactory-cli train: accelerate runs "
                         f"its training script with python and there is no file llamafactory-cli in {tmp_path}; launch "
                         "`-m llamafactory.launcher RECIPE.yaml` instead, or run `llamafactory-cli train RECIPE.yaml` "
                         "without accelerate launch."), "\n".join(lines)
    assert not (tmp_path / "ranks").exists()


@pytest.mark.parametrize("extra_keys", [False, True])
def test_a_plugin_stage_on_llamafactory_v1_is_one_line(extra_keys: bool, tmp_path: Path) -> None:
    """``USE_V1=1 llamafactory-cli train`` with ``stage: hera``: v1's parser traceback (17 lines), or with
    ``ALLOW_EXTRA_KEYS=1`` v1 going on without HeRA; now one line before v1 reads the recipe."""
    (tmp_path / "recipe.yaml").write_text("stage: hera\nmodel_name_or_path: nowhere\n", encoding="utf-8")
    env = offline_env(tmp_path, USE_V1="1", **({"ALLOW_EXTRA_KEYS": "1"} if extra_keys else {}))
    proc = run_process([str(Path(sys.executable).with_name("llamafactory-cli")), "train", "recipe.yaml"],
                       cwd=tmp_path, env=env, timeout=300)
    lines = output_lines(proc)
    assert proc.returncode == 1 and len(lines) <= 2 and "Traceback" not in proc.stderr, "\n".join(lines)
    assert lines[-1] == ("[llamafactory-hera] error: stage: hera with USE_V1=1: LLaMA-Factory's v1 trainers do not run "
                         "the plugin's stages; unset USE_V1 to train with v0's trainer (llamafactory-cli train "
                         "RECIPE.yaml)."), "\n".join(lines)


def test_a_stock_recipe_on_llamafactory_v1_is_read_without_v0s_version_checks(tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """``USE_V1=1`` with a stock stage: the launcher patch read the stage through v0's ``llamafactory.hparams``, whose
    import runs v0's ``check_dependencies()`` (trl <= 0.24, ...), which v1 does not: a trl outside v0's range ended in
    a 35-line ImportError where v1 trains without the plugin. With v0's hparams unimportable here, the stock recipe
    goes on to v1 and a plugin stage (a key=value override included) is still one line."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("stage: sft\nmodel_name_or_path: nowhere\n", encoding="utf-8")
    launched: list[list[str]] = []
    v1 = types.ModuleType("llamafactory.v1.launcher")
    v1.launch, v1._DIST_TRAIN_COMMANDS = lambda: launched.append(sys.argv[1:]), ("train", "sft", "dpo", "rm")
    v1_patch.apply(v1)
    monkeypatch.setitem(sys.modules, "llamafactory.hparams", None)  # importing it raises ImportError
    monkeypatch.setattr(sys, "argv", ["llamafactory-cli", "train", str(recipe)])
    v1.launch()
    assert launched == [["train", str(recipe)]]
    monkeypatch.setattr(sys, "argv", ["llamafactory-cli", "train", str(recipe), "stage=hera"])
    with pytest.raises(RecipeError, match="^stage: hera with USE_V1=1: "):
        v1.launch()


def test_a_stock_v1_run_with_a_trl_outside_v0s_range_trains_as_without_the_plugin(harc_assets, tmp_path: Path) -> None:
    """``USE_V1=1 llamafactory-cli sft`` of a stock recipe, with version checks on and trl 0.99 (v0 allows <= 0.24) as
    what the checks read (a ``trl`` dist-info first on ``PYTHONPATH``, as :func:`_user_project` fakes transformers):
    with the plugin live it trains exactly as with it off, through v1's trainer (its log lines, the same losses and
    files). Live, the launcher patch read the recipe through v0's ``llamafactory.hparams``, whose import runs v0's
    ``check_dependencies()``: a 35-line ImportError. Real processes: the start-up hook reads
    ``LLAMAFACTORY_HERA_DISABLE`` at start-up, and what is tested is what a user's process imports."""
    (tmp_path / "sft.json").write_text(json.dumps([{"instruction": f"Say {word}.", "output": word} for word in (
        "red", "blue", "green", "hello")]), encoding="utf-8")
    (tmp_path / "data.yaml").write_text(json.dumps({"default": {"path": str(tmp_path / "sft.json"), "source": "local",
                                                                "converter": "alpaca"}}), encoding="utf-8")
    fake = tmp_path / "fake" / "trl-0.99.0.dist-info"
    fake.mkdir(parents=True)
    (fake / "METADATA").write_text("Metadata-Version: 2.1\nName: trl\nVersion: 0.99.0\n", encoding="utf-8")
    # v1's own keys: main renamed the template key (custom_chat_template, a Jinja template; the tokenizer's otherwise)
    from llamafactory.v1.config import ModelArguments

    v1_keys = {field.name for field in dataclasses.fields(ModelArguments)}
    template = {"template": "qwen3_nothink"} if "template" in v1_keys else {}
    runs = {}
    for arm in ("live", "off"):
        recipe = {"model": str(harc_assets.models["qwen2"]), **template, "train_dataset": str(tmp_path / "data.yaml"),
                  "output_dir": str(tmp_path / arm / "out"), "micro_batch_size": 2, "max_steps": 2, "cutoff_len": 64,
                  "batching_workers": 0}
        (tmp_path / arm).mkdir()
        (tmp_path / arm / "recipe.yaml").write_text(json.dumps(recipe), encoding="utf-8")
        env = offline_env(tmp_path / arm, USE_V1="1", PYTHONPATH=str(tmp_path / "fake"),
                          **({"LLAMAFACTORY_HERA_DISABLE": "1"} if arm == "off" else {}))
        del env["DISABLE_VERSION_CHECK"]
        proc = run_process([str(Path(sys.executable).with_name("llamafactory-cli")), "sft", "recipe.yaml"],
                           cwd=tmp_path / arm, env=env, timeout=300)
        printed = proc.stdout + proc.stderr
        assert proc.returncode == 0, printed[-5000:]
        runs[arm] = {"steps": re.findall(r"llamafactory\.v1\.utils\.callbacks\.logging_callback:\d+ >> (.*)", printed),
                     "files": sorted(p.name for p in (tmp_path / arm / "out").iterdir()), "printed": printed}
    assert runs["live"]["steps"] == runs["off"]["steps"] and len(runs["off"]["steps"]) == 2, runs["off"]["steps"]
    assert runs["live"]["files"] == runs["off"]["files"] and "model.safetensors" in runs["off"]["files"]
    for run in runs.values():
        assert "llamafactory.v1.core.base_trainer" in run["printed"] and "Traceback" not in run["printed"]
    assert "llamafactory-hera" not in runs["live"]["printed"], runs["live"]["printed"][-3000:]
