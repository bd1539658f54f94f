"""LLaMA-Factory's v1 trainers do not run the plugin's stages (v1 has no stage key and no trainer or loss to extend):
a recipe whose ``stage`` is a plugin's is one line before v1 reads it, under each entry v1 has. ``USE_V1=1
llamafactory-cli train`` (``llamafactory.v1.launcher``): in the launching process, before torchrun starts any rank. A
v1 trainer module run itself, ``python -m llamafactory.v1.trainers.sft_trainer recipe.yaml`` (the entry its docstring
gives; ``dpo_trainer`` and ``rm_trainer`` alike), or a rank of v1's torchrun: at v1's ``get_args``
(``llamafactory.v1.config``), which every v1 trainer parses its recipe with. With ``ALLOW_EXTRA_KEYS=1`` v1 would
otherwise drop ``stage`` and the method's keys and train plain SFT without a word.

Checked on LLaMA-Factory 0.9.5 and main: ``launcher.launch()`` pops the command from ``sys.argv`` and trains its
``_DIST_TRAIN_COMMANDS``; ``config.get_args(args=None)`` reads ``sys.argv[1]`` (YAML or JSON) merged with ``key=value``
overrides, or the arguments given, as :func:`.recipe.recipe_file.launch_recipe` reads them.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

from llamafactory_hera.runtime.errors import RecipeError
from llamafactory_hera.runtime.raw_recipe import given_keys
from llamafactory_hera.runtime.registry import method_for_stage

from .guard import require
from .recipe.recipe_file import launch_recipe, read_args_unchecked, read_recipe


def _apply_launcher(launcher: ModuleType) -> None:
    require(launcher, ("launch", "_DIST_TRAIN_COMMANDS"), "launch")
    original = launcher.launch

    def launch() -> None:
        training = sys.argv[1:2] and sys.argv[1] in launcher._DIST_TRAIN_COMMANDS
        stage = given_keys(launch_recipe(sys.argv)).get("stage") if training else None
        if method_for_stage(stage) is not None:
            raise RecipeError(
                f"stage: {stage} with USE_V1=1: LLaMA-Factory's v1 trainers do not run the plugin's "
                "stages; unset USE_V1 to train with v0's trainer (llamafactory-cli train RECIPE.yaml)."
            )
        return original()

    launcher.launch = launch


def entry() -> str:
    """How this process reached v1's parse, as the user typed it: ``USE_V1=1``, ``python -m <the v1 module run>``,
    or ``llamafactory.v1.config.get_args`` (called from Python)."""
    if os.environ.get("USE_V1", "").strip().lower() in {"true", "y", "1"}:
        return "USE_V1=1"
    parts = Path(sys.argv[0]).with_suffix("").parts if sys.argv and sys.argv[0].endswith(".py") else ()
    starts = [index for index, part in enumerate(parts) if part == "llamafactory"]
    if starts and parts[starts[-1] + 1 : starts[-1] + 2] == ("v1",):
        return "python -m " + ".".join(parts[starts[-1] :])
    return "llamafactory.v1.config.get_args"


def _apply_config(config: ModuleType) -> None:
    """``get_args`` of ``llamafactory.v1.config`` and of its ``arg_parser`` (both names the trainers import)."""
    parser = sys.modules[f"{config.__name__}.arg_parser"]
    require(config, ("get_args",), "launch")
    require(parser, ("get_args",), "launch")
    original = config.get_args

    def get_args(args: Any = None) -> Any:
        stage = given_keys(read_recipe(read_args_unchecked, args)).get("stage")
        if method_for_stage(stage) is not None:
            raise RecipeError(
                f"stage: {stage} with {entry()}: LLaMA-Factory's v1 trainers do not run the plugin's stages "
                "(v1 would drop stage and the method's keys under ALLOW_EXTRA_KEYS=1 and train plain SFT); train with "
                "v0's trainer (llamafactory-cli train RECIPE.yaml, USE_V1 unset)."
            )
        return original(args)

    config.get_args = get_args
    parser.get_args = get_args


def apply(module: ModuleType) -> None:
    """Patch ``llamafactory.v1.launcher`` or ``llamafactory.v1.config`` (all or nothing)."""
    if getattr(module, "_llamafactory_hera_patched", False):
        return
    if module.__name__.endswith(".config"):
        _apply_config(module)
    else:
        _apply_launcher(module)
    module._llamafactory_hera_patched = True
