"""``llamafactory-cli train`` under torchrun: the recipe is checked once, in the launcher, before the ranks start
(:func:`check_before_ranks`: a finished run's folder included), one line and exit code 1 as without torchrun. A job
that fails later ends with torchrun's report and its exit code, without the launcher's traceback; one whose ranks
stopped on the save signal ends with 0, the launcher alive through a SIGTERM meanwhile
(:mod:`.runtime.launch_signals`). A method declared ``one_process`` (RAH-LoRA) gets a torchrun of one rank on a
multi-GPU node unless ``FORCE_TORCHRUN`` is set. A bare ``torchrun`` has no launcher to patch
(``llamafactory_hera.job_refusal``); ``accelerate launch`` runs :func:`check_before_ranks` too
(:mod:`.accelerate_launch`). A backend switch a plugin stage cannot run under is refused here too (:mod:`.backends`);
LLaMA-Factory's v1 launcher: :mod:`.v1`.

Checked on LLaMA-Factory 0.9.5 and main (the names :func:`apply` requires): ``launcher.launch()`` pops the command
from ``sys.argv`` and runs ``torchrun ... launcher.py <args>`` with ``subprocess.run(check=True)`` when
:func:`starts_torchrun` says so, else ``run_exp()``; the recipe is read as ``hparams.read_args`` reads it
(:func:`launch_recipe`).
"""

from __future__ import annotations

import contextlib
import importlib
import os
import subprocess
import sys
from types import ModuleType
from typing import Any
from unittest import mock

from llamafactory_hera.runtime import launch_signals, launch_watch
from llamafactory_hera.runtime.errors import RecipeError
from llamafactory_hera.runtime.output_dir import refuse_finished
from llamafactory_hera.runtime.raw_recipe import given_keys
from llamafactory_hera.runtime.registry import method_for_stage

from . import backends
from .guard import require
from .recipe.arguments import keys_of, split_args
from .recipe.recipe_file import read_args_unchecked, read_recipe
from .stage import check_host_stage, method_arguments

_MISC_NAMES = ("is_env_enabled", "get_device_count", "use_ray", "use_kt", "check_dependencies", "find_available_port")
_HELP = ("-h", "--help")


def forces_torchrun(misc: ModuleType) -> bool:
    """``FORCE_TORCHRUN``, or a backend switch the launcher starts torchrun under (``USE_MCA``; main's
    ``USE_MEGATRON_BRIDGE``): torchrun whatever the device count."""
    return bool(misc.is_env_enabled("FORCE_TORCHRUN") or backends.forced_torchrun(os.environ))


def starts_torchrun(misc: ModuleType, argv: list[str]) -> bool:
    """Whether ``launch()`` will run ``argv``'s command under torchrun (LLaMA-Factory 0.9.5's own condition)."""
    if len(argv) < 2 or argv[1] != "train":
        return False
    return forces_torchrun(misc) or (misc.get_device_count() > 1 and not misc.use_ray() and not misc.use_kt())


def launch_recipe(argv: list[str]) -> Any:
    """The recipe of ``argv`` (``llamafactory-cli <command> <recipe> [key=value ...]``) as LLaMA-Factory reads it (v0's
    ``read_args`` and v1's parser alike), without importing v0's ``llamafactory.hparams``: its import runs v0's version
    checks, which v1 does not (a trl outside v0's range trains under v1)."""
    with mock.patch.object(sys, "argv", [argv[0], *argv[2:]]):
        return read_recipe(read_args_unchecked)


def check_before_ranks(argv: list[str]) -> Any:
    """The checks every rank would run of the recipe before LLaMA-Factory parses it, run once on ``argv``
    (``llamafactory-cli train <recipe> [key=value ...]``): the recipe's method (None: a host stage) or RecipeError."""
    raw = launch_recipe(argv)
    if isinstance(raw, list) and any(flag in raw for flag in _HELP):
        return None
    method = method_for_stage(given_keys(raw).get("stage"))
    # a backend switch first: USE_MCA=1 without mcore_adapter fails v0's llamafactory.hparams at its import
    refused = method is not None and backends.refusal(method.stage, raw, os.environ)
    if refused:
        raise RecipeError(refused)
    # the checks read v0's arguments (llamafactory.hparams), imported without the version checks its parser runs at
    # import (by the name it imported from extras.misc): the ranks run them as without the plugin
    with mock.patch.object(importlib.import_module("llamafactory.extras.misc"), "check_dependencies", lambda: None):
        try:
            importlib.import_module("llamafactory.hparams")
        except (
            ImportError
        ):  # what the switch needs is not installed: a host stage's ranks say so, as without the plugin
            if method is None:
                return None
            raise
    host_args, method_raw, method = split_args(raw)
    refuse_finished(host_args)  # here, not in the ranks: one line, no torchrun report of failed ranks
    if method is None:
        check_host_stage(host_args, os.environ)
        return None
    method_args = method_arguments(method, keys_of(method, method_raw)[0], host_args)
    launch_signals.leave_to_ranks(
        getattr(method_args, f"{method.prefix}save_on_signal", None), given_keys(host_args).get("output_dir")
    )
    return method


def _int_env(name: str, default: int) -> int | None:
    """``name``'s whole number (``default`` when unset), None when it is not one (an elastic range: 1:2)."""
    value = os.environ.get(name) or str(default)
    return int(value) if value.isdigit() else None


def _watched_ranks(method: Any, nodes: int, misc: ModuleType) -> int:
    """How many ranks start a watchdog in this launch: every rank of a method's run unless its recipe turns the
    watchdog off (``<prefix>watchdog_timeout: 0``); none for a host stage."""
    if method is None or getattr(method, "one_process", False):
        return 0
    value = given_keys(launch_recipe(sys.argv)).get(f"{method.prefix}watchdog_timeout")
    with contextlib.suppress(TypeError, ValueError):
        if float(value) == 0:
            return 0
    ranks = nodes * int(os.environ.get("NPROC_PER_NODE") or misc.get_device_count())
    return ranks if ranks > 1 else 0  # one process: no watchdog


def apply(launcher: ModuleType) -> None:
    """Patch ``llamafactory.launcher`` (all or nothing)."""
    if getattr(launcher, "_llamafactory_hera_patched", False):
        return
    misc = importlib.import_module("llamafactory.extras.misc")
    require(launcher, ("launch",), "launch")
    require(misc, _MISC_NAMES, "launch")
    original = launcher.launch

    def launch() -> None:
        if not starts_torchrun(misc, sys.argv):
            return original()
        nodes = _int_env("NNODES", 1)
        # watched from here to the ranks' start (launch_watch), on the port chosen now where LLaMA-Factory would pick
        with launch_watch.watching(misc.find_available_port, nodes, _int_env("NODE_RANK", 0)) as start:
            launch_watch.check_master_address()
            method = check_before_ranks(sys.argv)
            if start is not None:
                start.expect(_watched_ranks(method, nodes or 1, misc))
            if getattr(method, "one_process", False) and not forces_torchrun(misc):
                # it places its model over every visible GPU itself: one rank, which sees them all. Not run_exp()
                # here: transformers' arguments in a process that sees several GPUs and no launcher ask for torchrun
                os.environ["FORCE_TORCHRUN"], os.environ["NPROC_PER_NODE"] = "1", "1"
            try:
                with launch_signals.launching():
                    return original()
            except subprocess.CalledProcessError as error:  # torchrun's report is above: its exit code, no traceback
                code = 1 if start is not None and start.ended else error.returncode
                raise SystemExit(launch_signals.ended(code)) from None

    launcher.launch = launch
    launcher._llamafactory_hera_patched = True
