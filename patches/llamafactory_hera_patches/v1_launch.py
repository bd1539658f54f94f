"""LLaMA-Factory's v1 trainers (``USE_V1=1``: ``llamafactory-cli`` runs ``llamafactory.v1.launcher``, with v1's own
parser and trainers) do not run the plugin's stages: a recipe whose stage is one is refused in one line before v1
reads it, with or without ``ALLOW_EXTRA_KEYS`` (v1 ended in its parser's traceback, or went on without the method).

Checked on LLaMA-Factory 0.9.5: ``llamafactory.v1.launcher.launch()`` takes the command from ``sys.argv[1]`` (a
training one is in ``_DIST_TRAIN_COMMANDS``) and reads the recipe from the rest as v0's ``read_args`` does.
"""

from __future__ import annotations

import sys
from types import ModuleType

from .errors import RecipeError
from .guard import require
from .launch import launch_recipe
from .recipe.arguments import given_keys
from .registry import method_for_stage


def apply(launcher: ModuleType) -> None:
    """Patch ``llamafactory.v1.launcher`` (all or nothing)."""
    if getattr(launcher, "_llamafactory_hera_patched", False):
        return
    require(launcher, ("launch", "_DIST_TRAIN_COMMANDS"), "v1 launch")
    original = launcher.launch

    def launch() -> None:
        training = sys.argv[1:2] and sys.argv[1] in launcher._DIST_TRAIN_COMMANDS
        stage = given_keys(launch_recipe(sys.argv)).get("stage") if training else None
        if method_for_stage(stage) is not None:
            raise RecipeError(f"stage: {stage} with USE_V1=1: LLaMA-Factory's v1 trainers do not run the plugin's "
                              "stages; unset USE_V1 to train with v0's trainer (llamafactory-cli train RECIPE.yaml).")
        return original()

    launcher.launch = launch
    launcher._llamafactory_hera_patched = True
