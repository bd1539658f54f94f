"""The host's v1 trainers do not run plugin stages (no stage key, no trainer or loss to extend): a plugin ``stage`` is
refused in one line at each v1 entry. ``USE_V1=1 llamafactory-cli train``: in the launcher, before torchrun starts.
``python -m llamafactory.v1.trainers.sft_trainer`` (dpo, rm alike) or a v1 rank: at ``llamafactory.v1.config.get_args``,
which every v1 trainer parses with. Otherwise, under ``ALLOW_EXTRA_KEYS=1``, v1 would silently train plain SFT.

Checked on LLaMA-Factory 0.9.5 and main: ``launcher.launch()`` pops the command and trains its
``_DIST_TRAIN_COMMANDS``; ``config.get_args(args=None)`` reads the recipe as :func:`.recipe.recipe_file.launch_recipe`.
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
    """How this process reached v1's parse: ``USE_V1=1``, ``python -m <module>``, or ``...config.get_args``."""
    if os.environ.get("USE_V1", "").strip().lower() in {"true", "y", "1"}:
        return "USE_V1=1"
    parts = Path(sys.argv[0]).with_suffix("").parts if sys.argv and sys.argv[0].endswith(".py") else ()
    starts = [index for index, part in enumerate(parts) if part == "llamafactory"]
    if starts and parts[starts[-1] + 1 : starts[-1] + 2] == ("v1",):
        return "python -m " + ".".join(parts[starts[-1] :])
    return "llamafactory.v1.config.get_args"


def _apply_config(config: ModuleType) -> None:
    """Patch ``get_args`` in ``llamafactory.v1.config`` and its ``arg_parser`` (trainers import both)."""
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
    if getattr(module, "_llamafactory_hera_patched", False):
        return
    if module.__name__.endswith(".config"):
        _apply_config(module)
    else:
        _apply_launcher(module)
    module._llamafactory_hera_patched = True
