"""``accelerate launch`` of LLaMA-Factory's training (``-m llamafactory.launcher``, its ``launcher.py``, a clone's
``src/train.py``, ``llamafactory-cli train``): :func:`.launch.check_before_ranks` runs in the launching process with
the environment accelerate hands the ranks, so a refused recipe is one line and no rank starts.

Checked on accelerate 1.11; on another shape nothing is patched (the ranks check the recipe themselves).
``accelerate.commands.launch`` calls its globals ``prepare_multi_gpu_env``, ``prepare_deepspeed_cmd_env`` and
``prepare_simple_launcher_cmd_env`` (``args``: the command merged with the config) just before starting the ranks;
each returns their environment.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

from llamafactory_hera.runtime.errors import RecipeError

_PREPARES = ("prepare_multi_gpu_env", "prepare_deepspeed_cmd_env", "prepare_simple_launcher_cmd_env")
_CLIS = ("llamafactory-cli", "lmf")


def training_argv(args: Any) -> list[str] | None:
    """``llamafactory-cli train <recipe> ...`` for a launch of LLaMA-Factory's training (the start-up hook patches a
    launch that runs it: ``llamafactory_hera._bootstrap.runs_llamafactory``), else None."""
    script = str(args.training_script)
    rest = [str(arg) for arg in args.training_script_args]
    if getattr(args, "module", False):
        return ["llamafactory-cli", "train", *rest] if script == "llamafactory.launcher" else None
    if Path(script).name in _CLIS:
        return ["llamafactory-cli", *rest] if rest[:1] == ["train"] else None
    return ["llamafactory-cli", "train", *rest]


def _check_cli_form(args: Any) -> None:
    """``llamafactory-cli train`` under ``accelerate launch``: a bare name is no file python can run (each rank failed:
    can't open file); on a node with several devices LLaMA-Factory's CLI would start a torchrun of its own inside every
    rank (its launcher does on more than one visible device, or with ``FORCE_TORCHRUN``), one nested job per rank on
    accelerate's port."""
    script = str(args.training_script)
    if Path(script).name not in _CLIS or getattr(args, "module", False):
        return
    if not Path(script).is_file() and not getattr(args, "no_python", False):
        raise RecipeError(
            f"accelerate launch ... {script} train: accelerate runs its training script with python and "
            f"there is no file {script} in {Path.cwd()}; launch `-m llamafactory.launcher RECIPE.yaml` "
            f"instead, or run `{script} train RECIPE.yaml` without accelerate launch."
        )
    import llamafactory.extras.misc as misc  # lazy: an accelerate launch of another script loads no LLaMA-Factory

    devices = misc.get_device_count()
    if devices > 1 or misc.is_env_enabled("FORCE_TORCHRUN"):
        raise RecipeError(
            f"accelerate launch ... {script} train: with {devices} visible devices "
            "LLaMA-Factory's CLI starts a torchrun of its own inside every rank; launch "
            "`-m llamafactory.launcher RECIPE.yaml` (or LLaMA-Factory's src/train.py) instead."
        )


@contextlib.contextmanager
def _environ(environ: Mapping[str, str]) -> Iterator[None]:
    """``os.environ`` is ``environ`` alone for the block (the ranks' environment), then what it was."""
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(environ)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def checked(prepare: Callable[[Any], Any], args: Any) -> Any:
    """accelerate's ``prepare`` of the ranks' environment for ``args``, then, for a launch of LLaMA-Factory's
    training, the recipe checked with that environment."""
    result = prepare(args)
    argv = training_argv(args)
    if argv is not None:
        from .launch import check_before_ranks  # lazy: an accelerate launch of another script loads no LLaMA-Factory

        with _environ(result[1] if isinstance(result, tuple) else result):
            _check_cli_form(args)
            check_before_ranks(argv)
    return result


def apply(launch: ModuleType) -> None:
    """Patch ``accelerate.commands.launch`` (all or nothing; on another shape, nothing)."""
    if getattr(launch, "_llamafactory_hera_patched", False) or not all(hasattr(launch, n) for n in _PREPARES):
        return
    for name in _PREPARES:
        setattr(launch, name, functools.partial(checked, getattr(launch, name)))
    launch._llamafactory_hera_patched = True
