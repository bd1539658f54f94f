"""Each plugin stage under each backend switch LLaMA-Factory has (patches' backends.py and v1.py): refused by name,
before LLaMA-Factory parses the recipe (the ranks' stage patch) and before any rank starts (the launcher), where
LLaMA-Factory would otherwise train it with another workflow or model loader, or drop its keys (v1), without a word.
An environment switch counts where the installed LLaMA-Factory reads it (``USE_MEGATRON_BRIDGE``: main; on 0.9.5 it
does nothing, and the stage is not refused). None of the switches' packages (hyper_parallel, megatron-bridge,
mcore_adapter, KTransformers, Unsloth) installs on a CPU: stand-ins show that LLaMA-Factory's own branch is reached by
a stock ``stage: sft`` under the same switch. In this process, through ``run_exp`` and ``launcher.launch()``; no model
loads and no torchrun starts."""

from __future__ import annotations

import dataclasses
import runpy
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import pytest
import yaml
from test_launch_refusals import STAGES, _recipe, _refused

from conftest import harc_recipe
from llamafactory_hera.runtime.errors import RecipeError

KEYS = ("use_hyper_parallel", "use_kt", "use_unsloth")  # recipe keys, read by 0.9.5 and main
ENVIRONMENT = {"USE_MCA": "use_mca", "USE_MEGATRON_BRIDGE": "use_megatron_bridge"}  # -> the field it sets


def _reads(variable: str) -> bool:
    """Whether the installed LLaMA-Factory's FinetuningArguments has the field ``variable`` sets (main's
    ``use_megatron_bridge``; 0.9.5 has no such field)."""
    from llamafactory.hparams import FinetuningArguments

    return ENVIRONMENT[variable] in {field.name for field in dataclasses.fields(FinetuningArguments)}


def _stock(harc_assets: Any, output_dir: Path) -> dict[str, Any]:
    """A ``stage: sft`` recipe on the tiny Llama-3 (HARC's recipe without its keys)."""
    recipe = harc_recipe(harc_assets, "llama3", output_dir, stage="sft", dataset="harc_harmless_chat")
    return {key: value for key, value in recipe.items() if not key.startswith("harc_")}


def _said(stage: str, given: str) -> str:
    return f"stage: {stage} cannot run with {given} ("


@pytest.mark.parametrize("key", KEYS)
@pytest.mark.parametrize("stage", STAGES)
def test_a_recipe_switch_is_refused_by_name_before_the_parse(stage: str, key: str, assets: Any, harc_assets: Any,
                                                             tmp_path: Path, no_model_load: None) -> None:
    message = _refused(_recipe(stage, assets, harc_assets, tmp_path / "out", **{key: True}))
    assert message.startswith(_said(stage, f"{key}: true")), message
    assert message.endswith(f"To train it, remove {key} (docs/configurations.md says what each stage runs with); "
                            "for LLaMA-Factory's own SFT there, use stage: sft."), message


@pytest.mark.parametrize("variable", list(ENVIRONMENT))
@pytest.mark.parametrize("stage", STAGES)
def test_an_environment_switch_is_refused_where_llamafactory_reads_it(stage: str, variable: str, assets: Any,
                                                                      harc_assets: Any, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch,
                                                                      no_model_load: None) -> None:
    """In a rank (``run_exp``): refused before the parse, which on main asks to install megatron-bridge, where the
    installed LLaMA-Factory reads the variable; on 0.9.5 ``USE_MEGATRON_BRIDGE`` does nothing and the stage goes on
    to its own checks (here a misspelt key of the stage)."""
    monkeypatch.setenv(variable, "1")
    recipe = _recipe(stage, assets, harc_assets, tmp_path / "out", **{f"{stage}_nosuchkey": 1})
    message = _refused(recipe)
    if _reads(variable):
        assert message.startswith(_said(stage, f"{variable}=1")), message
        assert f"To train it, unset {variable} (" in message
    else:
        assert message.startswith("Unknown ") and f" key '{stage}_nosuchkey'. " in message, message


def _launch(path: Path, monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """``llamafactory-cli train path`` in this process: the torchrun commands it started (stand-in), or ``run_exp``
    called in the launcher (``["run_exp"]``)."""
    import llamafactory.launcher
    import llamafactory.train.tuner

    started: list[Any] = []
    monkeypatch.setattr(subprocess, "run", lambda args, **kwargs: started.append(args) or subprocess.CompletedProcess(
        args, 0))
    monkeypatch.setattr(llamafactory.train.tuner, "run_exp", lambda: started.append("run_exp"))
    monkeypatch.setattr(sys, "argv", ["llamafactory-cli", "train", str(path)])
    try:
        llamafactory.launcher.launch()
    except SystemExit as ended:
        assert ended.code == 0
    return started


def _fresh_hparams(monkeypatch: pytest.MonkeyPatch) -> None:
    """v0's ``llamafactory.hparams`` imported afresh by the next import (put back afterwards): under ``USE_MCA=1``
    without mcore_adapter that import fails, as in a new process."""
    import llamafactory

    monkeypatch.setattr(llamafactory, "hparams", getattr(llamafactory, "hparams", None), raising=False)
    for name in [name for name in sys.modules if name.split(".")[:2] == ["llamafactory", "hparams"]]:
        monkeypatch.delitem(sys.modules, name)


@pytest.mark.parametrize("switch", [*KEYS, *ENVIRONMENT])
@pytest.mark.parametrize("stage", STAGES)
def test_the_launcher_refuses_a_switch_before_any_rank_starts(stage: str, switch: str, assets: Any, harc_assets: Any,
                                                              tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``llamafactory-cli train``: ``USE_MCA`` (and main's ``USE_MEGATRON_BRIDGE``) start torchrun whatever the
    device count, a recipe key under ``FORCE_TORCHRUN=1``; the launcher refuses the recipe and starts nothing, before
    it imports v0's hparams (which ``USE_MCA=1`` without mcore_adapter fails). On 0.9.5 ``USE_MEGATRON_BRIDGE`` starts
    no torchrun: ``run_exp`` runs in the launcher as without the variable."""
    from llamafactory_hera.job_refusal import raised_by_plugin

    recipe = _recipe(stage, assets, harc_assets, tmp_path / "out", **({switch: True} if switch in KEYS else {}))
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    monkeypatch.setenv("FORCE_TORCHRUN", "1" if switch in KEYS else "0")  # main's launcher sets it: put back after
    if switch in ENVIRONMENT:
        monkeypatch.setenv(switch, "1")
        if not _reads(switch):
            assert _launch(path, monkeypatch) == ["run_exp"]
            return
    _fresh_hparams(monkeypatch)
    with pytest.raises(RecipeError) as error:
        _launch(path, monkeypatch)
    given = f"{switch}: true" if switch in KEYS else f"{switch}=1"
    assert str(error.value).startswith(_said(stage, given)) and raised_by_plugin(error.value), error.value


@pytest.mark.parametrize("variable", list(ENVIRONMENT))
def test_a_stock_stage_under_an_environment_switch_starts_torchrun_as_without_the_plugin(
        variable: str, harc_assets: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The stand-in for torchrun shows the branch the refusal above stands before: where LLaMA-Factory reads the
    variable, its launcher starts torchrun for a stock recipe; ``USE_MCA=1`` without mcore_adapter fails v0's hparams
    at their import, which the launcher's check leaves to the ranks, as LLaMA-Factory alone does."""
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(_stock(harc_assets, tmp_path / "out"), sort_keys=False), encoding="utf-8")
    monkeypatch.setenv("FORCE_TORCHRUN", "0")
    reads = _reads(variable)
    monkeypatch.setenv(variable, "1")
    _fresh_hparams(monkeypatch)
    started = _launch(path, monkeypatch)
    assert (started[0][0] == "torchrun") if reads else (started == ["run_exp"]), started


def test_a_stock_stage_under_hyper_parallel_reaches_llamafactorys_own_branch(harc_assets: Any, tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """``stage: sft`` with ``use_hyper_parallel: true`` and a stand-in hyper_parallel workflow: LLaMA-Factory's tuner
    hands the run to it (the branch that took ``stage: rah`` and ``stage: harc`` before their refusal); ``use_kt`` and
    ``use_unsloth`` are read by its parse, which asks for their packages."""
    import llamafactory.train.tuner as tuner

    ran: list[str] = []
    stand_in = types.ModuleType("llamafactory.train.hyper_parallel")
    stand_in.run_sft = lambda *args: ran.append("hyper_parallel run_sft")
    monkeypatch.setitem(sys.modules, stand_in.__name__, stand_in)
    monkeypatch.setattr(tuner, "is_hyper_parallel_available", lambda: True)
    recipe = _stock(harc_assets, tmp_path / "out")
    tuner.run_exp({**recipe, "use_hyper_parallel": True})
    assert ran == ["hyper_parallel run_sft"]
    for key, package in (("use_kt", "kt-kernel"), ("use_unsloth", "unsloth")):
        with pytest.raises((ImportError, ModuleNotFoundError), match=package):
            tuner.run_exp({**recipe, key: True})


@pytest.mark.parametrize("trainer", ["sft_trainer", "rm_trainer"])
def test_a_plugin_stage_run_with_a_v1_trainer_module_is_one_line(trainer: str, harc_assets: Any, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """``python -m llamafactory.v1.trainers.sft_trainer recipe.yaml`` (the entry its docstring gives), run here as
    ``-m`` runs it: with ``ALLOW_EXTRA_KEYS=1`` v1 dropped ``stage: harc`` and the ``harc_*`` keys and trained plain
    SFT; now refused at v1's ``get_args``, before it reads the recipe, naming the entry."""
    import importlib

    module = f"llamafactory.v1.trainers.{trainer}"
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(harc_recipe(harc_assets, "llama3", tmp_path / "out")), encoding="utf-8")
    monkeypatch.setenv("ALLOW_EXTRA_KEYS", "1")
    monkeypatch.delenv("USE_V1", raising=False)
    monkeypatch.setattr(sys, "argv", [importlib.util.find_spec(module).origin, str(path)])
    with pytest.raises(RecipeError) as error:
        runpy.run_module(module, run_name="__main__")
    assert str(error.value) == (f"stage: harc with python -m {module}: LLaMA-Factory's v1 trainers do not run the "
                                "plugin's stages (v1 would drop stage and the method's keys under ALLOW_EXTRA_KEYS=1 "
                                "and train plain SFT); train with v0's trainer (llamafactory-cli train RECIPE.yaml, "
                                "USE_V1 unset).")
